//! `waymark run` against librdkafka's mock cluster, in process: the exactly_once code paths, and
//! the at_least_once order of outputs and changelog markers (the mock can take one broker down).
//!
//! For `processing.guarantee = "exactly_once"`:
//! The mock speaks the transaction protocol (InitProducerId, AddPartitionsToTxn, TxnOffsetCommit,
//! EndTxn) and injects request errors, but writes no transaction markers: aborted records stay
//! visible to readers. So these tests check waymark's side of the contract: state and offsets move
//! only when a transaction commits, an abortable error aborts and rewinds, a commit that times out
//! is retried and never aborted, and a fenced producer stops the service. That aborted records
//! are invisible to `read_committed` consumers rests on the broker (Apache Kafka, Redpanda).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use waymark::config::Config;
use waymark::kafka::changelog::{HEADER_WRITER, MARKER_PREFIX};
use waymark::metrics::Metrics;
use waymark::store::rocks::RocksStore;
use waymark::store::State;

const PARTITIONS: i32 = 2;
const EVENTS: &str = "events";
const ENTRIES: &str = "waymark.entries";
const CHANGELOG: &str = "waymark.changelog";

struct Mock {
    cluster: MockCluster<'static, DefaultProducerContext>,
    tmp: tempfile::TempDir,
}

impl Mock {
    fn new() -> Mock {
        Mock::with_brokers(1)
    }

