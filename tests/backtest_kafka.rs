//! `waymark backtest --brokers .. --topics .. --from .. --to ..` against a real broker: the report
//! equals the file form's over the same records in the same order, records outside the time range
//! are not read, and the read leaves no trace (no group, no offsets, no records produced).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::kafka::*;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use waymark::backtest::{kafka::Range, run_file, run_kafka};
use waymark::journey::load_dir;
use waymark::kafka::owner_of;
use waymark::replay::ReplayOptions;

const PARTITIONS: i32 = 3;
const T0: i64 = 1_796_000_000_000; // 2026-11-28T...
const HOUR: i64 = 3_600_000;

fn journeys(dir: &Path) {
    write_journey(
        dir,
        &json!({ "id": "welcome", "application": "app",
          "entry": { "event": "Signup" },
          "holdout": { "percent": 30 },
          "steps": [
            { "id": "ab", "type": "experiment",
              "variants": [ { "id": "push", "weight": 50, "next": "send-push" },
                            { "id": "email", "weight": 50, "next": "send-email" } ] },
            { "id": "send-push", "type": "action", "action": "push", "next": "wait" },
            { "id": "send-email", "type": "action", "action": "email", "next": "wait" },
            { "id": "wait", "type": "wait_for_trigger", "event": "Open", "timeout": "6h", "next": "end" },
            { "id": "end", "type": "exit" } ],
          "goals": [ { "id": "activated", "event": "Activate" } ] }),
    );
}

/// A record as produced: (record time, key, value).
type Produced = (i64, String, Vec<u8>);

/// (record time, key, value) of 300 users over two days: signups, opens and activations, with
/// equal timestamps across partitions, and one value that is not JSON.
fn stream() -> Vec<Produced> {
    let mut out = Vec::new();
    for u in 0..300i64 {
        let user = format!("user-{u}");
        let t = T0 + (u % 150) * 10 * 60_000; // pairs of users share a signup time
        let ev = |name: &str, at: i64, id: String| {
            (
                at,
                user.clone(),
                json!({"application": "app", "event": name, "userId": user, "timestamp": at, "eventId": id})
                    .to_string()
                    .into_bytes(),
            )
        };
        out.push(ev("Signup", t, format!("s{u}")));
        if u % 2 == 0 {
            out.push(ev("Open", t + HOUR, format!("o{u}")));
        }
        if u % 3 == 0 {
            out.push(ev("Activate", t + 2 * HOUR, format!("a{u}")));
        }
    }
    out.push((T0 + 5 * HOUR, "user-7".into(), b"not json".to_vec()));
    out
}

fn options(events: &Path, until: Option<i64>) -> ReplayOptions {
    ReplayOptions {
        events: events.to_path_buf(),
        until,
        state: None,
        in_memory: false,
        progress: false,
        max_future: None,
        max_event_bytes: waymark::replay::DEFAULT_MAX_EVENT_BYTES,
        cache_bytes: waymark::store::cache::DEFAULT_MAX_BYTES,
    }
}

/// Committed offsets of `group` on `topic`, by partition.
fn committed(brokers: &str, group: &str, topic: &str) -> BTreeMap<i32, Offset> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    c.committed_offsets(tpl, Duration::from_secs(30))
        .unwrap()
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}

/// Every topic's end offsets.
fn ends(brokers: &str) -> BTreeMap<(String, i32), i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let md = c.fetch_metadata(None, Duration::from_secs(30)).unwrap();
    let mut out = BTreeMap::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (_, hi) = c
                .fetch_watermarks(t.name(), p.id(), Duration::from_secs(30))
                .unwrap();
            out.insert((t.name().to_string(), p.id()), hi);
        }
    }
    out
}

