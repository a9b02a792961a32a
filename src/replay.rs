//! `waymark replay`: the engine over a file of events, with no Kafka.
//!
//! Events are read one JSON object a line and applied in file order; timers fire by event time (a
//! timer due at or before an event's time fires first; `--until` fires what is due by then). The
//! records go to the writer as JSON lines, in order. A malformed line is reported with its line
//! number and skipped.
//!
//! Defaults the file cannot give: an event without `timestamp` takes the latest event time seen so
//! far (the stand-in for a Kafka record timestamp); an event without `eventId` gets
//! `replay/0/N`, where N counts the non-blank lines read with this state, as if the file were one
//! partition of a topic named `replay`. Both counters are kept in the state, so replaying a file
//! in two halves over one `--state` gives exactly what one run gives.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::event::RawEvent;
use crate::journey::JourneySet;
use crate::processor::{Output, Processor};
use crate::store::memory::{LocalStore, MemStore};
use crate::store::rocks::RocksStore;
use crate::store::State;
use crate::time::Millis;

const META_CLOCK: &str = "replay/clock";
const META_OFFSET: &str = "replay/offset";
/// Inputs per committed batch.
const COMMIT_EVERY: u64 = 4096;

pub struct ReplayOptions {
    pub events: PathBuf,
    pub until: Option<Millis>,
    /// Where the state lives; `None`: a temporary directory, removed afterwards (or memory, with
    /// `in_memory`).
    pub state: Option<PathBuf>,
    /// Without `state`, keep the state in memory instead of a temporary RocksDB directory
    /// (`backtest`'s default; memory then grows with the sessions kept).
    pub in_memory: bool,
    /// Show a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// `--max-future`: a line whose event time is further ahead than this of the latest event time
    /// read so far is reported and skipped (as `processing.max_future_ms` does in `run`).
    pub max_future: Option<Millis>,
    /// Lines longer than this are reported and skipped, as `processing.max_event_bytes` sends
    /// such values to the dead-letter topic in `run`.
    pub max_event_bytes: usize,
    /// The decoded-state cache's bound in estimated bytes (`state.cache_max_bytes` in `run`,
    /// where each partition has its own).
    pub cache_bytes: usize,
}

/// `replay`'s default line limit: the service's default `processing.max_event_bytes`.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 900_000;

/// What a replay did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayStats {
    pub lines: u64,
    /// Profile lines among them (`"type": "profile"`).
    pub profiles: u64,
    pub malformed: u64,
    pub records: u64,
    pub seconds: f64,
}

fn read_u64(state: &State<LocalStore>, key: &str) -> anyhow::Result<Option<i64>> {
    Ok(state
        .get_meta(key)?
        .and_then(|v| v.try_into().ok())
        .map(i64::from_be_bytes))
}

/// Replays `opts.events` through `journeys`, writing records to `out` and problems to `err`.
pub fn replay(
    journeys: Arc<JourneySet>,
    opts: &ReplayOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<ReplayStats> {
    let stats = run(
        journeys,
        opts,
        &mut |o: &Output| {
            for r in &o.records {
                serde_json::to_writer(&mut *out, r)?;
                out.write_all(b"\n")?;
            }
            Ok(())
        },
        err,
    )?;
    out.flush()?;
    Ok(stats)
}

/// Where an input came from: what stands in for a missing `timestamp` and `eventId`, and how
/// problems with it are reported.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// Line `n` of a file: a missing timestamp is the latest event time read so far, a missing
    /// eventId is `replay/0/N` (N counts the inputs read with this state).
    Line(u64),
    /// A Kafka record: its timestamp and `topic/partition/offset` stand in, as in `waymark run`.
    Record {
        topic: &'a str,
        partition: i32,
        offset: i64,
        time: Option<Millis>,
    },
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Line(n) => write!(f, "line {n}"),
            Origin::Record {
                topic,
                partition,
                offset,
                ..
            } => write!(f, "{topic}/{partition} offset {offset}"),
        }
    }
}

/// The engine over a stream of inputs as `replay` and `backtest` run it: one store, one event
/// clock, timers by event time. Each input's [`Output`] goes to the sink in order.
pub struct Feed {
    proc: Processor<LocalStore>,
    clock: Option<Millis>,
    offset: u64,
    since_commit: u64,
    output: Output,
    max_future: Option<Millis>,
    max_event_bytes: usize,
    started: Instant,
    pub stats: ReplayStats,
    _temp: Option<tempfile::TempDir>,
}

