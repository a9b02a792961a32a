//! The chaos suite: `waymark run` instances killed, stopped, paused, moved and cut off from their
//! broker while a stream flows, then a verifier that compares every output record with what
//! `waymark replay` computes from the same events. Requires: nothing lost, nothing unexpected,
//! and duplicates only as identical records (same JSON, so the same ids).
//!
//! Short form (inside `make test`): 20k-30k events per scenario, few cycles. Full form
//! (`make chaos`, CHAOS_SCALE=full): at least 200k events per scenario, the cycle counts.
//! Each scenario prints one `chaos report:` line (and appends it to the file named by
//! CHAOS_REPORT, if set). docs/reliability.md describes the scenarios and their results.
//!
//! Instances share no disk: each has its own state directory, so a partition that moves must get
//! its state from the changelog (or, without one, by re-reading its input from the start).
//! Each scenario runs on a tansu broker of its own (sqlite storage). Everything runs under the
//! default `at_least_once` guarantee (tansu has no transactions).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::kafka::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use waymark::kafka::owner_of;

const PARTITIONS: i32 = 6;

/// The members' session timeout: 6 s in the short form; 30 s in the full form, where tansu, busy
/// writing 200k events and their outputs to sqlite, answers heartbeats later than 6 s and a
/// group with a short session loses its partitions over and over (measured here).
fn session() -> Duration {
    secs(scale(6, 30))
}

/// An incomplete partition with no output for this long is stalled: the members are restarted.
fn stall() -> Duration {
    session() + secs(30)
}
const HOUR: i64 = 3_600_000;

fn full() -> bool {
    std::env::var("CHAOS_SCALE").is_ok_and(|v| v == "full")
}

/// `short` in the short form, `full` in the full one.
fn scale<T>(short: T, full_: T) -> T {
    if full() {
        full_
    } else {
        short
    }
}

fn form() -> &'static str {
    scale("short", "full")
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ---------------------------------------------------------------------------------------------
// The stream and what replay expects of it

/// A test's journeys, events and their expected records.
struct Stream {
    tmp: tempfile::TempDir,
    journeys: PathBuf,
    events: Vec<Value>,
    expected: Vec<Value>,
}

/// The ten benchmark journeys (waits with 6h timeouts, 1h delays, goals within 1d) and `count`
/// events spread over 48 hours of event time, starting a year from now: the wall clock passes no
/// due time during the test, so `run` and `replay` both fire timers by event time only.
fn bench_stream(count: usize, seed: u64) -> Stream {
    let tmp = tempfile::tempdir().unwrap();
    let journeys = tmp.path().join("journeys");
    waymark::loadgen::write_journeys(&journeys).unwrap();
    let mut buf = Vec::new();
    let start = (now_ms() + 365 * 24 * HOUR) / HOUR * HOUR;
    let step = 48 * HOUR / count as i64;
    let users = (count / 10).max(100) as u64;
    waymark::loadgen::write_events(&mut buf, count as u64, users, seed, start, step).unwrap();
    let events: Vec<Value> = String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected = expected_records(&journeys, &events, None);
    Stream {
        tmp,
        journeys,
        events,
        expected,
    }
}

fn partition_of(user: &Value) -> i32 {
    owner_of(&waymark::event::id_text(user).unwrap(), PARTITIONS)
}

