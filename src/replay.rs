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
    /// Where the state lives; `None`: a temporary directory, removed afterwards.
    pub state: Option<PathBuf>,
    /// Show a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// `--max-future`: a line whose event time is further ahead than this of the latest event time
    /// read so far is reported and skipped (as `processing.max_future_ms` does in `run`).
    pub max_future: Option<Millis>,
    /// Lines longer than this are reported and skipped, as `processing.max_event_bytes` sends
    /// such values to the dead-letter topic in `run`.
    pub max_event_bytes: usize,
}

/// `replay`'s default line limit: the service's default `processing.max_event_bytes`.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 900_000;

/// What a replay did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayStats {
    pub lines: u64,
    pub malformed: u64,
    pub records: u64,
    pub seconds: f64,
}

fn read_u64(state: &State<RocksStore>, key: &str) -> anyhow::Result<Option<i64>> {
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

/// The engine over `opts.events`: hands what each input did (records, matched triggers, refusals)
/// to `sink`, in order, and reports problems to `err`. `replay` and `backtest` are this with
/// different sinks.
pub fn run(
    journeys: Arc<JourneySet>,
    opts: &ReplayOptions,
    sink: &mut dyn FnMut(&Output) -> anyhow::Result<()>,
    err: &mut dyn Write,
) -> anyhow::Result<ReplayStats> {
    let started = Instant::now();
    let temp;
    let dir = match &opts.state {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("waymark-replay-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let store = RocksStore::open(&dir, false)?;
    let state = State::new(store)?;
    let mut clock: Option<Millis> = read_u64(&state, META_CLOCK)?;
    let mut offset: u64 = read_u64(&state, META_OFFSET)?.unwrap_or(0) as u64;
    let mut proc = Processor::new(journeys.clone(), state)?;

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
    let mut stats = ReplayStats::default();
    let mut output = Output::default();
    let mut since_commit = 0u64;
    let mut read_bytes = 0u64;
    let owns_all = |_: &str| true;
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
        stats.lines += 1;
        let my_offset = offset;
        offset += 1;
        if bytes.len() > opts.max_event_bytes {
            stats.malformed += 1;
            writeln!(
                err,
                "line {line_no}: oversize: {} bytes, the limit is {} (--max-event-bytes)",
                bytes.len(),
                opts.max_event_bytes
            )?;
            continue;
        }
        // A line that is not UTF-8 is malformed like any other: reported and skipped.
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                stats.malformed += 1;
                writeln!(err, "line {line_no}: not valid UTF-8 ({e})")?;
                continue;
            }
        };
        let raw = match RawEvent::decode_str(text) {
            Ok(r) => r,
            Err(e) => {
                stats.malformed += 1;
                writeln!(err, "line {line_no}: {e}")?;
                continue;
            }
        };
        let time = match raw.timestamp().or(clock) {
            Some(t) => t,
            None => {
                stats.malformed += 1;
                writeln!(
                    err,
                    "line {line_no}: no timestamp, and no earlier event to take the time from"
                )?;
                continue;
            }
        };
        if let (Some(limit), Some(c)) = (opts.max_future, clock) {
            if time > c.saturating_add(limit) {
                stats.malformed += 1;
                writeln!(
                    err,
                    "line {line_no}: timestamp in the future: {} is more than --max-future ahead of the latest event time ({})",
                    crate::time::format_millis(time),
                    crate::time::format_millis(c)
                )?;
                continue;
            }
        }
        clock = Some(clock.map_or(time, |c| c.max(time)));
        if proc
            .engine()
            .journeys()
            .interest(raw.application(), raw.name())
            .is_none()
        {
            proc.fire_due(time, &mut output)?;
        } else {
            let ev = match raw.into_event(Some(time), || format!("replay/0/{my_offset}")) {
                Ok(ev) => ev,
                Err(e) => {
                    stats.malformed += 1;
                    writeln!(err, "line {line_no}: {e}")?;
                    continue;
                }
            };
            proc.on_event(&ev, &owns_all, &mut output)?;
        }
        sink(&output)?;
        stats.records += output.records.len() as u64;
        output.clear();
        since_commit += 1;
        if since_commit >= COMMIT_EVERY {
            stage_counters(&mut proc, clock, offset);
            proc.commit()?;
            since_commit = 0;
        }
    }
    if let Some(until) = opts.until {
        proc.fire_due(until, &mut output)?;
        sink(&output)?;
        stats.records += output.records.len() as u64;
        output.clear();
    }
    stage_counters(&mut proc, clock, offset);
    proc.commit()?;
    proc.state().flush()?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

fn stage_counters(proc: &mut Processor<RocksStore>, clock: Option<Millis>, offset: u64) {
    let state = proc.state_mut();
    if let Some(c) = clock {
        state.stage_meta(META_CLOCK, c.to_be_bytes().to_vec());
    }
    state.stage_meta(META_OFFSET, (offset as i64).to_be_bytes().to_vec());
}
