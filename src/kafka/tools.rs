//! `waymark produce` and `waymark tail`: enough of a Kafka client to feed events and read records
//! without kcat.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::runtime::Delivery;
use super::{base_config, producer_config};

/// Produces each non-blank line of `file` (or stdin for `-`) to `topic`, keyed by the line's
/// `userId` when it has one. Returns how many records were acknowledged.
/// With `rate`, sends at most that many records per second (for latency measurements); `limit`
/// stops after that many records; `retime` shifts every event's `timestamp` by one amount so that
/// the first is now (a scenario replayed live keeps its spacing, and no timer of it is already
/// overdue on the wall clock).
pub fn produce(
    brokers: &str,
    topic: &str,
    file: &Path,
    rate: Option<u64>,
    limit: Option<u64>,
    retime: bool,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let now = super::runtime::Clock::system().now_ms();
    // With `retime`, every timestamp moves by the same amount, so the first event is now.
    let mut first_time: Option<i64> = None;
    let producer: BaseProducer<Delivery> = producer_config(brokers)
        .create_with_context(Delivery::default())
        .context("creating a producer")?;
    // Paced sends stand for live traffic: the first records are not stamped while the client is
    // still connecting (metadata, the idempotent producer's id), or their latency would hold
    // the client's start-up.
    if rate.is_some() {
        let _ = producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(10));
        producer.poll(Duration::from_millis(200));
    }
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
        ))
    };
    let mut n = 0u64;
    let mut skipped = 0u64;
    for (line_no, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<serde_json::Value>(&line).ok();
        let key = parsed
            .as_ref()
            .and_then(|v| v.get("userId").and_then(crate::event::id_text));
        let line = match (retime, parsed) {
            (true, Some(mut v)) => {
                let t = match v.get("timestamp") {
                    Some(serde_json::Value::String(s)) => crate::time::parse_rfc3339(s),
                    Some(serde_json::Value::Number(n)) => n.as_i64(),
                    _ => None,
                };
                if let Some(t) = t {
                    let shift = *first_time.get_or_insert(now - t);
                    v["timestamp"] =
                        serde_json::Value::String(crate::time::format_millis(t + shift));
                }
                v.to_string()
            }
            _ => line,
        };
        let mut rec = BaseRecord::with_opaque_to(topic, 0).payload(line.as_str());
        if let Some(k) = &key {
            rec = rec.key(k.as_str());
        }
        // A full queue is waited out; any other refusal (a record too large, an unknown topic) is
        // reported with its line and the rest goes on.
        let mut sent = true;
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    producer.poll(Duration::from_millis(50));
                    rec = r;
                }
                Err((e, _)) => {
                    eprintln!("waymark produce: line {}: not sent: {e}", line_no + 1);
                    skipped += 1;
                    sent = false;
                    break;
                }
            }
        }
        if !sent {
            continue;
        }
        n += 1;
        producer.poll(Duration::ZERO);
        if let Some(r) = rate.filter(|&r| r > 0) {
            let due = Duration::from_secs_f64(n as f64 / r as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        if limit.is_some_and(|l| n >= l) {
            break;
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("waiting for the broker to acknowledge")?;
    producer
        .context()
        .check()
        .map_err(|e| anyhow::anyhow!("{e} (does topic {topic} exist?)"))?;
    if skipped > 0 {
        anyhow::bail!("{skipped} line(s) not sent (reported above); {n} sent");
    }
    Ok(n)
}

/// How `tail` prints records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailFormat {
    /// The value as it is, one record a line.
    Raw,
    /// `topic/partition@offset key=.. value` with headers.
    Verbose,
    /// A short human summary of waymark's output records.
    Pretty,
}

/// Reads `topics` from the beginning and prints every record; stops after `count` records or
/// once no record has arrived for `idle`.
pub fn tail(
    brokers: &str,
    topics: &[String],
    count: Option<u64>,
    idle: Duration,
    format: TailFormat,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = base_config(brokers)
        .set("group.id", format!("waymark-tail-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating a consumer")?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .context("fetching metadata")?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        if topics.iter().any(|x| x == t.name()) {
            for p in t.partitions() {
                tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&tpl).context("assigning partitions")?;
    let mut n = 0u64;
    let mut last = Instant::now();
    while count.is_none_or(|c| n < c) && last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                n += 1;
                let value = m.payload().map(String::from_utf8_lossy).unwrap_or_default();
                match format {
                    TailFormat::Raw => writeln!(out, "{value}")?,
                    TailFormat::Verbose => {
                        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
                        let mut hs = Vec::new();
                        if let Some(h) = m.headers() {
                            for x in h.iter() {
                                hs.push(format!(
                                    "{}={}",
                                    x.key,
                                    x.value.map(String::from_utf8_lossy).unwrap_or_default()
                                ));
                            }
                        }
                        writeln!(
                            out,
                            "{}/{}@{} key={key} headers=[{}] {value}",
                            m.topic(),
                            m.partition(),
                            m.offset(),
                            hs.join(", ")
                        )?;
                    }
                    TailFormat::Pretty => writeln!(out, "{}", pretty(&value))?,
                }
            }
            Some(Err(e)) => anyhow::bail!("consuming: {e}"),
            None => {}
        }
    }
    Ok(n)
}

/// One line per waymark output record, for people.
pub fn pretty(value: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(value) else {
        return value.to_string();
    };
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_string();
    let mut key = v
        .get("session_key")
        .and_then(|x| x.as_str())
        .map(|k| format!(" [{k}]"))
        .unwrap_or_default();
    if v.get("holdout").and_then(|h| h.as_bool()) == Some(true) {
        key.push_str(" (holdout)");
    }
    // Section 5 details of a move: branch, variant, suppressed action.
    let mut detail = String::new();
    for (field, label) in [("branch", "branch"), ("variant", "variant")] {
        if let Some(x) = v.get(field).and_then(|x| x.as_str()) {
            detail.push_str(&format!(" {label} {x}"));
        }
    }
    if let Some(x) = v.get("suppressed").and_then(|x| x.as_str()) {
        detail.push_str(&format!("  => action suppressed ({x})"));
    }
    match v.get("type").and_then(|t| t.as_str()) {
        Some("journey_entry") => format!(
            "{}  ENTER    {:<24} user {}{key} at step {} (by {} from user {})",
            s("at"),
            s("journey_id"),
            s("user_id"),
            s("step"),
            s("event"),
            s("source_user_id")
        ),
        Some("step_advance") => {
            let action = v
                .get("action")
                .and_then(|a| a.as_str())
                .map(|a| format!("  => send {a} {}", v["params"]))
                .unwrap_or_default();
            format!(
                "{}  STEP     {:<24} user {}{key} {} -> {} ({}){detail}{action}",
                s("at"),
                s("journey_id"),
                s("user_id"),
                s("from"),
                s("to"),
                s("reason")
            )
        }
        Some("journey_exit") => format!(
            "{}  EXIT     {:<24} user {}{key} at {} ({}){detail}",
            s("at"),
            s("journey_id"),
            s("user_id"),
            s("from"),
            s("reason")
        ),
        Some("conversion") => format!(
            "{}  CONVERT  {:<24} user {}{key} goal {} (by {})",
            s("at"),
            s("journey_id"),
            s("user_id"),
            s("goal_id"),
            s("event")
        ),
        _ => value.to_string(),
    }
}