    /// A cluster of `brokers` brokers; every partition led by broker 1 (ids start at 1).
    fn with_brokers(brokers: i32) -> Mock {
        let cluster = MockCluster::new(brokers).unwrap();
        let topics = [
            EVENTS,
            "waymark.route",
            "waymark.changelog",
            ENTRIES,
            "waymark.steps",
            "waymark.conversions",
            "waymark.dlq",
        ];
        for t in topics {
            cluster.create_topic(t, PARTITIONS, 1).unwrap();
            for p in 0..PARTITIONS {
                cluster.partition_leader(t, p, Some(1)).unwrap();
            }
        }
        for g in ["eos", "eos-restore"] {
            cluster
                .coordinator(MockCoordinator::Group(g.to_string()), 1)
                .unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        let jdir = tmp.path().join("journeys");
        std::fs::create_dir_all(&jdir).unwrap();
        std::fs::write(
            jdir.join("welcome.json"),
            json!({
                "id": "welcome", "application": "app",
                "entry": {"event": "Signup"},
                "start": "wait",
                "steps": [
                    {"id": "wait", "type": "wait_for_trigger", "event": "Verified", "timeout": "30d", "next": "end", "on_timeout": "end"},
                    {"id": "end", "type": "exit"}
                ]
            })
            .to_string(),
        )
        .unwrap();
        Mock { cluster, tmp }
    }

    fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn config(&self, extra: &[(&str, &str)]) -> Config {
        let mut env = vec![
            ("WAYMARK_KAFKA_BROKERS".to_string(), self.brokers()),
            ("WAYMARK_KAFKA_GROUP_ID".to_string(), "eos".to_string()),
            // The cluster's topics are created up front under these names.
            (
                "WAYMARK_TOPICS_ROUTE".to_string(),
                "waymark.route".to_string(),
            ),
            (
                "WAYMARK_TOPICS_CHANGELOG".to_string(),
                CHANGELOG.to_string(),
            ),
            // Events are placed in 2030 (see `signups`).
            (
                "WAYMARK_PROCESSING_MAX_FUTURE_MS".to_string(),
                (3650u64 * 86_400_000).to_string(),
            ),
            (
                "WAYMARK_KAFKA_SESSION_TIMEOUT_MS".to_string(),
                "6000".to_string(),
            ),
            (
                "WAYMARK_STATE_DIR".to_string(),
                self.state_dir().display().to_string(),
            ),
            (
                "WAYMARK_JOURNEYS_DIR".to_string(),
                self.tmp.path().join("journeys").display().to_string(),
            ),
            (
                "WAYMARK_PROCESSING_GUARANTEE".to_string(),
                "exactly_once".to_string(),
            ),
            (
                "WAYMARK_PROCESSING_TRANSACTION_INTERVAL_MS".to_string(),
                "100".to_string(),
            ),
        ];
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        waymark::config::load(None, env, &[]).unwrap()
    }

    /// Produces `Signup` events for users `from..to` (plain producer, keyed by user).
    fn signups(&self, from: u32, to: u32) {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap();
        let t0 = 1_900_000_000_000i64;
        for u in from..to {
            let v = json!({"application": "app", "event": "Signup", "userId": u, "timestamp": t0 + u as i64, "eventId": format!("s{u}")}).to_string();
            let key = u.to_string();
            p.send(BaseRecord::to(EVENTS).key(&key).payload(&v))
                .unwrap();
        }
        p.flush(Duration::from_secs(10)).unwrap();
    }

    /// Writes records to changelog partition `p` as other writers would: (writer, key, value).
    fn write_changelog(&self, p: i32, log: &[(&str, Vec<u8>, Vec<u8>)]) {
        use rdkafka::message::{Header, OwnedHeaders};
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap();
        for (writer, k, v) in log {
            let h = OwnedHeaders::new().insert(Header {
                key: HEADER_WRITER,
                value: Some(*writer),
            });
            producer
                .send(
                    BaseRecord::to(CHANGELOG)
                        .partition(p)
                        .key(k)
                        .payload(v)
                        .headers(h),
                )
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// A value of partition `p`'s local store (meta table), read while nothing else has it open.
    fn stored_meta(&self, p: i32, key: &str) -> Option<Vec<u8>> {
        let dir = self.state_dir().join(format!("partition-{p}"));
        let state = State::new(RocksStore::open_read_only(&dir).unwrap()).unwrap();
        state.get_meta(key).unwrap()
    }

    /// Records on a topic (all partitions), aborted ones included (the mock keeps them).
    fn count(&self, topic: &str) -> i64 {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", "reader")
            .create()
            .unwrap();
        (0..PARTITIONS)
            .map(|p| {
                let (lo, hi) = c
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .unwrap();
                hi - lo
            })
            .sum()
    }

    /// The changelog so far, partition by partition in offset order: (partition, writer, key,
    /// value).
    fn changelog_records(&self) -> Vec<(i32, String, Vec<u8>, Vec<u8>)> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", "changelog-reader")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut open = 0;
        for p in 0..PARTITIONS {
            let (lo, hi) = c
                .fetch_watermarks(CHANGELOG, p, Duration::from_secs(5))
                .unwrap();
            if hi > lo {
                tpl.add_partition_offset(CHANGELOG, p, Offset::Offset(lo))
                    .unwrap();
                open += 1;
            }
        }
        let mut records = Vec::new();
        if open == 0 {
            return records;
        }
        c.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while open > 0 {
            assert!(Instant::now() < deadline, "changelog not read to its end");
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let writer = m
                        .headers()
                        .and_then(|h| h.iter().find(|x| x.key == HEADER_WRITER))
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    records.push((
                        m.partition(),
                        writer,
                        m.key().unwrap_or_default().to_vec(),
                        m.payload().unwrap_or_default().to_vec(),
                    ));
                }
                Some(Err(KafkaError::PartitionEOF(_))) => open -= 1,
                _ => {}
            }
        }
        records.sort_by_key(|r| r.0); // stable: offset order within a partition
        records
    }

    /// The changelog so far: (session changes, markers) over every partition.
    fn changelog(&self) -> (usize, usize) {
        let records = self.changelog_records();
        let markers = records
            .iter()
            .filter(|r| r.2.starts_with(MARKER_PREFIX))
            .count();
        let changes = records
            .iter()
            .filter(|r| r.2.first() == Some(&b's'))
            .count();
        (changes, markers)
    }