#[test]
fn a_backtest_from_kafka_equals_the_file_form_over_the_same_records_and_leaves_no_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    journeys(&jdir);
    let (_state, s) = setup("backtest", &jdir, PARTITIONS);
    let brokers = s.names.brokers.clone();
    let topic = s.names.events.clone();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(waymark::kafka::ensure_topics(
            &brokers,
            &[(topic.clone(), PARTITIONS)],
            1,
            &[],
        ))
        .unwrap();
    let records = stream();
    let p = producer_on(&brokers);
    for (at, key, value) in &records {
        let r = BaseRecord::with_opaque_to(&topic, 0)
            .key(key.as_str())
            .payload(value.as_slice())
            .timestamp(*at);
        p.send(r).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(60)).unwrap();
    p.context().check().expect("every record delivered");

    // The service's group has committed offsets; the backtest must not move them.
    let service = s.names.group.clone();
    {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &service)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for part in 0..PARTITIONS {
            tpl.add_partition_offset(&topic, part, Offset::Offset(1))
                .unwrap();
        }
        c.commit(&tpl, CommitMode::Sync).unwrap();
    }
    let offsets_before = committed(&brokers, &service, &topic);
    let ends_before = ends(&brokers);

    // From six hours in to a day and a half in: signups before and after are not read.
    let (from, to) = (T0 + 6 * HOUR, T0 + 30 * HOUR);
    let range = Range {
        brokers: brokers.clone(),
        topics: vec![topic.clone()],
        from,
        to,
        progress: false,
        buffer_bytes: waymark::backtest::kafka::BUFFER_BYTES,
    };
    let set = Arc::new(load_dir(&jdir).unwrap());
    let mut err = Vec::new();
    let (reports, read) = run_kafka(
        // In memory (the command's default), against the file form's RocksDB below.
        vec![(
            set.clone(),
            ReplayOptions {
                in_memory: true,
                ..options(Path::new(""), None)
            },
        )],
        &range,
        None,
        &mut err,
    )
    .unwrap();

    // The same records as a file. Each partition's range is one of offsets: from its first record
    // stamped at or after `from` to (not including) its first stamped at or after `to`; late
    // records between are in. Then the merged order: record time, partition, offset.
    let mut chosen: Vec<(i64, i32, usize, &Vec<u8>)> = Vec::new();
    for part in 0..PARTITIONS {
        let mine: Vec<(usize, &Produced)> = records
            .iter()
            .enumerate()
            .filter(|(_, (_, key, _))| owner_of(key, PARTITIONS) == part)
            .collect();
        let Some(first) = mine.iter().position(|(_, r)| r.0 >= from) else {
            continue;
        };
        for (i, (at, _, value)) in &mine[first..] {
            if *at >= to {
                break;
            }
            chosen.push((*at, part, *i, value));
        }
    }
    chosen.sort();
    assert!(
        chosen.iter().any(|c| c.0 < from),
        "late records (stamped before --from, inside a partition's range) are in"
    );
    let file = tmp.path().join("events.jsonl");
    let mut text = Vec::new();
    for (_, _, _, v) in &chosen {
        text.extend_from_slice(v);
        text.push(b'\n');
    }
    std::fs::write(&file, text).unwrap();
    let (from_file, _) =
        run_file(set.clone(), &options(&file, Some(to)), &mut std::io::sink()).unwrap();

    assert_eq!(read.records as usize, chosen.len(), "records in the range");
    assert!(chosen.len() < records.len(), "some records are outside it");
    let kafka_report = serde_json::to_value(&reports[0]).unwrap();
    // With a buffer of a few records, partitions that run ahead are paused and resumed all along:
    // the same report.
    let (tight, _) = run_kafka(
        vec![(set.clone(), options(Path::new(""), None))],
        &Range {
            buffer_bytes: 2_000,
            ..range.clone()
        },
        None,
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(serde_json::to_value(&tight[0]).unwrap(), kafka_report);
    let file_report = serde_json::to_value(&from_file).unwrap();
    assert_eq!(kafka_report, file_report);
    let welcome = &kafka_report["journeys"][0];
    assert!(welcome["entries"].as_u64().unwrap() > 50, "{welcome}");
    assert_eq!(kafka_report["malformed"], json!(1));
    let err = String::from_utf8(err).unwrap();
    assert!(
        err.contains(&format!("{topic}/{}", owner_of("user-7", PARTITIONS)))
            && err.contains("offset"),
        "the malformed record is named by topic, partition and offset: {err}"
    );

    // Read only.
    assert_eq!(committed(&brokers, &service, &topic), offsets_before);
    assert_eq!(ends(&brokers), ends_before, "nothing was produced");
    let _: Value = kafka_report;
}

/// The command line: `--brokers` needs the range, and the report comes out like the file form's.
#[test]
fn the_backtest_command_reads_a_range_of_a_topic() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    journeys(&jdir);
    let bin = env!("CARGO_BIN_EXE_waymark");
    let out = std::process::Command::new(bin)
        .args(["backtest", "--journeys"])
        .arg(&jdir)
        .args(["--brokers", "127.0.0.1:1", "--topics", "t"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--from") && err.contains("--to"), "{err}");

    let (_state, s) = setup("backtest-cli", &jdir, PARTITIONS);
    let topic = s.names.events.clone();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(waymark::kafka::ensure_topics(
            &s.names.brokers,
            &[(topic.clone(), PARTITIONS)],
            1,
            &[],
        ))
        .unwrap();
    let p = producer_on(&s.names.brokers);
    for (at, key, value) in stream() {
        let r = BaseRecord::with_opaque_to(&topic, 0)
            .key(key.as_str())
            .payload(value.as_slice())
            .timestamp(at);
        p.send(r).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(60)).unwrap();
    let fmt = |t: i64| waymark::time::format_millis(t);
    let out = std::process::Command::new(bin)
        .args(["backtest", "--json", "--journeys"])
        .arg(&jdir)
        .args(["--brokers", &s.names.brokers, "--topics", &topic])
        .args(["--from", &fmt(T0), "--to", &fmt(T0 + 48 * HOUR)])
        .output()
        .unwrap();
    let report = common::json_stdout(out);
    assert_eq!(report["lines"], json!(stream().len()));
    assert_eq!(report["journeys"][0]["journey_id"], json!("welcome"));
    assert_eq!(report["journeys"][0]["triggers"], json!(300));
}
