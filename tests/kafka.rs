//! `waymark run` against a real Kafka-protocol broker: every test starts a tansu of its own
//! (`make test` installs it) and uses its own topics, group and state directory.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::kafka::*;
use serde_json::{json, Value};
use waymark::kafka::owner_of;

/// A test's setup, on a broker of the test's own.
fn setup(test: &str, journeys: &Path, partitions: i32) -> (tempfile::TempDir, Setup) {
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

fn seed_journeys() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/journeys")
}

/// The seed scenario's events, moved in time so the first is a day from now: the wall clock then
/// fires none of their timers during the test, and Kafka and replay both fire them by event time.
fn seed_events() -> Vec<Value> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/scenario/seed-events.jsonl"),
    )
    .unwrap();
    let mut events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let time = |e: &Value| waymark::time::parse_rfc3339(e["timestamp"].as_str().unwrap()).unwrap();
    let shift = now_ms() + 86_400_000 - time(&events[0]);
    for e in &mut events {
        e["timestamp"] = json!(waymark::time::format_millis(time(e) + shift));
    }
    events
}

fn write_journey(dir: &Path, j: &Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(format!("{}.json", j["id"].as_str().unwrap())),
        j.to_string(),
    )
    .unwrap();
}

/// Records read from the output topics, as JSON values.
fn outputs(s: &Setup, at_least: usize, within: Duration) -> Vec<Value> {
    read_until(&s.names.outputs(), within, |g| g.len() >= at_least)
        .iter()
        .map(Got::json)
        .collect()
}

/// Every expected record is present; extra records are only duplicates of expected ones.
fn assert_no_loss(expected: &[Value], got: &[Value]) {
    let got_set: HashSet<String> = got.iter().map(|v| v.to_string()).collect();
    let expected_set: HashSet<String> = expected.iter().map(|v| v.to_string()).collect();
    let lost: Vec<&String> = expected_set.difference(&got_set).collect();
    let unexpected: Vec<&String> = got_set.difference(&expected_set).collect();
    assert!(
        lost.is_empty(),
        "{} record(s) lost, e.g. {:?}",
        lost.len(),
        lost.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        unexpected.is_empty(),
        "{} unexpected record(s), e.g. {:?}",
        unexpected.len(),
        unexpected.iter().take(3).collect::<Vec<_>>()
    );
}

#[test]
fn seed_scenario_through_kafka_equals_replay() {
    let (_tmp, s) = setup("seed", &seed_journeys(), 4);
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    let events = seed_events();
    // One at a time, as live traffic arrives: entries routed to another partition carry no
    // ordering promise against that user's own events, so give each a moment to land.
    for e in &events {
        produce_events(&s.names.events, std::slice::from_ref(e));
        std::thread::sleep(Duration::from_millis(400));
    }
    let expected = replay_records(&s.journeys, &events, None);
    let got = outputs(&s, expected.len(), Duration::from_secs(60));
    let (g, e) = (sorted(got.clone()), sorted(expected));
    let missing: Vec<&String> = e.iter().filter(|x| !g.contains(x)).collect();
    let extra: Vec<&String> = g.iter().filter(|x| !e.contains(x)).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && g.len() == e.len(),
        "Kafka and replay differ:\nmissing {missing:#?}\nextra {extra:#?}\n{} vs {}\n{}",
        g.len(),
        e.len(),
        a.log_text()
    );
    // Output records are keyed by user id, on the partition Kafka's default partitioner picks.
    let raw = read_until(&s.names.outputs(), Duration::from_secs(10), |g| {
        g.len() >= got.len()
    });
    for g in &raw {
        let v = g.json();
        assert_eq!(g.key.as_deref(), v["user_id"].as_str());
        assert_eq!(
            g.partition,
            owner_of(v["user_id"].as_str().unwrap(), 4),
            "{v}"
        );
    }
    assert!(a.metric_sum("waymark_entries_total", "order-journey") >= 2.0);
    assert!(a.healthy());
    let status = a.stop();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// Users named in an attribute whose state lives on other partitions, and events produced with a