    /// Input offsets the local stores reached (what the transactions committed; the mock
    /// acknowledges TxnOffsetCommit without storing the offsets in the group).
    fn stored_offsets(&self) -> i64 {
        let mut n = 0;
        for p in 0..PARTITIONS {
            let dir = self.state_dir().join(format!("partition-{p}"));
            if let Ok(store) = RocksStore::open_read_only(&dir) {
                let state = State::new(store).unwrap();
                if let Some(v) = state.get_meta(&format!("offset/{EVENTS}")).unwrap() {
                    n += i64::from_be_bytes(v.try_into().unwrap());
                }
            }
        }
        n
    }

    /// Sessions in every partition's local store.
    fn sessions(&self) -> usize {
        let mut n = 0;
        for p in 0..PARTITIONS {
            let dir = self.state_dir().join(format!("partition-{p}"));
            if !dir.exists() {
                continue;
            }
            let state = State::new(RocksStore::open_read_only(&dir).unwrap()).unwrap();
            state
                .all_sessions(&mut |_, _| {
                    n += 1;
                    true
                })
                .unwrap();
        }
        n
    }
}

struct Running {
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<()>>,
}

fn start(cfg: Config) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,librdkafka=warn")
        .with_test_writer()
        .try_init();
    let journeys = Arc::new(waymark::journey::load_dir(&cfg.journeys.dir).unwrap());
    let metrics = Metrics::new();
    let shutdown = Arc::new(AtomicBool::new(false));
    let handle = {
        let (m, s) = (metrics.clone(), shutdown.clone());
        std::thread::spawn(move || {
            let r = waymark::kafka::runtime::run(
                cfg,
                journeys,
                m,
                PARTITIONS,
                s,
                Arc::new(AtomicBool::new(false)),
            );
            if let Err(e) = &r {
                eprintln!("the service stopped: {e:#}");
            }
            r
        })
    };
    Running {
        metrics,
        shutdown,
        handle,
    }
}

impl Running {
    fn txns(&self, outcome: &str) -> u64 {
        self.metrics
            .transactions
            .with_label_values(&[outcome])
            .get()
    }

    fn refused_active(&self) -> u64 {
        self.metrics
            .refused
            .with_label_values(&["welcome", "active_session"])
            .get()
    }

    fn entries(&self) -> u64 {
        self.metrics.entries.with_label_values(&["welcome"]).get()
    }

