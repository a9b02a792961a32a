//! `waymark backtest --brokers .. --topics .. --from .. --to ..`: past events straight from Kafka.
//!
//! Read only: the consumer is assigned its partitions by hand (it never joins a group, so the
//! service's group and its offsets are untouched), never commits, and nothing is produced. Each
//! partition is read from its first record stamped at or after `--from` (looked up with
//! `offsets_for_times`) up to, not including, its first record stamped at or after `--to` (or its
//! end when the read began): a range of offsets, so a late record inside it is read whatever its
//! stamp. Partitions are merged into one
//! stream by record timestamp (ties: topic order, partition, offset), so timers fire by event time
//! across all users as in a `replay` of the same events in that order; each partition's records
//! keep their offset order. Memory: at most about [`BUFFER_BYTES`] of records are held while
//! partitions wait for each other.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::time::Millis;

/// What to read.
#[derive(Debug, Clone)]
pub struct Range {
    pub brokers: String,
    pub topics: Vec<String>,
    pub from: Millis,
    pub to: Millis,
    /// Show a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// Bytes of records held while partitions wait for each other ([`BUFFER_BYTES`] by default).
    pub buffer_bytes: usize,
}

/// One record handed on: where it is, its timestamp, its value.
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub time: Option<Millis>,
    pub value: &'a [u8],
}

/// What a read did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadStats {
    pub partitions: usize,
    pub records: u64,
    pub seconds: f64,
}

/// Bytes of records buffered (all partitions) above which a partition that runs ahead of the
/// others is paused; paused partitions resume below half of it. Pausing makes librdkafka drop what
/// it had prefetched for the partition (refetched on resume), so it is kept for real memory
/// pressure: with a budget of 20,000 records a partition the 1M-event read ran at a third of the
/// speed.
pub const BUFFER_BYTES: usize = 256 << 20;
/// What a buffered record costs besides its value.
const RECORD_OVERHEAD: usize = 48;
/// How long the broker may send nothing before the read gives up.
const STALL: Duration = Duration::from_secs(60);

struct Buffered {
    time: Millis,
    offset: i64,
    value: Vec<u8>,
}

struct Part {
    topic: usize,
    partition: i32,
    /// One past the last offset to read.
    end: i64,
    /// The next offset expected from the broker; done when it reaches `end`.
    next: i64,
    /// Whether the first record stamped at or after `--from` has been met (records after it are
    /// read whatever their stamp: the range is one of offsets).
    started: bool,
    queue: VecDeque<Buffered>,
    paused: bool,
}

impl Part {
    fn done_reading(&self) -> bool {
        self.next >= self.end
    }
}

/// The offsets of `tpl`'s partitions at `time`: the first record stamped at or after it, or the
/// partition's end when there is none.
fn offsets_at(
    consumer: &BaseConsumer,
    tps: &[(String, i32)],
    time: Millis,
    high: &HashMap<(String, i32), i64>,
) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in tps {
        tpl.add_partition_offset(t, *p, Offset::Offset(time))?;
    }
    let found = consumer
        .offsets_for_times(tpl, Duration::from_secs(30))
        .context("looking up offsets by time")?;
    let mut out = HashMap::new();
    for e in found.elements() {
        let key = (e.topic().to_string(), e.partition());
        if let Some(err) = e.error().err() {
            bail!(
                "looking up the offset of {}/{} at {}: {err}",
                e.topic(),
                e.partition(),
                crate::time::format_millis(time)
            );
        }
        let end = high.get(&key).copied().unwrap_or(0);
        let offset = match e.offset() {
            Offset::Offset(o) => o.min(end),
            _ => end,
        };
        out.insert(key, offset);
    }
    Ok(out)
}