/// key that does not match their user, are forwarded to the owner.
#[test]
fn entries_and_events_reach_the_partition_that_owns_the_user() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    write_journey(
        &jdir,
        &json!({
            "id": "invite", "application": "app",
            "entry": {"event": "Invite", "who": {"attribute": "targets"}},
            "steps": [
                {"id": "w", "type": "wait_for_trigger", "event": "Accept", "next": "x"},
                {"id": "x", "type": "exit"}
            ]
        }),
    );
    let (_t2, s) = setup("route", &jdir, 4);
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    let targets: Vec<u32> = (1..=40).collect();
    let t0 = 1_795_860_000_000i64;
    produce_events(
        &s.names.events,
        &[
            json!({"application": "app", "event": "Invite", "userId": "sender", "attributes": {"targets": targets}, "timestamp": t0, "eventId": "inv"}),
        ],
    );
    let entries = read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(60),
        |g| g.len() >= 40,
    );
    let users: HashSet<String> = entries
        .iter()
        .map(|g| g.json()["user_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(users.len(), 40, "every target entered once");
    assert_eq!(entries.len(), 40);
    // Accept events deliberately produced to the wrong partition: forwarded, then applied.
    let wrong: Vec<(Option<String>, Option<i32>, Vec<u8>)> = targets
        .iter()
        .map(|u| {
            let owner = owner_of(&u.to_string(), 4);
            let ev = json!({"application": "app", "event": "Accept", "userId": u, "timestamp": t0 + 1000, "eventId": format!("acc-{u}")});
            (Some("not-the-user".to_string()), Some((owner + 1) % 4), ev.to_string().into_bytes())
        })
        .collect();
    produce(&s.names.events, &wrong);
    let steps = read_until(
        std::slice::from_ref(&s.names.steps),
        Duration::from_secs(60),
        |g| g.len() >= 80,
    );
    let advanced: HashSet<String> = steps
        .iter()
        .map(Got::json)
        .filter(|v| v["type"] == "step_advance" && v["reason"] == "trigger")
        .map(|v| v["user_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        advanced.len(),
        40,
        "every forwarded Accept advanced its session"
    );
    assert!(a.metric_sum("waymark_routed_total", "") >= 40.0);
    assert!(a.stop().success());
}

fn order_journey_dir(tmp: &Path) -> PathBuf {
    let jdir = tmp.join("journeys");
    write_journey(
        &jdir,
        &json!({
            "id": "orders", "application": "app",
            "entry": {"event": "Placed", "sessions": {"multiple": {"identifier": "order"}}},
            "start": "wait",
            "steps": [
                {"id": "wait", "type": "wait_for_trigger", "event": "Ready", "timeout": "1d", "next": "notify", "on_timeout": "end"},
                {"id": "notify", "type": "action", "action": "push", "params": {"t": 1}, "next": "end"},
                {"id": "end", "type": "exit"}
            ],
            "goals": [{"id": "paid", "event": "Paid"}]
        }),
    );
    jdir
}

/// A stream of placed/ready/paid events for `users` users, `per_user` orders each.
fn order_stream(users: u32, per_user: u32) -> Vec<Value> {
    // Event times near the wall clock, so the 1d timeouts do not fire during the test.
    let t0 = now_ms();
    let mut evs = Vec::new();
    let mut i = 0i64;
    for o in 0..per_user {
        for u in 0..users {
            i += 1;
            evs.push(json!({"application": "app", "event": "Placed", "userId": u, "attributes": {"order": o}, "timestamp": t0 + i * 10, "eventId": format!("p-{u}-{o}")}));
        }
        for u in 0..users {
            i += 1;
            let name = if (u + o) % 3 == 0 { "Paid" } else { "Ready" };
            evs.push(json!({"application": "app", "event": name, "userId": u, "attributes": {"order": o}, "timestamp": t0 + i * 10, "eventId": format!("r-{u}-{o}")}));
        }
    }
    evs
}

#[test]
fn two_instances_split_partitions_and_one_carries_on_when_the_other_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let (_t2, s) = setup("pair", &jdir, 4);
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    let mut b = s.start("b");
    b.wait_ready(Duration::from_secs(60));
    // Both own partitions once the group settles.
    let mut split = false;
    for _ in 0..100 {
        let pa = a.metric_sum("waymark_partitions_assigned", "");
        let pb = b.metric_sum("waymark_partitions_assigned", "");
        if pa >= 1.0 && pb >= 1.0 && pa + pb == 4.0 {
            split = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        split,
        "partitions not split:\n{}\n{}",
        a.log_text(),
        b.log_text()
    );
    let users = 50;
    let t0 = now_ms();
    let placed: Vec<Value> = (0..users)
        .map(|u| json!({"application": "app", "event": "Placed", "userId": u, "attributes": {"order": 1}, "timestamp": t0 + u as i64, "eventId": format!("p{u}")}))
        .collect();
    produce_events(&s.names.events, &placed);
    let entries = read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(60),
        |g| g.len() >= users,
    );
    assert_eq!(entries.len(), users);
    assert!(b.stop().success(), "b exits 0 on SIGTERM");
    // a takes over b's partitions with their state and continues every session.
    let ready: Vec<Value> = (0..users)
        .map(|u| json!({"application": "app", "event": "Ready", "userId": u, "attributes": {"order": 1}, "timestamp": t0 + 100_000 + u as i64, "eventId": format!("r{u}")}))
        .collect();
    produce_events(&s.names.events, &ready);
    let steps = read_until(
        std::slice::from_ref(&s.names.steps),
        Duration::from_secs(90),
        |g| g.iter().filter(|x| x.json()["reason"] == "trigger").count() >= users,
    );
    let advanced: HashSet<String> = steps
        .iter()
        .map(Got::json)
        .filter(|v| v["reason"] == "trigger")
        .map(|v| v["user_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        advanced.len(),
        users,
        "every session continued after the move:\n{}",
        a.log_text()
    );
    let all = outputs(&s, 0, Duration::from_secs(5));
    let mut events = placed.clone();
    events.extend(ready);
    assert_no_loss(&replay_records(&jdir, &events, None), &all);
    assert!(a.stop().success());
}

/// Stops the instance mid-stream (SIGTERM or SIGKILL), restarts it, and checks that every
/// expected record arrives and extra ones are only identical duplicates.
fn crash_and_restart(signal: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let (_t2, s) = setup(&format!("crash-{}", signal.to_lowercase()), &jdir, 4);
    let events = order_stream(1000, 10);
    let expected = replay_records(&jdir, &events, None);
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    produce_events(&s.names.events, &events);
    // Let it get part of the way.
    let _ = read_until(&s.names.outputs(), Duration::from_secs(30), |g| {
        g.len() >= expected.len() / 3
    });
    if signal == "KILL" {
        a.kill9();
    } else {
        assert!(a.stop().success());
    }
    // Restart until everything is out (a dead member's partitions can stall at the broker
    // until its session times out; a fresh member then takes them).
    let mut got = Vec::new();
    let mut logs = String::new();
    for attempt in 0..4 {
        let mut b = s.start(&format!("b{attempt}"));
        b.wait_ready(Duration::from_secs(60));
        got = outputs(&s, expected.len(), Duration::from_secs(45));
        let distinct: HashSet<String> = got.iter().map(|v| v.to_string()).collect();
        let done = expected.iter().all(|e| distinct.contains(&e.to_string()));
        logs = b.log_text();
        assert!(b.stop().success());
        if done {
            break;
        }
    }
    if got.is_empty() {
        panic!("no output at all; last instance log:\n{logs}");
    }
    assert_no_loss(&expected, &got);
    // Duplicates, if any, are identical records with the same session ids: checked above by
    // comparing whole records. Count them for the log.
    let distinct: HashSet<String> = got.iter().map(|v| v.to_string()).collect();
    eprintln!(
        "{signal}: {} expected, {} read, {} duplicates",
        expected.len(),
        got.len(),
        got.len() - distinct.len()
    );
}

#[test]
fn sigterm_mid_stream_then_restart_loses_nothing() {
    crash_and_restart("TERM");
}

#[test]
fn kill_9_mid_stream_then_restart_loses_nothing() {
    crash_and_restart("KILL");
}

#[test]
fn bad_records_go_to_the_dead_letter_topic_with_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    write_journey(
        &jdir,
        &json!({
            "id": "inv", "application": "app",
            "entry": {"event": "Invite", "who": {"attribute": "targets"}},
            "steps": [{"id": "x", "type": "exit"}]
        }),
    );
    let (_t2, mut s) = setup("dlq", &jdir, 2);
    s.extra_env
        .push(("WAYMARK_PROCESSING_MAX_EVENT_BYTES".into(), "2000".into()));
    s.extra_env
        .push(("WAYMARK_PROCESSING_MAX_FUTURE_MS".into(), "86400000".into()));
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    let good = |u: u32, id: &str| {
        json!({"application": "app", "event": "Invite", "userId": u, "attributes": {"targets": [u]}, "timestamp": 1_795_860_000_000i64, "eventId": id}).to_string().into_bytes()
    };
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("not_json", b"{not json".to_vec()),
        ("not_utf8", vec![0xff, 0xfe, 0x00]),
        ("missing_field", br#"{"application":"app","event":"Invite"}"#.to_vec()),
        ("wrong_type", br#"{"application":"app","event":"Invite","userId":true}"#.to_vec()),
        ("oversize", format!(r#"{{"application":"app","event":"Invite","userId":1,"attributes":{{"pad":"{}"}}}}"#, "x".repeat(3000)).into_bytes()),
        // A year-2100 event would fire every timer of its partition: refused (max_future_ms).
        ("timestamp_in_future", br#"{"application":"app","event":"Invite","userId":1,"attributes":{"targets":[1]},"timestamp":"2100-01-01T00:00:00Z","eventId":"far"}"#.to_vec()),
        ("wrong_type", br#"{"application":"app","event":"Invite","userId":1,"timestamp":9007199254740993000}"#.to_vec()),
    ];
    // Processed for every other journey, so not a dead letter: counted as a refusal instead.
    let bad_targets = br#"{"application":"app","event":"Invite","userId":1,"attributes":{"targets":[{"id":1}]},"timestamp":1795860000000}"#.to_vec();
    let mut recs: Vec<(Option<String>, Option<i32>, Vec<u8>)> =
        vec![(Some("1".into()), Some(0), good(1, "g1"))];
    recs.push((Some("k".into()), Some(0), bad_targets.clone()));
    for (_, bytes) in &bad {
        recs.push((Some("k".into()), Some(0), bytes.clone()));
    }
    recs.push((Some("2".into()), Some(0), good(2, "g2")));
    produce(&s.names.events, &recs);
    let dlq = read_until(
        std::slice::from_ref(&s.names.dlq),
        Duration::from_secs(60),
        |g| g.len() >= bad.len(),
    );
    assert_eq!(dlq.len(), bad.len(), "{dlq:?}");
    assert!(
        !dlq.iter().any(|d| d.value == bad_targets),
        "bad_targets is no dead letter"
    );
    for (reason, bytes) in &bad {
        let d = dlq
            .iter()
            .find(|d| &d.value == bytes)
            .unwrap_or_else(|| panic!("{reason}: original bytes not in the DLQ"));
        let err = &d.headers["waymark-error"];
        assert!(err.starts_with(reason), "{reason}: header says {err}");
        assert_eq!(d.headers["waymark-source-topic"], s.names.events);
        assert_eq!(d.headers["waymark-source-partition"], "0");
        assert!(d.headers["waymark-source-offset"].parse::<i64>().is_ok());
    }
    // Nothing else was affected: both good invitations entered.
    let entries = read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(30),
        |g| g.len() >= 2,
    );
    let users: HashSet<String> = entries
        .iter()
        .map(|g| g.json()["user_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(users, HashSet::from(["1".to_string(), "2".to_string()]));
    assert_eq!(
        a.metric_sum("waymark_dead_letters_total", ""),
        bad.len() as f64
    );
    assert_eq!(
        a.metric_sum("waymark_entries_refused_total", "reason=\"bad_targets\""),
        1.0
    );
    assert!(a.stop().success());
}

#[test]
fn a_timer_fires_on_the_wall_clock_while_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    write_journey(
        &jdir,
        &json!({
            "id": "nudge", "application": "app",
            "entry": {"event": "Start"},
            "steps": [
                {"id": "pause", "type": "delay", "duration": "3s", "next": "x"},
                {"id": "x", "type": "exit"}
            ]
        }),
    );
    let (_t2, s) = setup("timer", &jdir, 2);
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    let t = now_ms();
    produce_events(
        &s.names.events,
        &[
            json!({"application": "app", "event": "Start", "userId": 7, "timestamp": t, "eventId": "s"}),
        ],
    );
    let steps = read_until(
        std::slice::from_ref(&s.names.steps),
        Duration::from_secs(30),
        |g| g.len() >= 2,
    );
    let fired_after = now_ms() - t;
    assert!(
        steps.len() >= 2,
        "the delay did not fire:\n{}",
        a.log_text()
    );
    let got = steps
        .iter()
        .find(|g| g.json()["type"] == "step_advance")
        .unwrap();
    let step = got.json();
    assert_eq!(step["reason"], "delay");
    assert_eq!(
        step["at"],
        waymark::time::format_millis(t + 3000),
        "`at` is the due time"
    );
    assert!(fired_after >= 3000, "fired before it was due");
    // The contract: once caught up, a timer fires within 1 s of its due time on the wall clock.
    // The record's CreateTime is when waymark produced it.
    let sent = got.timestamp.expect("records carry a timestamp");
    assert!(
        (t + 3000..=t + 4000).contains(&sent),
        "fired {} ms after its due time (the contract allows 0 to 1000)",
        sent - (t + 3000)
    );
    assert!(a.metric_sum("waymark_timers_fired_total", "") >= 1.0);
    let _: HashMap<(), ()> = HashMap::new();
    assert!(a.stop().success());
}

/// The wall clock is injected (`processing.clock_offset_ms`): with it a day ahead, a one-day delay
/// of an event stamped now fires at once, and its record carries the due time.
#[test]
fn an_injected_clock_fires_a_day_long_delay_now() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    write_journey(
        &jdir,
        &json!({
            "id": "tomorrow", "application": "app",
            "entry": {"event": "Start"},
            "steps": [
                {"id": "pause", "type": "delay", "duration": "1d", "next": "x"},
                {"id": "x", "type": "exit"}
            ]
        }),
    );
    let (_t2, mut s) = setup("clock", &jdir, 2);
    s.extra_env.push((
        "WAYMARK_PROCESSING_CLOCK_OFFSET_MS".into(),
        (86_400_000i64 + 60_000).to_string(),
    ));
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    let t = now_ms();
    produce_events(
        &s.names.events,
        &[
            json!({"application": "app", "event": "Start", "userId": 9, "timestamp": t, "eventId": "s"}),
        ],
    );
    let steps = read_until(
        std::slice::from_ref(&s.names.steps),
        Duration::from_secs(30),
        |g| g.len() >= 2,
    );
    let step = steps
        .iter()
        .map(Got::json)
        .find(|v| v["type"] == "step_advance")
        .unwrap_or_else(|| panic!("the delay did not fire:\n{}", a.log_text()));
    assert_eq!(step["reason"], "delay");
    assert_eq!(step["at"], waymark::time::format_millis(t + 86_400_000));
    assert!(
        now_ms() - t < 60_000,
        "fired by the injected clock, not after a day"
    );
    assert!(a.stop().success());
}

/// Every user's state lives in one partition only if the input and route topics have the same
/// partition count; waymark refuses to start, saying so, when they differ.
#[test]
fn refuses_to_start_when_partition_counts_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let (_t2, s) = setup("copart", &jdir, 2);
    // The route topic already exists with another partition count.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(waymark::kafka::ensure_topics(
        &brokers(),
        &[(s.names.events.clone(), 2), (s.names.route.clone(), 3)],
        1,
        &[],
    ))
    .unwrap();
    let mut a = s.start("a");
    let status = a.wait_exit(Duration::from_secs(60), "(it should refuse to start)");
    assert_eq!(status.code(), Some(1), "{}", a.log_text());
    let log = a.log_text();
    assert!(
        log.contains("same number of partitions") && log.contains(&s.names.route),
        "{log}"
    );
}

/// A second SIGTERM ends the process at once, without draining.
#[test]
fn a_second_signal_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let (_t2, s) = setup("twosig", &jdir, 2);
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    a.signal("TERM");
    a.signal("TERM");
    let status = a.wait_exit(Duration::from_secs(20), "after two SIGTERMs");
    // Either the first signal's drain finished first (0) or the second cut it short (130).
    assert!(matches!(status.code(), Some(0) | Some(130)), "{status}");
}

/// Live journey changes: a valid change is applied on SIGHUP (new entries use it, existing
/// sessions stay on their version); an invalid change is refused whole and the old set kept.
#[test]
fn journeys_reload_on_sighup_and_an_invalid_set_is_refused_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    let v1 = json!({"id": "j", "application": "app", "entry": {"event": "Start"},
        "steps": [{"id": "w1", "type": "wait_for_trigger", "event": "Go", "next": "x"}, {"id": "x", "type": "exit"}]});
    let v2 = json!({"id": "j", "application": "app", "entry": {"event": "Start"},
        "steps": [{"id": "w2", "type": "wait_for_trigger", "event": "Go", "next": "y"}, {"id": "y", "type": "exit"}]});
    write_journey(&jdir, &v1);
    let (_t2, s) = setup("reload", &jdir, 2);
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    let t = now_ms();
    let start = |u: &str, n: i64| json!({"application": "app", "event": "Start", "userId": u, "timestamp": t + n, "eventId": format!("s-{u}")});
    produce_events(&s.names.events, &[start("old", 0)]);
    let _ = read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(30),
        |g| !g.is_empty(),
    );
    write_journey(&jdir, &v2);
    a.signal("HUP");
    let wait_log = |needle: &str| {
        for _ in 0..100 {
            if a.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no {needle:?} in the log:\n{}", a.log_text());
    };
    wait_log("journeys reloaded");
    // An invalid set is refused whole.
    std::fs::write(jdir.join("broken.json"), r#"{"id": "broken"}"#).unwrap();
    a.signal("HUP");
    wait_log("journey reload refused");
    produce_events(&s.names.events, &[start("new", 1)]);
    let go = |u: &str, n: i64| json!({"application": "app", "event": "Go", "userId": u, "timestamp": t + n, "eventId": format!("g-{u}")});
    produce_events(&s.names.events, &[go("old", 2), go("new", 3)]);
    let steps = read_until(
        std::slice::from_ref(&s.names.steps),
        Duration::from_secs(30),
        |g| g.len() >= 4,
    );
    let moves: Vec<String> = steps
        .iter()
        .map(Got::json)
        .filter(|v| v["type"] == "step_advance")
        .map(|v| {
            format!(
                "{} {}->{}",
                v["user_id"].as_str().unwrap(),
                v["from"].as_str().unwrap(),
                v["to"].as_str().unwrap()
            )
        })
        .collect();
    assert!(moves.contains(&"old w1->x".to_string()), "{moves:?}");
    assert!(moves.contains(&"new w2->y".to_string()), "{moves:?}");
    assert!(a.stop().success());
}

/// State follows the changelog, not the disk: with its state directory deleted, an instance
/// restores every partition from the changelog and carries on from the offsets stored there. It
/// does not read the input again (no record is emitted twice), and live sessions still advance.
#[test]
fn a_deleted_state_dir_is_rebuilt_from_the_changelog() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let (_t2, s) = setup("rebuild", &jdir, 4);
    let events = order_stream(200, 1);
    let (placed, ready): (Vec<Value>, Vec<Value>) =
        events.iter().cloned().partition(|e| e["event"] == "Placed");
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    produce_events(&s.names.events, &placed);
    let first = outputs(&s, placed.len(), Duration::from_secs(60));
    assert_eq!(first.len(), placed.len(), "one entry per order");
    assert!(a.stop().success());
    std::fs::remove_dir_all(s.state_of("a")).unwrap();

    let mut b = s.start("a");
    b.wait_ready(Duration::from_secs(90));
    let restored = b.metric_sum("waymark_restore_records_total", "");
    assert!(
        restored >= placed.len() as f64,
        "restored {restored} changelog records:\n{}",
        b.log_text()
    );
    produce_events(&s.names.events, &ready);
    let expected = replay_records(&jdir, &events, None);
    let all = outputs(&s, expected.len(), Duration::from_secs(60));
    assert_no_loss(&expected, &all);
    assert_eq!(
        all.len(),
        expected.len(),
        "the input was not read again: no record twice"
    );
    assert!(b.stop().success());
}