    /// Waits for `cond`; fails with `what` after `within`, or if the service stopped.
    fn wait(&self, within: Duration, what: &str, cond: impl Fn(&Running) -> bool) {
        let deadline = Instant::now() + within;
        while !cond(self) {
            assert!(
                !self.handle.is_finished(),
                "the service stopped while waiting for {what}"
            );
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        self.shutdown.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

fn wait_finished(r: &Running, within: Duration) {
    let deadline = Instant::now() + within;
    while !r.handle.is_finished() {
        assert!(Instant::now() < deadline, "the service did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn outputs_state_and_offsets_commit_together_in_transactions() {
    let m = Mock::new();
    m.signups(0, 40);
    let r = start(m.config(&[]));
    r.wait(Duration::from_secs(60), "40 entries", |r| r.entries() >= 40);
    r.wait(Duration::from_secs(30), "a committed transaction", |r| {
        r.txns("committed") >= 1
    });
    r.stop().unwrap();
    assert_eq!(m.count(ENTRIES), 40);
    assert_eq!(m.sessions(), 40, "state applied after the commit");
    assert_eq!(
        m.stored_offsets(),
        40,
        "input offsets stored with the state"
    );
    assert!(
        m.count("waymark.changelog") >= 40,
        "state changes are in the changelog"
    );
}

#[test]
fn an_abortable_error_aborts_drops_the_batch_and_rewinds() {
    let m = Mock::new();
    m.signups(0, 30);
    // waymark's first produce request fails with an error that makes the transaction abortable.
    m.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let r = start(m.config(&[("WAYMARK_KAFKA_COMMIT_TIMEOUT_MS", "2000")]));
    r.wait(Duration::from_secs(60), "an aborted transaction", |r| {
        r.txns("aborted") >= 1
    });
    r.wait(Duration::from_secs(60), "a committed transaction", |r| {
        r.txns("committed") >= 1 && r.entries() >= 30
    });
    // Wait until everything is committed, then stop.
    r.wait(Duration::from_secs(30), "offsets at the end", |_| {
        m.stored_offsets() == 30
    });
    assert_eq!(
        r.refused_active(),
        0,
        "state of the aborted batch was applied: the replayed signups found active sessions"
    );
    r.stop().unwrap();
    assert_eq!(m.sessions(), 30);
}

#[test]
fn a_commit_that_times_out_is_retried_not_aborted() {
    let m = Mock::new();
    m.signups(0, 20);
    let r = start(m.config(&[("WAYMARK_KAFKA_COMMIT_TIMEOUT_MS", "300")]));
    r.wait(Duration::from_secs(60), "a first commit", |r| {
        r.txns("committed") >= 1 && r.entries() >= 20
    });
    // The coordinator is busy: librdkafka retries EndTxn for longer than one commit may wait, so
    // waymark's commit times out and must be tried again, not aborted.
    m.cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 12],
    );
    let before = r.txns("committed");
    m.signups(20, 30);
    r.wait(Duration::from_secs(60), "a retried commit", |r| {
        r.txns("commit_retried") >= 1
    });
    r.wait(Duration::from_secs(60), "the retried commit to land", |r| {
        r.txns("committed") > before
    });
    r.wait(Duration::from_secs(30), "offsets at the end", |_| {
        m.stored_offsets() == 30
    });
    assert_eq!(r.txns("aborted"), 0, "a timed-out commit must not abort");
    r.stop().unwrap();
    assert_eq!(m.sessions(), 30);
}

#[test]
fn a_fenced_producer_stops_the_service_with_an_error() {
    let m = Mock::new();
    m.signups(0, 10);
    // One processing thread: the injected error answers one transaction's commit, and with more
    // threads another thread's transaction would commit its share of the batch.
    let cfg = m.config(&[
        ("WAYMARK_KAFKA_TRANSACTIONAL_ID", "waymark-eos-fixed"),
        ("WAYMARK_PROCESSING_THREADS", "1"),
    ]);
    let r = start(cfg);
    r.wait(Duration::from_secs(60), "the first ten committed", |r| {
        r.txns("committed") >= 1 && r.entries() >= 10
    });
    r.wait(Duration::from_secs(30), "their state", |_| {
        m.sessions() == 10
    });
    // A newer instance with the same transactional.id took over: the coordinator answers this
    // one's next commit with PRODUCER_FENCED (the mock does not fence by epoch by itself).
    m.signups(10, 20);
    m.cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    wait_finished(&r, Duration::from_secs(60));
    let fenced = r.metrics.fenced.get();
    let result = r.stop();
    let err = result.expect_err("a fenced instance must stop with an error");
    eprintln!("service error: {err:#}");
    assert!(
        err.to_string().to_lowercase().contains("fenced") || err.to_string().contains("epoch"),
        "{err:#}"
    );
    assert!(fenced >= 1);
    // Nothing of the fenced batch reached local state.
    assert_eq!(m.sessions(), 10);
}

/// at_least_once: a changelog marker makes its batch part of the state whoever restores the
/// partition next will have, and that owner resumes after the batch's inputs. So the marker must
/// not reach the broker before every output of the batch is acknowledged, or a crash in between
/// loses those outputs. Here the broker that leads the entries topic is down: the batch's
/// session changes may reach the changelog, its marker must wait until the entries are written.
#[test]
fn at_least_once_sends_a_changelog_marker_only_after_the_outputs_are_acknowledged() {
    let m = Mock::with_brokers(2);
    for p in 0..PARTITIONS {
        m.cluster.partition_leader(ENTRIES, p, Some(2)).unwrap();
    }
    let r = start(m.config(&[
        ("WAYMARK_PROCESSING_GUARANTEE", "at_least_once"),
        ("WAYMARK_PROCESSING_COMMIT_INTERVAL_MS", "100"),
    ]));
    r.wait(Duration::from_secs(60), "ready", |r| {
        r.metrics.ready_flag.load(Ordering::SeqCst)
    });
    let (_, claims) = m.changelog();
    assert_eq!(claims, PARTITIONS as usize, "one claim marker a partition");
    m.cluster.broker_down(2).unwrap();
    m.signups(0, 20);
    r.wait(Duration::from_secs(30), "the entries to be made", |r| {
        r.entries() >= 20
    });
    // The commit has begun: the session changes go out at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.changelog().0 < 20 {
        assert!(
            Instant::now() < deadline,
            "session changes not in the changelog"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let (_, markers) = m.changelog();
    assert_eq!(
        markers, claims,
        "a marker reached the changelog before the batch's outputs were acknowledged"
    );
    m.cluster.broker_up(2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.changelog().1 == claims {
        assert!(
            Instant::now() < deadline,
            "no marker after the outputs landed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        m.count(ENTRIES),
        20,
        "the outputs are written before the marker"
    );
    r.stop().unwrap();
    assert_eq!(m.sessions(), 20);
    assert_eq!(m.stored_offsets(), 20);
}

/// at_least_once pipelines its commits: while a closed batch waits for its outputs'
/// acknowledgements, the next batch is processed; but neither batch's state nor its input offsets
/// reach the local store, and no marker reaches the changelog, before its outputs are
/// acknowledged. (The bound on batches waiting, `is_full`, is unit-tested in `kafka::commit`:
/// here how the inputs fall into batches is up to the fetches, so the bound is set high.)
#[test]
fn at_least_once_processes_the_next_batch_while_the_last_waits_and_writes_neither_early() {
    let m = Mock::with_brokers(2);
    for p in 0..PARTITIONS {
        m.cluster.partition_leader(ENTRIES, p, Some(2)).unwrap();
    }
    let r = start(m.config(&[
        ("WAYMARK_PROCESSING_GUARANTEE", "at_least_once"),
        ("WAYMARK_PROCESSING_COMMIT_INTERVAL_MS", "100"),
        ("WAYMARK_PROCESSING_MAX_BATCHES_IN_FLIGHT", "64"),
    ]));
    r.wait(Duration::from_secs(60), "ready", |r| {
        r.metrics.ready_flag.load(Ordering::SeqCst)
    });
    let (_, claims) = m.changelog();
    m.cluster.broker_down(2).unwrap();
    m.signups(0, 20);
    r.wait(Duration::from_secs(30), "the first batch", |r| {
        r.entries() >= 20
    });
    // Let the first batch close, then give the next one work: it is processed although the
    // first batch's outputs are not acknowledged.
    std::thread::sleep(Duration::from_millis(500));
    m.signups(20, 40);
    r.wait(Duration::from_secs(30), "the second batch", |r| {
        r.entries() >= 40
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        m.sessions(),
        0,
        "state written before its outputs were acknowledged"
    );
    assert_eq!(
        m.stored_offsets(),
        0,
        "offsets written before their outputs were acknowledged"
    );
    assert_eq!(
        m.changelog().1,
        claims,
        "a marker before its outputs were acknowledged"
    );
    m.cluster.broker_up(2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.sessions() < 40 {
        assert!(
            Instant::now() < deadline,
            "the batches were not written once their outputs were acknowledged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    r.stop().unwrap();
    assert_eq!(m.count(ENTRIES), 40);
    assert_eq!(m.sessions(), 40);
    assert_eq!(m.stored_offsets(), 40);
}

/// A dead writer's unfinished batch is the newest record of its keys; compaction could then drop
/// the committed value under it. The partition's next owner writes the restored value again with
/// its claim, so a committed record is the newest one again.
#[test]
fn a_new_owner_rewrites_the_keys_of_a_dead_writers_unfinished_batch() {
    use waymark::kafka::changelog::{marker_key, marker_value, record_key};
    let m = Mock::new();
    let key = record_key(waymark::store::Table::Meta, b"test/k");
    m.write_changelog(
        0,
        &[
            ("w1", key.clone(), b"committed".to_vec()),
            ("w1", marker_key("w1"), marker_value(1)),
            ("w2", key.clone(), b"unfinished".to_vec()),
        ],
    );
    let r = start(m.config(&[("WAYMARK_PROCESSING_GUARANTEE", "at_least_once")]));
    r.wait(Duration::from_secs(60), "ready", |r| {
        r.metrics.ready_flag.load(Ordering::SeqCst)
    });
    r.stop().unwrap();
    let records: Vec<(String, Vec<u8>, Vec<u8>)> = m
        .changelog_records()
        .into_iter()
        .filter(|r| r.0 == 0)
        .map(|(_, w, k, v)| (w, k, v))
        .collect();
    let last = records
        .iter()
        .rposition(|(_, k, _)| *k == key)
        .expect("the key is in the changelog");
    let (writer, _, value) = &records[last];
    assert_eq!(
        value, b"committed",
        "the newest record of the key: {records:?}"
    );
    assert!(writer != "w1" && writer != "w2", "written by the new owner");
    assert!(
        records[last..]
            .iter()
            .any(|(w, k, _)| w == writer && *k == marker_key(writer)),
        "and committed by its marker"
    );
    assert_eq!(
        m.stored_meta(0, "test/k").as_deref(),
        Some(&b"committed"[..])
    );
}

/// at_least_once has no producer fence: a member paused past its session (a zombie) may write a
/// batch after a newer owner claimed its partition. Its marker then does not sit right after its
/// previous one. It must not write that batch to its local store as the changelog's next records:
/// a later restore would start past the newer owner's records and never see them (the chaos
/// zombie scenario lost records that way). It restores the partition again instead, finds the
/// newer epoch, and gives the partition up.
#[test]
fn a_member_that_finds_a_newer_owners_claim_between_its_records_gives_the_partition_up() {
    use waymark::kafka::changelog::{marker_key, marker_value, record_key, META_EPOCH};
    let m = Mock::new();
    let r = start(m.config(&[
        ("WAYMARK_PROCESSING_GUARANTEE", "at_least_once"),
        ("WAYMARK_PROCESSING_COMMIT_INTERVAL_MS", "100"),
    ]));
    r.wait(Duration::from_secs(60), "ready", |r| {
        r.metrics.ready_flag.load(Ordering::SeqCst)
    });
    m.signups(0, 10);
    r.wait(Duration::from_secs(30), "the first entries", |r| {
        r.entries() >= 10
    });
    m.write_changelog(
        0,
        &[
            (
                "newer",
                record_key(waymark::store::Table::Meta, b"test/newer"),
                b"theirs".to_vec(),
            ),
            ("newer", marker_key("newer"), marker_value(1000)),
        ],
    );
    m.signups(10, 60);
    r.wait(Duration::from_secs(30), "partition 0 given up", |r| {
        r.metrics.partitions_assigned.get() == 1
    });
    assert!(r.metrics.changelog_interleaved.get() >= 1);
    assert!(r.metrics.fenced.get() >= 1, "counted as fenced");
    r.stop().unwrap();
    assert_eq!(
        m.stored_meta(0, "test/newer").as_deref(),
        Some(&b"theirs"[..]),
        "the local store has the newer owner's records (a restore from it starts after them)"
    );
    assert_eq!(
        m.stored_meta(0, META_EPOCH),
        Some(1000u64.to_be_bytes().to_vec())
    );
}

/// The owner's side of the same race: a zombie's late batch (an older epoch) lands between the
/// owner's records. The owner restores the partition again, which leaves the zombie's batch out
/// and keeps its own, claims it again and goes on: nothing lost, nothing of the zombie's applied.
#[test]
fn an_owner_that_finds_a_zombies_batch_between_its_records_restores_and_goes_on() {
    use waymark::kafka::changelog::{marker_key, marker_value, record_key};
    let m = Mock::new();
    let r = start(m.config(&[
        ("WAYMARK_PROCESSING_GUARANTEE", "at_least_once"),
        ("WAYMARK_PROCESSING_COMMIT_INTERVAL_MS", "100"),
    ]));
    r.wait(Duration::from_secs(60), "ready", |r| {
        r.metrics.ready_flag.load(Ordering::SeqCst)
    });
    m.signups(0, 10);
    r.wait(Duration::from_secs(30), "the first entries", |r| {
        r.entries() >= 10
    });
    m.write_changelog(
        0,
        &[
            (
                "zombie",
                record_key(waymark::store::Table::Meta, b"test/zombie"),
                b"stale".to_vec(),
            ),
            ("zombie", marker_key("zombie"), marker_value(0)),
        ],
    );
    m.signups(10, 40);
    r.wait(
        Duration::from_secs(30),
        "the batch after the zombie's",
        |r| r.entries() >= 40 && r.metrics.changelog_interleaved.get() >= 1,
    );
    m.signups(40, 60);
    r.wait(
        Duration::from_secs(30),
        "entries after the new claim",
        |r| r.entries() >= 60,
    );
    assert_eq!(r.metrics.partitions_assigned.get(), 2, "both kept");
    assert_eq!(r.metrics.fenced.get(), 0);
    r.stop().unwrap();
    assert_eq!(
        m.stored_meta(0, "test/zombie"),
        None,
        "the zombie's batch is left out"
    );
    assert_eq!(m.sessions(), 60);
    assert_eq!(m.stored_offsets(), 60);
}

/// A partition given up as a zombie's is paused in the consumer; librdkafka keeps that pause
/// across a rebalance. When the group hands the partition back, it must be consumed again.
#[test]
fn a_partition_given_up_is_consumed_again_when_the_group_hands_it_back() {
    use waymark::kafka::changelog::{marker_key, marker_value};
    let m = Mock::new();
    let extra = [
        ("WAYMARK_PROCESSING_GUARANTEE", "at_least_once"),
        ("WAYMARK_PROCESSING_COMMIT_INTERVAL_MS", "100"),
    ];
    let r = start(m.config(&extra));
    r.wait(Duration::from_secs(60), "ready", |r| {
        r.metrics.ready_flag.load(Ordering::SeqCst)
    });
    m.signups(0, 10);
    r.wait(Duration::from_secs(30), "the first entries", |r| {
        r.entries() >= 10
    });
    m.write_changelog(0, &[("newer", marker_key("newer"), marker_value(1000))]);
    m.signups(10, 60);
    r.wait(Duration::from_secs(30), "partition 0 given up", |r| {
        r.metrics.partitions_assigned.get() == 1
    });
    // A second member joins and leaves: two rebalances, after which the first owns both again.
    let other = m.tmp.path().join("state-2");
    let other = other.display().to_string();
    let mut with_other: Vec<(&str, &str)> = extra.to_vec();
    with_other.push(("WAYMARK_STATE_DIR", &other));
    let r2 = start(m.config(&with_other));
    r.wait(Duration::from_secs(60), "a rebalance", |r| {
        r.metrics.rebalances.get() >= 3
    });
    r2.stop().unwrap();
    r.wait(Duration::from_secs(60), "both partitions back", |r| {
        r.metrics.partitions_assigned.get() == 2
    });
    let before = r.entries();
    m.signups(100, 200);
    r.wait(
        Duration::from_secs(60),
        "entries of users on both partitions",
        |r| r.entries() >= before + 100,
    );
    r.stop().unwrap();
}