/// The records `waymark replay` computes, one partition at a time: `run` fires a partition's
/// timers by that partition's own event time, so the tail of each partition matches a replay of
/// that partition's events (a replay of all events would also fire timers due between a
/// partition's last event and the stream's last event).
fn expected_records(journeys: &Path, events: &[Value], until: Option<i64>) -> Vec<Value> {
    let mut by_part: BTreeMap<i32, Vec<Value>> = BTreeMap::new();
    for e in events {
        by_part
            .entry(partition_of(&e["userId"]))
            .or_default()
            .push(e.clone());
    }
    by_part
        .values()
        .flat_map(|evs| replay_records(journeys, evs, until))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The verifier

/// Reads the output topics as they fill and compares them with the expected records.
struct Verifier {
    reader: Reader,
    /// Expected record (its JSON text) -> its partition.
    expected: HashMap<String, i32>,
    /// How often each record was read.
    seen: HashMap<String, u32>,
    /// Expected records not read yet, per partition.
    left: Vec<usize>,
    outputs: u64,
    /// Last time any record arrived on each partition (of any output topic).
    active: Vec<Instant>,
}

impl Verifier {
    fn new(names: &Names, expected: &[Value]) -> Verifier {
        let mut v = Verifier {
            reader: Reader::new(&names.brokers, &names.outputs(), secs(60)),
            expected: HashMap::new(),
            seen: HashMap::new(),
            left: vec![0; PARTITIONS as usize],
            outputs: 0,
            active: vec![Instant::now(); PARTITIONS as usize],
        };
        v.expect(expected);
        v
    }

    /// Replaces the expected records.
    fn expect(&mut self, expected: &[Value]) {
        self.expected = expected
            .iter()
            .map(|r| (r.to_string(), partition_of(&r["user_id"])))
            .collect();
        self.left = vec![0; PARTITIONS as usize];
        for (r, p) in &self.expected {
            if !self.seen.contains_key(r) {
                self.left[*p as usize] += 1;
            }
        }
    }

    /// Reads for `d`.
    fn pump(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while let Some(wait) = until.checked_duration_since(Instant::now()) {
            let Some(g) = self.reader.poll(wait.min(Duration::from_millis(100))) else {
                continue;
            };
            self.outputs += 1;
            let text = g.json().to_string();
            if let Some(a) = self.active.get_mut(g.partition as usize) {
                *a = Instant::now();
            }
            let n = self.seen.entry(text.clone()).or_default();
            *n += 1;
            if *n == 1 {
                if let Some(p) = self.expected.get(&text) {
                    self.left[*p as usize] -= 1;
                }
            }
        }
    }

    fn missing(&self) -> usize {
        self.left.iter().sum()
    }

    /// Whether at least `fraction` of the expected records have been read.
    fn reached(&self, fraction: f64) -> bool {
        let n = self.expected.len();
        (n - self.missing()) as f64 >= fraction * n as f64
    }

    /// Reads until at least `fraction` of the expected records are in (or `within` passes).
    fn wait_for(&mut self, fraction: f64, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.reached(fraction) && Instant::now() < deadline {
            self.pump(Duration::from_millis(500));
        }
    }

    /// An incomplete partition that has had no output for `after`.
    fn stalled(&self, after: Duration) -> Option<i32> {
        (0..PARTITIONS)
            .find(|p| self.left[*p as usize] > 0 && self.active[*p as usize].elapsed() >= after)
    }

    fn touch(&mut self) {
        self.active = vec![Instant::now(); PARTITIONS as usize];
    }

    fn tally(&self) -> Tally {
        let mut t = Tally {
            expected: self.expected.len(),
            outputs: self.outputs,
            lost: self.missing(),
            ..Tally::default()
        };
        for (r, n) in &self.seen {
            if self.expected.contains_key(r) {
                t.duplicated += (*n - 1) as u64;
            } else {
                t.unexpected += *n as u64;
                if t.examples.len() < 3 {
                    t.examples.push(format!("unexpected: {r}"));
                }
            }
        }
        for r in self.expected.keys() {
            if t.examples.len() < 6 && !self.seen.contains_key(r) {
                t.examples.push(format!("lost: {r}"));
            }
        }
        t
    }

    /// How often each record read satisfies `pred` (for exactly-once checks).
    fn counts(&self, pred: impl Fn(&Value) -> bool) -> Vec<(String, u32)> {
        self.seen
            .iter()
            .filter(|(r, _)| pred(&serde_json::from_str(r).unwrap()))
            .map(|(r, n)| (r.clone(), *n))
            .collect()
    }
}

#[derive(Default, Debug)]
struct Tally {
    expected: usize,
    outputs: u64,
    lost: usize,
    unexpected: u64,
    duplicated: u64,
    examples: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The instances

/// The instances of one scenario, by tag.
struct Cluster<'a> {
    setup: &'a Setup,
    members: BTreeMap<String, (Instance, Instant)>,
    /// `waymark_restore_seconds` summed over the processes that have ended, if any reported it.
    restore: Option<f64>,
    /// Members restarted because a partition stalled.
    stall_restarts: u32,
    /// Members that exited on their own (and were started again). No scenario allows one: every
    /// crash a scenario injects is a kill the harness makes itself, so an exit is waymark's.
    exits: Vec<String>,
    /// Whether the scenario kills members: then tansu can leave a partition with a dead member
    /// until its session expires and the group restarts that `drain` makes are allowed; in the
    /// others a stalled partition is a failure.
    stalls_allowed: bool,
    /// Starts given up because the member was never assigned anything (tansu's coordinator left
    /// its JoinGroup unanswered; the member is killed and started again past the session
    /// timeout). A broker fault, reported, not failed.
    join_retries: u32,
    logs: Vec<PathBuf>,
}

/// The sum of `waymark_restore_seconds` (a histogram's `_sum`, or a gauge's samples).
fn restore_seconds(m: &str) -> Option<f64> {
    let samples = |prefix: &str| -> Option<f64> {
        let v: Vec<f64> = m
            .lines()
            .filter(|l| {
                l.strip_prefix(prefix)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!v.is_empty()).then(|| v.iter().sum())
    };
    samples("waymark_restore_seconds_sum").or_else(|| samples("waymark_restore_seconds"))
}

impl<'a> Cluster<'a> {
    fn new(setup: &'a Setup) -> Cluster<'a> {
        Cluster {
            setup,
            members: BTreeMap::new(),
            restore: None,
            stall_restarts: 0,
            exits: Vec::new(),
            stalls_allowed: false,
            join_retries: 0,
            logs: Vec::new(),
        }
    }

    /// Starts `tag` (its own state directory) without waiting for it.
    fn spawn(&mut self, tag: &str) {
        let i = self.setup.start(tag);
        self.logs.push(i.log.clone());
        self.members.insert(tag.to_string(), (i, Instant::now()));
    }

    /// Starts `tag` and waits until it is ready; a member tansu never assigns anything within
    /// 120 s is killed and started again past the session timeout (counted in `join_retries`).
    fn start(&mut self, tag: &str) {
        for _ in 0..3 {
            self.spawn(tag);
            if self.get(tag).try_wait_ready(secs(120)) {
                return;
            }
            eprintln!("chaos: {tag} was not assigned within 120 s; starting it again");
            self.join_retries += 1;
            let (i, _) = self.members.remove(tag).expect("just spawned");
            i.kill9();
            std::thread::sleep(session() + secs(2));
        }
        panic!("{tag}: not ready after three starts");
    }

    fn get(&mut self, tag: &str) -> &mut Instance {
        &mut self.members.get_mut(tag).expect("a running member").0
    }

    fn note_restore(&mut self, i: &Instance) {
        if let Some(s) = restore_seconds(&i.metrics()) {
            *self.restore.get_or_insert(0.0) += s;
        }
    }

    /// `kill -9`.
    fn kill9(&mut self, tag: &str) {
        let (i, _) = self.members.remove(tag).expect("a running member");
        self.note_restore(&i);
        i.kill9();
    }

    /// SIGTERM; a clean stop must exit 0.
    fn stop(&mut self, tag: &str) {
        let (i, _) = self.members.remove(tag).expect("a running member");
        self.note_restore(&i);
        let log = i.log.clone();
        let status = i.stop();
        assert!(
            status.success(),
            "{tag} exited {status} after SIGTERM:\n{}",
            tail(&log)
        );
    }

    /// Sum of a metric over the running members.
    fn metric(&mut self, name: &str) -> f64 {
        self.members
            .values()
            .map(|(i, _)| i.metric_sum(name, ""))
            .sum()
    }

    /// Waits until the running members own every partition between them.
    fn wait_assigned(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.metric("waymark_partitions_assigned") == PARTITIONS as f64 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }

    /// Starts again every member that exited on its own.
    fn revive(&mut self) {
        let dead: Vec<String> = self
            .members
            .iter_mut()
            .filter_map(|(t, (i, _))| i.child.try_wait().ok().flatten().map(|_| t.clone()))
            .collect();
        for tag in dead {
            let (i, _) = self.members.remove(&tag).unwrap();
            eprintln!(
                "chaos: {tag} exited on its own ({:?}); starting it again",
                i.child.id()
            );
            self.exits.push(tag.clone());
            drop(i);
            self.spawn(&tag);
        }
    }

    /// Stops every member (SIGTERM; SIGKILL if one hangs), waits past the session timeout so the
    /// group at the broker is empty, and starts them all again. tansu can keep a partition assigned
    /// to a member that died; a group that starts afresh hands every partition out again.
    fn restart_all(&mut self) {
        let tags: Vec<String> = self.members.keys().cloned().collect();
        let members = std::mem::take(&mut self.members);
        for (i, _) in members.values() {
            self.note_restore(i);
            i.signal("TERM");
        }
        let deadline = Instant::now() + secs(30);
        for (mut i, _) in members.into_values() {
            while i.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(session() + secs(2));
        self.stall_restarts += 1;
        for tag in &tags {
            self.spawn(tag);
        }
    }

    /// Reads outputs until every expected record is in, then a little longer for stragglers.
    /// Restarts members that exit, and all members when a partition stalls.
    fn drain(&mut self, v: &mut Verifier, within: Duration) {
        let deadline = Instant::now() + within;
        if self.members.is_empty() {
            self.spawn("drain");
        }
        v.touch();
        let begun = Instant::now();
        let mut said = Instant::now();
        while Instant::now() < deadline {
            v.pump(secs(1));
            if said.elapsed() >= secs(10) {
                said = Instant::now();
                eprintln!(
                    "chaos: draining for {:.0}s: {} records missing, by partition {:?}",
                    begun.elapsed().as_secs_f64(),
                    v.missing(),
                    v.left
                );
            }
            self.revive();
            if v.missing() == 0 {
                v.pump(secs(4));
                return;
            }
            if let Some(p) = v.stalled(stall()) {
                eprintln!(
                    "chaos: partition {p} stalled ({} records missing); restarting a member",
                    v.left[p as usize]
                );
                self.restart_all();
                v.touch();
            }
        }
    }

    /// Stops every member cleanly.
    fn stop_all(&mut self) {
        let tags: Vec<String> = self.members.keys().cloned().collect();
        for t in tags {
            self.stop(&t);
        }
    }

    /// The report line; then fails the test on loss or unexpected records.
    fn report(&mut self, scenario: &str, events: usize, v: &Verifier, started: Instant) -> Tally {
        let live: Vec<f64> = self
            .members
            .values()
            .filter_map(|(i, _)| restore_seconds(&i.metrics()))
            .collect();
        let restore = match (self.restore, live.is_empty()) {
            (None, true) => "n/a".to_string(),
            (r, _) => format!("{:.2}s", r.unwrap_or(0.0) + live.iter().sum::<f64>()),
        };
        let t = v.tally();
        let line = format!(
            "chaos report: scenario={scenario} form={} events={events} expected={} outputs={} \
             lost={} unexpected={} duplicated={} restore={restore} stall_restarts={} exits={} \
             join_retries={} wall={:.0}s",
            form(),
            t.expected,
            t.outputs,
            t.lost,
            t.unexpected,
            t.duplicated,
            self.stall_restarts,
            self.exits.len(),
            self.join_retries,
            started.elapsed().as_secs_f64()
        );
        eprintln!("{line}");
        if let Ok(f) = std::env::var("CHAOS_REPORT") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .unwrap();
            writeln!(f, "{line}").unwrap();
        }
        if t.lost > 0
            || t.unexpected > 0
            || !self.exits.is_empty()
            || (self.stall_restarts > 0 && !self.stalls_allowed)
        {
            let logs: String = self
                .logs
                .iter()
                .rev()
                .take(3)
                .map(|l| format!("--- {}\n{}\n", l.display(), tail(l)))
                .collect();
            panic!(
                "{scenario}: {t:?}; members that exited on their own: {:?}; group restarts \
                 after a stall: {} (allowed: {})\n{logs}",
                self.exits, self.stall_restarts, self.stalls_allowed
            );
        }
        t
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A scenario's setup, on a tansu broker of its own (fresh sqlite storage in `dir`): the shared
/// test broker's storage grows with every test run and its group coordinator slows down with it,
/// and a scenario should not measure other tests' load.
fn setup(test: &str, dir: &Path, journeys: &Path) -> (Setup, PrivateBroker) {
    let broker = PrivateBroker::start(&dir.join("broker"));
    let mut names = Names::new(test);
    names.brokers = broker.address();
    let s = Setup {
        names,
        journeys: journeys.to_path_buf(),
        state: dir.join("state"),
        partitions: PARTITIONS,
        extra_env: vec![(
            "WAYMARK_KAFKA_SESSION_TIMEOUT_MS".into(),
            session().as_millis().to_string(),
        )],
    };
    (s, broker)
}

/// The end of a scenario: waits for the producer, drains, reports (failing on loss), stops.
fn finish(
    mut c: Cluster,
    mut v: Verifier,
    producer: Option<std::thread::JoinHandle<()>>,
    scenario: &str,
    events: usize,
    started: Instant,
) -> Tally {
    if let Some(p) = producer {
        p.join().unwrap();
    }
    c.drain(&mut v, secs(scale(240, 900)));
    let t = c.report(scenario, events, &v, started);
    c.stop_all();
    t
}

// ---------------------------------------------------------------------------------------------
// The scenarios

/// Scenario 1: Three instances; one at a time is killed with SIGKILL and started again (same state
/// directory) every 2-10 s, chosen at random (seeded), while the stream flows.
#[test]
fn kill_9_rotation() {
    let started = Instant::now();
    let stream = bench_stream(scale(30_000, 200_000), 1);
    let (s, _broker) = setup("kill9", stream.tmp.path(), &stream.journeys);
    let mut c = Cluster::new(&s);
    c.stalls_allowed = true;
    for t in ["a", "b", "c"] {
        c.start(t);
    }
    eprintln!("chaos: started at {:.0}s", started.elapsed().as_secs_f64());
    let mut v = Verifier::new(&s.names, &stream.expected);
    let mut rng = StdRng::seed_from_u64(7);
    let cycles = scale(3, 20);
    let gaps: Vec<u64> = (0..cycles).map(|_| rng.gen_range(2_000..=10_000)).collect();
    let producer = produce_paced(
        &s.names.brokers,
        &s.names.events,
        &stream.events,
        Duration::from_millis(gaps.iter().sum()),
    );
    for (n, gap) in gaps.iter().enumerate() {
        v.pump(Duration::from_millis(*gap));
        let victim = ["a", "b", "c"][n % 3];
        c.revive();
        c.kill9(victim);
        c.spawn(victim);
    }
    producer.join().unwrap();
    eprintln!(
        "chaos: cycles done at {:.0}s",
        started.elapsed().as_secs_f64()
    );
    finish(c, v, None, "kill-9-rotation", stream.events.len(), started);
}

/// Scenario 2: Rebalance storm: 1 -> 2 -> 3 -> 2 -> 1 instances with clean stops (SIGTERM), twice.
#[test]
fn rebalance_storm() {
    let started = Instant::now();
    let stream = bench_stream(scale(30_000, 200_000), 2);
    let (s, _broker) = setup("storm", stream.tmp.path(), &stream.journeys);
    let mut c = Cluster::new(&s);
    c.start("a");
    let mut v = Verifier::new(&s.names, &stream.expected);
    let settle = secs(scale(3, 8));
    let producer = produce_paced(
        &s.names.brokers,
        &s.names.events,
        &stream.events,
        settle * 8 + secs(scale(10, 40)),
    );
    for _ in 0..2 {
        for step in ["+b", "+c", "-c", "-b"] {
            v.pump(settle);
            let tag = &step[1..];
            if step.starts_with('+') {
                c.start(tag);
            } else {
                c.stop(tag);
            }
        }
    }
    finish(
        c,
        v,
        Some(producer),
        "rebalance-storm",
        stream.events.len(),
        started,
    );
}

/// Scenario 3, zombie: one of three instances is paused (SIGSTOP) past its session timeout, the
/// group moves its partitions to the others (and a fourth that joins), then it resumes (SIGCONT).
/// Whatever it still emits for partitions it lost must be identical to what their new owners emit.
#[test]
fn zombie_instance() {
    let started = Instant::now();
    let stream = bench_stream(scale(30_000, 200_000), 3);
    let (s, _broker) = setup("zombie", stream.tmp.path(), &stream.journeys);
    let mut c = Cluster::new(&s);
    c.stalls_allowed = true;
    for t in ["a", "b", "c"] {
        c.start(t);
    }
    let mut v = Verifier::new(&s.names, &stream.expected);
    let producer = produce_paced(
        &s.names.brokers,
        &s.names.events,
        &stream.events,
        secs(scale(30, 90)),
    );
    v.wait_for(0.25, secs(120));
    let zombie_owned = c.get("b").metric_sum("waymark_partitions_assigned", "");
    assert!(
        zombie_owned > 0.0,
        "b owns no partition: pausing it would test nothing"
    );
    c.get("b").signal("STOP");
    // Past the session timeout. tansu expires a silent member only when the group rebalances,
    // so a new member joins: the group then drops b and gives its partitions to the others.
    v.pump(session() + secs(2));
    c.spawn("d");
    let deadline = Instant::now() + secs(90);
    let mut moved = false;
    while Instant::now() < deadline && !moved {
        let others: f64 = ["a", "c", "d"]
            .iter()
            .map(|t| c.get(t).metric_sum("waymark_partitions_assigned", ""))
            .sum();
        moved = others == PARTITIONS as f64;
        v.pump(secs(1));
    }
    let before = v.outputs;
    c.get("b").signal("CONT");
    v.pump(secs(5));
    eprintln!(
        "chaos: zombie owned {zombie_owned} partitions; group moved on: {moved}; \
         {} outputs read in the 5 s after SIGCONT",
        v.outputs - before
    );
    assert!(moved, "the group did not move on without the paused member");
    finish(c, v, Some(producer), "zombie", stream.events.len(), started);
}

/// Scenario 4: The broker (a private tansu on sqlite) is killed with SIGKILL in the middle of the stream
/// and started again on the same storage.
#[test]
fn broker_restart_mid_stream() {
    let started = Instant::now();
    let stream = bench_stream(scale(30_000, 200_000), 4);
    let (s, mut broker) = setup("broker", stream.tmp.path(), &stream.journeys);
    let mut c = Cluster::new(&s);
    c.start("a");
    c.start("b");
    let mut v = Verifier::new(&s.names, &stream.expected);
    let half = stream.events.len() / 2;
    produce_events_on(&s.names.brokers, &s.names.events, &stream.events[..half]);
    v.wait_for(0.2, secs(120));
    broker.kill();
    std::thread::sleep(secs(3));
    broker.restart();
    produce_events_on(&s.names.brokers, &s.names.events, &stream.events[half..]);
    // No member may exit: a delivery failure during the restart is retried in-process.
    c.drain(&mut v, secs(scale(240, 900)));
    c.report("broker-restart", stream.events.len(), &v, started);
    let exits = c.exits.clone();
    c.stop_all();
    assert!(
        exits.is_empty(),
        "members exited during a broker restart: {exits:?}"
    );
}

/// Scenario 5: An instance is killed, its whole local state directory deleted while it is down, and it
/// starts again: its partitions' state is rebuilt and the outputs are unchanged.
#[test]
fn state_dir_deleted_while_down() {
    let started = Instant::now();
    let stream = bench_stream(scale(30_000, 200_000), 5);
    let (s, _broker) = setup("wipe", stream.tmp.path(), &stream.journeys);
    let mut c = Cluster::new(&s);
    c.stalls_allowed = true;
    c.start("a");
    c.start("b");
    assert!(
        c.wait_assigned(session() * 2 + secs(30)),
        "partitions not assigned"
    );
    let mut v = Verifier::new(&s.names, &stream.expected);
    let producer = produce_paced(
        &s.names.brokers,
        &s.names.events,
        &stream.events,
        secs(scale(15, 60)),
    );
    for round in 0..scale(1, 3) {
        v.wait_for(0.3 * (round + 1) as f64, secs(120));
        let owned = c.get("b").metric_sum("waymark_partitions_assigned", "");
        c.kill9("b");
        let dir = s.state_of("b");
        let parts = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert!(
            owned > 0.0 && parts > 0,
            "b owned {owned} partitions and had {parts} partition dirs: deleting them tests nothing"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        eprintln!(
            "chaos: deleted {} ({parts} partition dirs; b owned {owned})",
            dir.display()
        );
        c.start("b");
    }
    finish(
        c,
        v,
        Some(producer),
        "state-dir-deleted",
        stream.events.len(),
        started,
    );
}

/// Scenario 6: A crash after a batch's outputs are acknowledged but before its state and offsets
/// are stored anywhere (failpoint `crash_before_changelog:N`: neither the changelog nor the local
/// store has the batch); started again without the failpoint, the batch is processed again and
/// every record, entries included, is emitted (again, identical).
#[test]
fn crash_between_acks_and_offsets() {
    let t = crash_after_acks("crash-before-changelog", true, "crash_before_changelog");
    assert!(
        t.duplicated > 0,
        "the crashed batch's outputs are emitted again on restart"
    );
}

/// Scenario 6, later crash point (`crash_after_acks:N`): the batch's changelog records and marker
/// were acknowledged with its outputs, so on restart the batch is restored from the changelog,
/// not redone.
#[test]
fn crash_after_the_changelog_is_acknowledged() {
    let t = crash_after_acks("crash-after-acks", true, "crash_after_acks");
    assert_eq!(
        t.duplicated, 0,
        "the crashed batch is restored from the changelog, not redone"
    );
}

/// Scenario 6 without the changelog: the crashed batch's inputs are processed again from the local
/// offsets, and its outputs are emitted again, identical.
#[test]
fn crash_between_acks_and_offsets_without_changelog() {
    let t = crash_after_acks("crash-after-acks-no-changelog", false, "crash_after_acks");
    assert!(
        t.duplicated > 0,
        "the crashed batch's outputs are emitted again on restart"
    );
}

fn crash_after_acks(scenario: &str, changelog: bool, failpoint: &str) -> Tally {
    let started = Instant::now();
    let stream = bench_stream(scale(20_000, 200_000), 6);
    let (mut s, _broker) = setup("failpoint", stream.tmp.path(), &stream.journeys);
    if !changelog {
        s.extra_env
            .push(("WAYMARK_STATE_CHANGELOG".into(), "false".into()));
    }
    // One closed batch at a time: with more, the batches after the crashed one have published
    // outputs too (they are processed while it waits), and their repeats would hide whether the
    // crashed batch itself was redone.
    s.extra_env.push((
        "WAYMARK_PROCESSING_MAX_BATCHES_IN_FLIGHT".into(),
        "1".into(),
    ));
    let expire = session() + secs(3);
    let mut c = Cluster::new(&s);
    // The whole stream is there before the first crashing start, so every run has work to crash
    // in; a first clean start and stop creates the topics.
    c.start("a");
    c.stop("a");
    produce_events_on(&s.names.brokers, &s.names.events, &stream.events);
    let mut v: Option<Verifier> = None;
    // The failpoint counts the commits of one process; later runs crash on their first commit (so
    // they make no progress at all).
    for n in 0..scale(2, 4) {
        // With the changelog on, a process's first commit is its claim (no inputs): the first
        // crash lets one batch of work through; without, the first commit is already work.
        let first = if changelog { 2 } else { 1 };
        let fp = format!("{failpoint}:{}", if n == 0 { first } else { 1 });
        if n > 0 {
            // A crashed member never leaves the group: start the next one after its session has
            // expired, or tansu may hand the newcomer nothing and not rebalance again.
            std::thread::sleep(expire);
        }
        let mut i = s.start_with("a", &[("WAYMARK_FAILPOINT", fp.as_str())]);
        c.logs.push(i.log.clone());
        let status = i.wait_exit(secs(120), &format!("at the failpoint {fp}"));
        assert!(
            !status.success(),
            "{fp}: exited {status}, not a crash:\n{}",
            i.log_text()
        );
        let at = i.log_text();
        let at = at
            .lines()
            .find(|l| l.contains("failpoint crash"))
            .unwrap_or("");
        assert!(
            !at.is_empty(),
            "{fp}: the process exited ({status}) but not at the failpoint:\n{}",
            i.log_text()
        );
        eprintln!("chaos: {fp}: crashed ({status}): {at}");
        let v = v.get_or_insert_with(|| Verifier::new(&s.names, &stream.expected));
        v.pump(secs(1));
    }
    let mut v = v.unwrap();
    std::thread::sleep(expire);
    c.spawn("a");
    // The crashed runs' outputs may already hold every expected record: wait until the last run
    // has caught up with the stream (no lag on any partition), so its repeats are counted.
    let deadline = Instant::now() + secs(scale(120, 900));
    let events_topic = format!("topic=\"{}\"", s.names.events);
    loop {
        let metrics = c.get("a").metrics();
        let lags: Vec<f64> = metrics
            .lines()
            .filter(|l| l.starts_with("waymark_consumer_lag") && l.contains(&events_topic))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if lags.len() == PARTITIONS as usize && lags.iter().all(|&x| x == 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last run did not catch up with the stream (lag {lags:?}):\n{}",
            tail(&c.get("a").log)
        );
        v.pump(Duration::from_millis(500));
    }
    finish(c, v, None, scenario, stream.events.len(), started)
}

/// The timer journey: a wait with a short timeout, then a short delay.
fn timer_journeys(dir: &Path, timeout_s: u64, delay_s: u64) -> PathBuf {
    let jdir = dir.join("journeys");
    std::fs::create_dir_all(&jdir).unwrap();
    let j = json!({
        "id": "timers", "application": "app",
        "entry": {"event": "Start"},
        "start": "wait",
        "steps": [
            {"id": "wait", "type": "wait_for_trigger", "event": "Go",
             "timeout": format!("{timeout_s}s"), "next": "pause", "on_timeout": "pause"},
            {"id": "pause", "type": "delay", "duration": format!("{delay_s}s"), "next": "end"},
            {"id": "end", "type": "exit"}
        ]
    });
    std::fs::write(jdir.join("timers.json"), j.to_string()).unwrap();
    jdir
}

/// Scenario 7: Timers across downtime: sessions enter, the instances stop before any timer is due, stay
/// down past every due time, and start again (`move_to_fresh`: a new instance with an empty
/// state directory takes the partitions). Each timeout and delay fires exactly once.
fn timers_across_downtime(scenario: &str, move_to_fresh: bool) {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (timeout_s, delay_s) = scale((10, 5), (60, 20));
    let jdir = timer_journeys(tmp.path(), timeout_s, delay_s);
    let (s, _broker) = setup(scenario, tmp.path(), &jdir);
    let mut c = Cluster::new(&s);
    c.start("a");
    c.start("b");
    assert!(
        c.wait_assigned(session() * 2 + secs(30)),
        "partitions not assigned"
    );
    // Users start, a third say Go a second later; the rest of the stream is noise no journey
    // reads. All within two seconds of event time from now.
    let (count, users) = scale((20_000usize, 2_000usize), (200_000, 20_000));
    let t0 = now_ms();
    let events: Vec<Value> = (0..count)
        .map(|i| {
            let t = t0 + (i as i64 * 2000) / count as i64;
            let (name, user) = if i < users {
                ("Start", i)
            } else if i < users + users / 3 {
                ("Go", (i - users) * 3)
            } else {
                ("PageView", i % users)
            };
            json!({"application": "app", "event": name, "userId": user, "timestamp": t, "eventId": format!("e{i}")})
        })
        .collect();
    // Before any due time: entries and the Go moves only.
    let mut v = Verifier::new(&s.names, &expected_records(&jdir, &events, None));
    produce_events_on(&s.names.brokers, &s.names.events, &events);
    v.wait_for(1.0, secs(timeout_s));
    let before = v.tally();
    assert_eq!(
        before.lost, 0,
        "entries not all out before the first due time"
    );
    c.stop_all();
    let first_due = t0 + timeout_s as i64 * 1000;
    assert!(
        now_ms() < first_due,
        "stopped {} ms after the first due time: too slow to test downtime",
        now_ms() - first_due
    );
    // Down past every due time.
    let last_due = t0 + 2000 + (timeout_s + delay_s) as i64 * 1000;
    std::thread::sleep(Duration::from_millis(
        (last_due - now_ms() + 2000).max(0) as u64
    ));
    if move_to_fresh {
        c.start("fresh");
    } else {
        c.start("a");
        c.start("b");
    }
    let expected = expected_records(&jdir, &events, Some(now_ms()));
    let timers = expected
        .iter()
        .filter(|r| matches!(r["reason"].as_str(), Some("timeout" | "delay")))
        .count();
    v.expect(&expected);
    c.drain(&mut v, secs(scale(120, 600)));
    c.report(scenario, events.len(), &v, started);
    let fired = v.counts(|r| matches!(r["reason"].as_str(), Some("timeout" | "delay")));
    let twice: Vec<&(String, u32)> = fired.iter().filter(|(_, n)| *n != 1).collect();
    eprintln!(
        "chaos: {scenario}: {timers} timer records expected, {} distinct fired, {} more than once",
        fired.len(),
        twice.len()
    );
    assert_eq!(fired.len(), timers);
    assert!(
        twice.is_empty(),
        "timers fired more than once: {:?}",
        &twice[..twice.len().min(3)]
    );
    c.stop_all();
}

#[test]
fn timers_fire_once_after_downtime() {
    timers_across_downtime("timers-downtime", false);
}

#[test]
fn timers_fire_once_after_a_partition_move() {
    timers_across_downtime("timers-moved", true);
}