impl Feed {
    /// Opens the state (`opts.state`, or a temporary directory removed when the feed is dropped).
    pub fn open(journeys: Arc<JourneySet>, opts: &ReplayOptions) -> anyhow::Result<Feed> {
        let started = Instant::now();
        let (store, temp) = match &opts.state {
            Some(d) => (LocalStore::Rocks(RocksStore::open(d, false)?), None),
            None if opts.in_memory => (LocalStore::Memory(MemStore::new()), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("waymark-replay-")
                    .tempdir()?;
                (
                    LocalStore::Rocks(RocksStore::open(t.path(), false)?),
                    Some(t),
                )
            }
        };
        let mut state = State::new(store)?;
        state.set_cache_limits(crate::store::cache::DEFAULT_MAX_USERS, opts.cache_bytes);
        let clock: Option<Millis> = read_u64(&state, META_CLOCK)?;
        let offset: u64 = read_u64(&state, META_OFFSET)?.unwrap_or(0) as u64;
        Ok(Feed {
            proc: Processor::new(journeys, state)?,
            clock,
            offset,
            since_commit: 0,
            output: Output::default(),
            max_future: opts.max_future,
            max_event_bytes: opts.max_event_bytes,
            started,
            stats: ReplayStats::default(),
            _temp: temp,
        })
    }

    /// Applies one input. A malformed one is counted, reported to `err` and skipped.
    pub fn input(
        &mut self,
        origin: Origin<'_>,
        bytes: &[u8],
        sink: &mut dyn FnMut(&Output) -> anyhow::Result<()>,
        err: &mut dyn Write,
    ) -> anyhow::Result<()> {
        self.stats.lines += 1;
        let my_offset = self.offset;
        self.offset += 1;
        if bytes.len() > self.max_event_bytes {
            self.stats.malformed += 1;
            writeln!(
                err,
                "{origin}: oversize: {} bytes, the limit is {} (--max-event-bytes)",
                bytes.len(),
                self.max_event_bytes
            )?;
            return Ok(());
        }
        // An input that is not UTF-8 is malformed like any other: reported and skipped.
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                self.stats.malformed += 1;
                writeln!(err, "{origin}: not valid UTF-8 ({e})")?;
                return Ok(());
            }
        };
        if is_profile_line(text) {
            return self.profile_input(origin, text, sink, err);
        }
        let raw = match RawEvent::decode_str(text) {
            Ok(r) => r,
            Err(e) => {
                self.stats.malformed += 1;
                writeln!(err, "{origin}: {e}")?;
                return Ok(());
            }
        };
        let Some(time) = self.judge_time(origin, raw.timestamp(), err)? else {
            return Ok(());
        };
        let default_id = || match origin {
            Origin::Line(_) => format!("replay/0/{my_offset}"),
            Origin::Record {
                topic,
                partition,
                offset,
                ..
            } => format!("{topic}/{partition}/{offset}"),
        };
        let owns = |_: &str| true;
        if let Err(e) = self
            .proc
            .on_input(raw, time, default_id, &owns, &mut self.output)?
        {
            self.stats.malformed += 1;
            writeln!(err, "{origin}: {e}")?;
            return Ok(());
        }
        self.emit(sink)?;
        self.applied()
    }

    /// Counts an applied input; commits every [`COMMIT_EVERY`].
    fn applied(&mut self) -> anyhow::Result<()> {
        self.since_commit += 1;
        if self.since_commit >= COMMIT_EVERY {
            stage_counters(&mut self.proc, self.clock, self.offset);
            self.proc.commit()?;
            self.since_commit = 0;
        }
        Ok(())
    }

    /// An input's time: its `timestamp`, else the stand-in (the record's time, or the latest
    /// time read so far); `None` (reported, counted malformed) when there is none or it is too
    /// far ahead. Advances the clock.
    fn judge_time(
        &mut self,
        origin: Origin<'_>,
        timestamp: Option<Millis>,
        err: &mut dyn Write,
    ) -> anyhow::Result<Option<Millis>> {
        let stand_in = match origin {
            Origin::Record { time, .. } => time.or(self.clock),
            Origin::Line(_) => self.clock,
        };
        let time = match timestamp.or(stand_in) {
            Some(t) => t,
            None => {
                self.stats.malformed += 1;
                writeln!(
                    err,
                    "{origin}: no timestamp, and no earlier event to take the time from"
                )?;
                return Ok(None);
            }
        };
        if let (Some(limit), Some(c)) = (self.max_future, self.clock) {
            if time > c.saturating_add(limit) {
                self.stats.malformed += 1;
                writeln!(
                    err,
                    "{origin}: timestamp in the future: {} is more than --max-future ahead of the latest event time ({})",
                    crate::time::format_millis(time),
                    crate::time::format_millis(c)
                )?;
                return Ok(None);
            }
        }
        self.clock = Some(self.clock.map_or(time, |c| c.max(time)));
        Ok(Some(time))
    }

    /// A profile line (`"type": "profile"`): an update merged into the user's profile, or an
    /// erasure. Timed like an event.
    fn profile_input(
        &mut self,
        origin: Origin<'_>,
        text: &str,
        sink: &mut dyn FnMut(&Output) -> anyhow::Result<()>,
        err: &mut dyn Write,
    ) -> anyhow::Result<()> {
        let record = match crate::profile::decode(text.as_bytes(), 0) {
            Ok(r) => r,
            Err(e) => {
                self.stats.malformed += 1;
                writeln!(err, "{origin}: profile record: {e}")?;
                return Ok(());
            }
        };
        let Some(time) = self.judge_time(origin, record.time(), err)? else {
            return Ok(());
        };
        if let Err(e) = self.proc.on_profile(&record, time, &mut self.output)? {
            self.stats.malformed += 1;
            writeln!(err, "{origin}: profile record refused: {e}")?;
        }
        self.stats.profiles += 1;
        self.emit(sink)?;
        self.applied()
    }

    fn emit(&mut self, sink: &mut dyn FnMut(&Output) -> anyhow::Result<()>) -> anyhow::Result<()> {
        sink(&self.output)?;
        self.stats.records += self.output.records.len() as u64;
        self.output.clear();
        Ok(())
    }

    /// Fires the timers due by `until` (if given), commits the state and returns the counts.
    pub fn finish(
        mut self,
        until: Option<Millis>,
        sink: &mut dyn FnMut(&Output) -> anyhow::Result<()>,
    ) -> anyhow::Result<ReplayStats> {
        if let Some(until) = until {
            self.proc.fire_due(until, &mut self.output)?;
            self.emit(sink)?;
        }
        stage_counters(&mut self.proc, self.clock, self.offset);
        self.proc.commit()?;
        self.proc.state().flush()?;
        self.stats.seconds = self.started.elapsed().as_secs_f64();
        Ok(self.stats)
    }
}