/// One event whose outputs cannot be published (a 450 KB user id makes the session's changelog
/// record larger than a record may be) goes to the dead-letter topic as output_too_large; the
/// service stays up, its state change is not applied, and the events around it are processed.
#[test]
fn an_input_whose_outputs_are_too_large_is_dead_lettered_and_processing_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    write_journey(
        &jdir,
        &json!({
            "id": "buy", "application": "app", "entry": {"event": "Bought"},
            "steps": [{"id": "w", "type": "wait_for_trigger", "event": "Never"}]
        }),
    );
    let (_t2, s) = setup("too-large", &jdir, 2);
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    let ev = |user: &str, id: &str| {
        json!({"application": "app", "event": "Bought", "userId": user, "timestamp": now_ms(), "eventId": id})
            .to_string()
            .into_bytes()
    };
    let huge = "u".repeat(450_000);
    let big = ev(&huge, "big");
    produce(
        &s.names.events,
        &[
            (Some("1".into()), Some(0), ev("1", "before")),
            (Some("k".into()), Some(0), big.clone()),
            (Some("2".into()), Some(0), ev("2", "after")),
        ],
    );
    let dlq = read_until(
        std::slice::from_ref(&s.names.dlq),
        Duration::from_secs(60),
        |g| !g.is_empty(),
    );
    assert_eq!(
        dlq.len(),
        1,
        "{:?}",
        dlq.iter().map(|d| &d.headers).collect::<Vec<_>>()
    );
    assert_eq!(dlq[0].value, big, "the original bytes");
    assert!(
        dlq[0].headers["waymark-error"].starts_with("output_too_large"),
        "{:?}",
        dlq[0].headers
    );
    let entries = read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(60),
        |g| g.len() >= 2,
    );
    let users: HashSet<String> = entries
        .iter()
        .map(|g| g.json()["user_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        users,
        HashSet::from(["1".to_string(), "2".to_string()]),
        "no entry for the huge user"
    );
    assert!(a.is_running(), "the service stays up:\n{}", a.log_text());
    assert!(a.stop().success());
}
