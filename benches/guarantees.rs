//! `make bench-guarantees`: what the changelog and exactly-once cost, side by side in one run.
//!
//! Each configuration runs `waymark run`'s runtime in process against a fresh librdkafka mock
//! cluster (it supports transactions; the test broker tansu does not) over the same pre-produced
//! stream (`waymark loadgen`'s ten journeys, ~30% of events touching one), from offset 0 until
//! every input record is consumed and committed. Prints events/s per configuration.
//! `BENCH_EVENTS` sets the stream length (default 200000; the mock keeps only about 25k records
//! per partition, so more than that per partition is dropped from the log's start and the run
//! stalls, which the stall check reports).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use waymark::metrics::Metrics;

const PARTITIONS: i32 = 8;

struct Run {
    name: &'static str,
    guarantee: &'static str,
    changelog: bool,
    commit_interval_ms: u64,
}

fn events(count: u64) -> Vec<(String, String)> {
    let mut buf = Vec::new();
    waymark::loadgen::write_events(&mut buf, count, count / 2, 7, 1_900_000_000_000, 50).unwrap();
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["userId"].to_string(), l.to_string())
        })
        .collect()
}

fn produce(cluster: &MockCluster<'static, DefaultProducerContext>, evs: &[(String, String)]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "2000000")
        .create()
        .unwrap();
    for (k, v) in evs {
        let mut r = BaseRecord::to("events").key(k).payload(v);
        loop {
            match p.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    p.poll(Duration::from_millis(10));
                    r = back;
                }
            }
        }
    }
    p.flush(Duration::from_secs(120)).unwrap();
}

fn run_one(run: &Run, evs: &[(String, String)], journeys: &std::path::Path) -> f64 {
    let cluster = MockCluster::new(1).unwrap();
    for t in [
        "events",
        "waymark.route",
        "waymark.changelog",
        "waymark.entries",
        "waymark.steps",
        "waymark.conversions",
        "waymark.dlq",
    ] {
        cluster.create_topic(t, PARTITIONS, 1).unwrap();
    }
    produce(&cluster, evs);
    let state = tempfile::tempdir().unwrap();
    let env = vec![
        ("WAYMARK_KAFKA_BROKERS", cluster.bootstrap_servers()),
        ("WAYMARK_KAFKA_GROUP_ID", "bench".to_string()),
        ("WAYMARK_TOPICS_ROUTE", "waymark.route".to_string()),
        ("WAYMARK_TOPICS_CHANGELOG", "waymark.changelog".to_string()),
        // The events are placed in 2030.
        (
            "WAYMARK_PROCESSING_MAX_FUTURE_MS",
            (3650u64 * 86_400_000).to_string(),
        ),
        ("WAYMARK_STATE_DIR", state.path().display().to_string()),
        ("WAYMARK_JOURNEYS_DIR", journeys.display().to_string()),
        ("WAYMARK_PROCESSING_GUARANTEE", run.guarantee.to_string()),
        ("WAYMARK_STATE_CHANGELOG", run.changelog.to_string()),
        (
            "WAYMARK_PROCESSING_COMMIT_INTERVAL_MS",
            run.commit_interval_ms.to_string(),
        ),
        (
            "WAYMARK_PROCESSING_TRANSACTION_INTERVAL_MS",
            run.commit_interval_ms.to_string(),
        ),
    ];
    let cfg =
        waymark::config::load(None, env.into_iter().map(|(k, v)| (k.to_string(), v)), &[]).unwrap();
    let set = Arc::new(waymark::journey::load_dir(journeys).unwrap());
    let metrics = Metrics::new();
    let shutdown = Arc::new(AtomicBool::new(false));
    let handle = {
        let (m, s) = (metrics.clone(), shutdown.clone());
        std::thread::spawn(move || {
            waymark::kafka::runtime::run(
                cfg,
                set,
                m,
                PARTITIONS,
                s,
                Arc::new(AtomicBool::new(false)),
            )
        })
    };
    let consumed = || -> u64 {
        (0..PARTITIONS)
            .map(|p| {
                metrics
                    .events_consumed
                    .with_label_values(&["events", &p.to_string()])
                    .get()
            })
            .sum()
    };
    while !metrics.is_ready() {
        assert!(!handle.is_finished(), "the runtime stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    let (mut last, mut moved) = (0, Instant::now());
    while consumed() < evs.len() as u64 {
        assert!(!handle.is_finished(), "the runtime stopped");
        let now = consumed();
        if now != last {
            (last, moved) = (now, Instant::now());
        }
        if moved.elapsed() >= Duration::from_secs(60) {
            eprintln!("{}", metrics.render());
        }
        assert!(
            moved.elapsed() < Duration::from_secs(60),
            "{}: no progress for 60 s at {now} of {} events",
            run.name,
            evs.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Counted once everything consumed is committed: stop drains and commits.
    shutdown.store(true, Ordering::SeqCst);
    handle.join().unwrap().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    evs.len() as f64 / secs
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let n: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let tmp = tempfile::tempdir().unwrap();
    let journeys = tmp.path().join("journeys");
    waymark::loadgen::write_journeys(&journeys).unwrap();
    let evs = events(n);
    let runs = [
        Run {
            name: "at_least_once, changelog off",
            guarantee: "at_least_once",
            changelog: false,
            commit_interval_ms: 500,
        },
        Run {
            name: "at_least_once, changelog on",
            guarantee: "at_least_once",
            changelog: true,
            commit_interval_ms: 500,
        },
        Run {
            name: "exactly_once, changelog on (commit 500 ms)",
            guarantee: "exactly_once",
            changelog: true,
            commit_interval_ms: 500,
        },
        Run {
            name: "exactly_once, changelog on (commit 100 ms)",
            guarantee: "exactly_once",
            changelog: true,
            commit_interval_ms: 100,
        },
    ];
    println!("{n} events, {PARTITIONS} partitions, librdkafka mock cluster, one instance");
    println!("{:<46} {:>12}", "configuration", "events/s");
    for run in &runs {
        let rate = run_one(run, &evs, &journeys);
        println!("{:<46} {:>12.0}", run.name, rate);
    }
}