/// The engine over `opts.events`: hands what each input did (records, matched triggers, refusals)
/// to `sink`, in order, and reports problems to `err`. `replay` and `backtest` are this with
/// different sinks.
pub fn run(
    journeys: Arc<JourneySet>,
    opts: &ReplayOptions,
    sink: &mut dyn FnMut(&Output) -> anyhow::Result<()>,
    err: &mut dyn Write,
) -> anyhow::Result<ReplayStats> {
    let mut feed = Feed::open(journeys, opts)?;
    let file = std::fs::File::open(&opts.events)
        .with_context(|| format!("cannot open events file {}", opts.events.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = (opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new(size);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        b
    });
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut line: Vec<u8> = Vec::new();
    let mut line_no: u64 = 0;
    let mut read_bytes = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {}", opts.events.display()))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        read_bytes += n as u64;
        if let Some(b) = &bar {
            if line_no % 4096 == 0 {
                b.set_position(read_bytes);
            }
        }
        let bytes = line.trim_ascii_end();
        if bytes.trim_ascii().is_empty() {
            continue;
        }
        feed.input(Origin::Line(line_no), bytes, sink, err)?;
    }
    let stats = feed.finish(opts.until, sink)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(stats)
}

/// Whether a line is a profile record: an object whose `type` is `"profile"`. Lines without
/// the text `"type"` (nearly every event) are not parsed twice.
pub fn is_profile_line(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow, default)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    text.contains("\"type\"")
        && serde_json::from_str::<Tag<'_>>(text).is_ok_and(|t| t.kind.as_deref() == Some("profile"))
}

fn stage_counters(proc: &mut Processor<LocalStore>, clock: Option<Millis>, offset: u64) {
    let state = proc.state_mut();
    if let Some(c) = clock {
        state.stage_meta(META_CLOCK, c.to_be_bytes().to_vec());
    }
    state.stage_meta(META_OFFSET, (offset as i64).to_be_bytes().to_vec());
}
