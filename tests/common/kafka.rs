//! A harness for tests against a real Kafka-protocol broker: unique topics and groups per test,
//! `waymark run` instances as child processes, producing and reading records.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use waymark::kafka::runtime::Delivery;

/// The broker the calling test uses: its own (see [`own_broker`]), or else the shared one that
/// `make test` starts and names in WAYMARK_TEST_BROKERS.
pub fn brokers() -> String {
    if let Some(b) = OWN_BROKER.with(|b| b.borrow().as_ref().map(|o| o.broker.address())) {
        return b;
    }
    std::env::var("WAYMARK_TEST_BROKERS").expect(
        "WAYMARK_TEST_BROKERS is not set: these tests need a Kafka-protocol broker; run them with `make test`",
    )
}

/// A broker of one test's own, with its storage directory (dropped after the broker).
struct OwnBroker {
    broker: PrivateBroker,
    _dir: tempfile::TempDir,
}

thread_local! {
    static OWN_BROKER: std::cell::RefCell<Option<OwnBroker>> = const { std::cell::RefCell::new(None) };
}

/// Starts a tansu broker (fresh sqlite storage) for the calling test: from now on [`brokers`]
/// names it on this test's thread, and it stops when the test ends. A shared broker's storage
/// grows with every test, and tansu slows down with it (metadata requests that took over 10 s,
/// groups that never assigned, measured here); a test should not pay for the ones before it.
pub fn own_broker() {
    let dir = tempfile::tempdir().unwrap();
    let broker = PrivateBroker::start(dir.path());
    OWN_BROKER.with(|b| *b.borrow_mut() = Some(OwnBroker { broker, _dir: dir }));
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Where one test's data lives: the broker, and topic names and a group unique to the test.
#[derive(Clone, Debug)]
pub struct Names {
    pub brokers: String,
    pub events: String,
    pub entries: String,
    pub steps: String,
    pub conversions: String,
    pub dlq: String,
    pub route: String,
    pub changelog: String,
    pub group: String,
}

impl Names {
    pub fn new(test: &str) -> Names {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let s = format!("{test}-{}-{n}-{t}", std::process::id());
        Names {
            brokers: brokers(),
            events: format!("ev-{s}"),
            entries: format!("entries-{s}"),
            steps: format!("steps-{s}"),
            conversions: format!("conv-{s}"),
            dlq: format!("dlq-{s}"),
            route: format!("route-{s}"),
            changelog: format!("changelog-{s}"),
            group: format!("g-{s}"),
        }
    }

    pub fn outputs(&self) -> Vec<String> {
        vec![
            self.entries.clone(),
            self.steps.clone(),
            self.conversions.clone(),
        ]
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `waymark run` process.
pub struct Instance {
    pub tag: String,
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

/// How a test runs its instances. Instances share no disk: each tag has its own state directory
/// under `state` (reused when the same tag starts again), so a partition that moves to another
/// instance finds no local state there.
pub struct Setup {
    pub names: Names,
    pub journeys: PathBuf,
    pub state: PathBuf,
    pub partitions: i32,
    pub extra_env: Vec<(String, String)>,
}

impl Setup {
    /// The state directory of the instance named `tag`.
    pub fn state_of(&self, tag: &str) -> PathBuf {
        self.state.join(tag)
    }

    pub fn start(&self, tag: &str) -> Instance {
        self.start_with(tag, &[])
    }

    /// Starts the instance `tag` with `env` on top of [`Setup::extra_env`] (for this start only).
    pub fn start_with(&self, tag: &str, env: &[(&str, &str)]) -> Instance {
        let port = free_port();
        std::fs::create_dir_all(&self.state).unwrap();
        let log = self
            .state
            .parent()
            .unwrap()
            .join(format!("waymark-{tag}-{port}.log"));
        let n = &self.names;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_waymark"));
        cmd.arg("run")
            .arg("--brokers")
            .arg(&n.brokers)
            .arg("--group-id")
            .arg(&n.group)
            .arg("--input-topics")
            .arg(&n.events)
            .arg("--state-dir")
            .arg(self.state_of(tag))
            .arg("--journeys-dir")
            .arg(&self.journeys)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .env("WAYMARK_TOPICS_ENTRIES", &n.entries)
            .env("WAYMARK_TOPICS_STEPS", &n.steps)
            .env("WAYMARK_TOPICS_CONVERSIONS", &n.conversions)
            .env("WAYMARK_TOPICS_DLQ", &n.dlq)
            .env("WAYMARK_TOPICS_ROUTE", &n.route)
            .env("WAYMARK_TOPICS_CHANGELOG", &n.changelog)
            .env("WAYMARK_KAFKA_PARTITIONS", self.partitions.to_string())
            .env("WAYMARK_KAFKA_SESSION_TIMEOUT_MS", "6000")
            // The suites place events days to a year ahead so the wall clock fires none of their
            // timers: allow that (the dead-letter test sets the default back).
            .env(
                "WAYMARK_PROCESSING_MAX_FUTURE_MS",
                (400u64 * 86_400_000).to_string(),
            )
            .env("WAYMARK_LOG", "info,waymark::kafka::runtime=debug")
            .env_remove("WAYMARK_TEST_BROKERS")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn waymark run");
        Instance {
            tag: tag.to_string(),
            child,
            port,
            log,
        }
    }
}

impl Instance {
    fn http(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        Some((code, body))
    }

    pub fn metrics(&self) -> String {
        self.http("/metrics").map(|x| x.1).unwrap_or_default()
    }

    pub fn ready(&self) -> bool {
        self.http("/readyz").is_some_and(|x| x.0 == 200)
    }

    /// The status code of `GET /readyz`, if the endpoint answers.
    pub fn readyz(&self) -> Option<u16> {
        self.http("/readyz").map(|x| x.0)
    }

    /// Peak resident memory of the process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    pub fn healthy(&self) -> bool {
        self.http("/healthz").is_some_and(|x| x.0 == 200)
    }

    /// Sum of a metric's samples (all label sets) whose line contains `filter`.
    pub fn metric_sum(&self, name: &str, filter: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Whether the instance became ready within `within` (panics if it exited).
    pub fn try_wait_ready(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("waymark exited early ({status}):\n{}", self.log_text());
            }
            if self.ready() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("waymark exited early ({status}):\n{}", self.log_text());
            }
            if self.ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("waymark not ready within {within:?}:\n{}", self.log_text());
    }

    /// Whether the process is still running (has not exited by itself).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(40), "after SIGTERM")
    }

    /// Waits for the process to exit; kills it and fails the test after `within`.
    pub fn wait_exit(&mut self, within: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("waymark did not exit {what}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn producer() -> BaseProducer<Delivery> {
    producer_on(&brokers())
}

pub fn producer_on(brokers: &str) -> BaseProducer<Delivery> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create_with_context(Delivery::default())
        .unwrap()
}

/// Produces values keyed by their `userId` (or with an explicit key / partition).
pub fn produce(topic: &str, records: &[(Option<String>, Option<i32>, Vec<u8>)]) {
    produce_on(&brokers(), topic, records)
}

pub fn produce_on(brokers: &str, topic: &str, records: &[(Option<String>, Option<i32>, Vec<u8>)]) {
    send_with(&producer_on(brokers), topic, records);
}

/// Sends `records` with `p`, then waits until the broker has acknowledged every one.
pub fn send_with(
    p: &BaseProducer<Delivery>,
    topic: &str,
    records: &[(Option<String>, Option<i32>, Vec<u8>)],
) {
    for (key, partition, value) in records {
        let mut r = BaseRecord::with_opaque_to(topic, 0).payload(value.as_slice());
        if let Some(k) = key {
            r = r.key(k.as_str());
        }
        if let Some(part) = partition {
            r = r.partition(*part);
        }
        loop {
            match p.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    p.poll(Duration::from_millis(20));
                    r = back;
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
    p.context().check().expect("every record delivered");
}

/// Produces JSON events keyed by userId.
pub fn produce_events(topic: &str, events: &[serde_json::Value]) {
    produce_events_on(&brokers(), topic, events)
}

pub fn produce_events_on(brokers: &str, topic: &str, events: &[serde_json::Value]) {
    send_events_with(&producer_on(brokers), topic, events);
}

/// Sends JSON events keyed by userId with `p` and waits for their acknowledgements.
pub fn send_events_with(p: &BaseProducer<Delivery>, topic: &str, events: &[serde_json::Value]) {
    let recs: Vec<(Option<String>, Option<i32>, Vec<u8>)> = events
        .iter()
        .map(|e| {
            let key = waymark::event::id_text(&e["userId"]);
            (key, None, e.to_string().into_bytes())
        })
        .collect();
    send_with(p, topic, &recs);
}

/// A record read back.
#[derive(Debug, Clone)]
pub struct Got {
    pub topic: String,
    pub partition: i32,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
    /// The record's timestamp (CreateTime: when the producer sent it), epoch ms.
    pub timestamp: Option<i64>,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).unwrap()
    }
}

/// Reads `topics` from the beginning until `done(records)` holds or `within` passes; returns
/// everything read.
pub fn read_until(topics: &[String], within: Duration, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
    read_until_on(&brokers(), topics, within, done)
}

pub fn read_until_on(
    brokers: &str,
    topics: &[String],
    within: Duration,
    done: impl Fn(&[Got]) -> bool,
) -> Vec<Got> {
    let deadline = Instant::now() + within;
    let r = Reader::new(brokers, topics, within);
    let mut got = Vec::new();
    let mut last = Instant::now();
    while Instant::now() < deadline {
        if let Some(g) = r.poll(Duration::from_millis(100)) {
            last = Instant::now();
            got.push(g);
        } else if last.elapsed() >= Duration::from_millis(1500) && done(&got) {
            // Quiet for a moment and the condition holds: nothing more is on its way.
            break;
        }
    }
    got
}

/// A consumer of every partition of some topics, from the beginning, outside any group.
pub struct Reader {
    consumer: BaseConsumer,
}

impl Reader {
    /// Waits up to `within` for the topics to exist, then assigns all their partitions.
    pub fn new(brokers: &str, topics: &[String], within: Duration) -> Reader {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set(
                "group.id",
                format!("reader-{}", COUNTER.fetch_add(1, Ordering::SeqCst)),
            )
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let deadline = Instant::now() + within;
        // Topics may not exist yet.
        let mut tpl = TopicPartitionList::new();
        while Instant::now() < deadline {
            let Ok(md) = c.fetch_metadata(None, Duration::from_secs(5)) else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            tpl = TopicPartitionList::new();
            let mut found = 0;
            for t in md.topics() {
                if topics.iter().any(|x| x == t.name()) && !t.partitions().is_empty() {
                    found += 1;
                    for p in t.partitions() {
                        tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning)
                            .unwrap();
                    }
                }
            }
            if found == topics.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        c.assign(&tpl).unwrap();
        Reader { consumer: c }
    }

    /// The next record, if one arrives within `timeout`.
    pub fn poll(&self, timeout: Duration) -> Option<Got> {
        let m = self.consumer.poll(timeout)?.ok()?;
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for x in h.iter() {
                headers.insert(
                    x.key.to_string(),
                    x.value
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default(),
                );
            }
        }
        Some(Got {
            topic: m.topic().to_string(),
            partition: m.partition(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            value: m.payload().unwrap_or(&[]).to_vec(),
            timestamp: m.timestamp().to_millis(),
            headers,
        })
    }
}

/// The records `waymark replay` computes for these events, as JSON values.
pub fn replay_records(
    journeys: &Path,
    events: &[serde_json::Value],
    until: Option<i64>,
) -> Vec<serde_json::Value> {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("events.jsonl");
    std::fs::write(
        &f,
        events.iter().map(|e| format!("{e}\n")).collect::<String>(),
    )
    .unwrap();
    let (out, _) = super::run_replay(journeys, &f, until, None);
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Multiset of JSON values, as sorted strings.
pub fn sorted(values: impl IntoIterator<Item = serde_json::Value>) -> Vec<String> {
    let mut v: Vec<String> = values.into_iter().map(|x| x.to_string()).collect();
    v.sort();
    v
}

/// A tansu broker of a test's own (sqlite storage in a directory of its own), for a test that
/// stops and restarts the broker without disturbing the shared one.
pub struct PrivateBroker {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts tansu on a free port with its data in `dir`; waits until it answers.
    pub fn start(dir: &Path) -> PrivateBroker {
        std::fs::create_dir_all(dir).unwrap();
        let mut b = PrivateBroker {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
        };
        b.restart();
        b
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    fn answers(&self) -> bool {
        Command::new("tansu")
            .args(["topic", "list", "--broker", &self.url()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts the broker again on the same storage (after [`PrivateBroker::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .unwrap();
        let child = Command::new("tansu")
            .arg("broker")
            .arg("--listener-url")
            .arg(self.url())
            .arg("--advertised-listener-url")
            .arg(self.url())
            .arg("--storage-engine")
            .arg("sqlite://tansu.db")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu is installed (`make broker` installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.answers() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("private broker on {} not ready", self.address());
    }

    /// SIGKILL: the broker stops at once, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Produces `events` in chunks spread evenly over `over`, on a thread of its own.
pub fn produce_paced(
    brokers: &str,
    topic: &str,
    events: &[serde_json::Value],
    over: Duration,
) -> std::thread::JoinHandle<()> {
    let (brokers, topic, events) = (brokers.to_string(), topic.to_string(), events.to_vec());
    std::thread::spawn(move || {
        let p = producer_on(&brokers);
        let started = Instant::now();
        let chunks = (over.as_millis() / 250).max(1) as usize;
        let size = events.len().div_ceil(chunks).max(1);
        for (i, chunk) in events.chunks(size).enumerate() {
            let due = started + over.mul_f64(i as f64 / chunks as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            send_events_with(&p, &topic, chunk);
        }
    })
}

/// A test's setup, on a broker of the test's own: topics, group and state directory unique to
/// the test.
pub fn setup(test: &str, journeys: &Path, partitions: i32) -> (tempfile::TempDir, Setup) {
    own_broker();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let s = Setup {
        names: Names::new(test),
        journeys: journeys.to_path_buf(),
        state,
        partitions,
        extra_env: Vec::new(),
    };
    (tmp, s)
}

/// Writes a journey definition into `dir` as `<id>.json`.
pub fn write_journey(dir: &Path, j: &serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(format!("{}.json", j["id"].as_str().unwrap())),
        j.to_string(),
    )
    .unwrap();
}

/// Records read from the output topics, as JSON values.
pub fn outputs(s: &Setup, at_least: usize, within: Duration) -> Vec<serde_json::Value> {
    read_until(&s.names.outputs(), within, |g| g.len() >= at_least)
        .iter()
        .map(Got::json)
        .collect()
}

/// A journey `id` of application `app`, entered on `event`, whose sessions wait for an event that
/// never comes.
pub fn waiting_journey(id: &str, event: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id, "application": "app", "entry": {"event": event},
        "steps": [{"id": "w", "type": "wait_for_trigger", "event": "Never"}]
    })
}

/// The temporary directories of a test started by [`start_one`] (journeys, state, logs).
pub type Dirs = (tempfile::TempDir, tempfile::TempDir);

/// Writes `journeys` to a fresh directory, sets up a test with `partitions` partitions on a broker
/// of its own, and starts instance `a`, ready. Returns the setup, the instance, the journeys
/// directory and the directories to keep while the test runs.
pub fn start_one(
    test: &str,
    journeys: &[serde_json::Value],
    partitions: i32,
) -> (Setup, Instance, PathBuf, Dirs) {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    for j in journeys {
        write_journey(&jdir, j);
    }
    let (state, s) = setup(test, &jdir, partitions);
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    (s, a, jdir, (tmp, state))
}