/// Reads `range` and hands every record to `each`, merged by timestamp.
pub fn read(
    range: &Range,
    each: &mut dyn FnMut(Record<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<ReadStats> {
    let started = Instant::now();
    if range.to <= range.from {
        bail!("--to must be after --from");
    }
    // librdkafka wants a group.id to assign partitions; this one is the reader's own, never
    // joined (no subscribe) and never committed to.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut config = crate::kafka::base_config(&range.brokers);
    config
        .set(
            "group.id",
            format!("waymark-backtest-{}-{nanos}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = crate::kafka::apply_consumer_properties(&mut config)
        .create()
        .context("creating a consumer")?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(30))
        .with_context(|| format!("fetching metadata from {}", range.brokers))?;
    let mut tps: Vec<(String, i32)> = Vec::new();
    for t in &range.topics {
        let Some(mt) = md
            .topics()
            .iter()
            .find(|x| x.name() == t && x.error().is_none() && !x.partitions().is_empty())
        else {
            bail!("topic {t} does not exist on {}", range.brokers);
        };
        let mut ps: Vec<i32> = mt.partitions().iter().map(|p| p.id()).collect();
        ps.sort();
        tps.extend(ps.into_iter().map(|p| (t.clone(), p)));
    }
    let mut high = HashMap::new();
    for (t, p) in &tps {
        let (_, h) = consumer
            .fetch_watermarks(t, *p, Duration::from_secs(30))
            .with_context(|| format!("reading the end of {t}/{p}"))?;
        high.insert((t.clone(), *p), h);
    }
    // Where `--from` begins, by the broker's time index. Where `--to` ends is found while reading
    // (the first record stamped at or after it), and both are checked on the records themselves:
    // a broker that answers offset 0 for "no such record" (tansu does) must not widen the range.
    let starts = offsets_at(&consumer, &tps, range.from, &high)?;
    let mut parts: Vec<Part> = Vec::new();
    let mut index: HashMap<(String, i32), usize> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for (t, p) in &tps {
        let key = (t.clone(), *p);
        let (start, end) = (starts[&key], high[&key]);
        if start >= end {
            continue;
        }
        tpl.add_partition_offset(t, *p, Offset::Offset(start))?;
        index.insert(key, parts.len());
        parts.push(Part {
            topic: range.topics.iter().position(|x| x == t).expect("listed"),
            partition: *p,
            end,
            next: start,
            started: false,
            queue: VecDeque::new(),
            paused: false,
        });
    }
    let mut stats = ReadStats {
        partitions: parts.len(),
        ..Default::default()
    };
    if parts.is_empty() {
        stats.seconds = started.elapsed().as_secs_f64();
        return Ok(stats);
    }
    consumer.assign(&tpl).context("assigning partitions")?;
    let total: i64 = parts.iter().map(|p| p.end - p.next).sum();
    let bar = (range.progress && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new(total.max(0) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} records {per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        b
    });
    let mut last_record = Instant::now();
    let mut buffered = 0usize;
    let mut any_paused = false;
    loop {
        // Hand on records while every partition still being read has one buffered: the smallest
        // head then is the next record in merged order.
        loop {
            let mut best: Option<usize> = None;
            let mut blocked = false;
            for (i, part) in parts.iter().enumerate() {
                match part.queue.front() {
                    None if !part.done_reading() => {
                        blocked = true;
                        break;
                    }
                    None => {}
                    Some(head) => {
                        let better = best.is_none_or(|b| {
                            let bp = &parts[b];
                            let bh = bp.queue.front().expect("non-empty");
                            (head.time, part.topic, part.partition, head.offset)
                                < (bh.time, bp.topic, bp.partition, bh.offset)
                        });
                        if better {
                            best = Some(i);
                        }
                    }
                }
            }
            let (false, Some(i)) = (blocked, best) else {
                break;
            };
            let rec = parts[i].queue.pop_front().expect("non-empty");
            buffered -= rec.value.len() + RECORD_OVERHEAD;
            // A paused partition whose buffer ran dry is the one the merge waits for next.
            if parts[i].paused && parts[i].queue.is_empty() {
                let mut one = TopicPartitionList::new();
                one.add_partition(&range.topics[parts[i].topic], parts[i].partition);
                consumer.resume(&one).context("resuming a partition")?;
                parts[i].paused = false;
            }
            if any_paused && buffered < range.buffer_bytes / 2 {
                let mut tpl = TopicPartitionList::new();
                for p in parts.iter_mut().filter(|p| p.paused) {
                    tpl.add_partition(&range.topics[p.topic], p.partition);
                    p.paused = false;
                }
                consumer.resume(&tpl).context("resuming partitions")?;
                any_paused = false;
            }
            let part = &parts[i];
            stats.records += 1;
            if let Some(b) = &bar {
                if stats.records % 4096 == 0 {
                    b.set_position(stats.records);
                }
            }
            each(Record {
                topic: &range.topics[part.topic],
                partition: part.partition,
                offset: rec.offset,
                time: Some(rec.time),
                value: &rec.value,
            })?;
        }
        if parts.iter().all(|p| p.done_reading() && p.queue.is_empty()) {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_record = Instant::now();
                let Some(&i) = index.get(&(m.topic().to_string(), m.partition())) else {
                    continue;
                };
                let part = &mut parts[i];
                if m.offset() < part.next || part.done_reading() {
                    continue;
                }
                part.next = m.offset() + 1;
                if m.offset() >= part.end {
                    part.next = part.end;
                    continue;
                }
                let time = m.timestamp().to_millis().unwrap_or(0);
                if !part.started {
                    if time < range.from {
                        continue;
                    }
                    part.started = true;
                }
                if time >= range.to {
                    // The first record of `--to`: the partition's range ends before it.
                    part.end = m.offset();
                    part.next = part.end;
                    let mut one = TopicPartitionList::new();
                    one.add_partition(&range.topics[part.topic], part.partition);
                    let _ = consumer.pause(&one);
                    part.paused = false; // for good: never resumed
                    continue;
                }
                let value = m.payload().unwrap_or_default().to_vec();
                buffered += value.len() + RECORD_OVERHEAD;
                part.queue.push_back(Buffered {
                    time,
                    offset: m.offset(),
                    value,
                });
                // Only a partition with more than the merge needs from it (its head) is paused.
                if !part.paused && buffered > range.buffer_bytes && part.queue.len() > 1 {
                    let mut one = TopicPartitionList::new();
                    one.add_partition(&range.topics[part.topic], part.partition);
                    consumer.pause(&one).context("pausing a partition")?;
                    part.paused = true;
                    any_paused = true;
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // The last offsets of a compacted or transactional partition may hold no record
                // (removed keys, transaction markers): at its end, what was there has been read.
                let pos = consumer.position().context("reading positions")?;
                for part in parts
                    .iter_mut()
                    .filter(|x| x.partition == p && !x.done_reading())
                {
                    if let Some(e) = pos.find_partition(&range.topics[part.topic], p) {
                        if matches!(e.offset(), Offset::Offset(o) if o >= part.end) {
                            part.next = part.end;
                        }
                    }
                }
            }
            Some(Err(e)) => bail!("reading {}: {e}", range.topics.join(",")),
            None => {
                if last_record.elapsed() > STALL {
                    let waiting: Vec<String> = parts
                        .iter()
                        .filter(|p| !p.done_reading())
                        .map(|p| format!("{}/{} at {}", range.topics[p.topic], p.partition, p.next))
                        .collect();
                    bail!(
                        "no record from the broker for {} s; still waiting for {}",
                        STALL.as_secs(),
                        waiting.join(", ")
                    );
                }
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}
