//! `waymark run` against a real Kafka-protocol broker: every test starts a tansu of its own
//! (`make test` installs it) and uses its own topics, group and state directory.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::kafka::*;
use serde_json::{json, Value};
use waymark::kafka::owner_of;

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

/// `processing.threads`: one thread and several give the same records for the same input, the
/// replay's.
#[test]
fn one_and_several_processing_threads_give_the_same_records() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let events = order_stream(200, 4);
    let expected = replay_records(&jdir, &events, None);
    let mut seen: Vec<Vec<String>> = Vec::new();
    for threads in ["1", "3"] {
        let (_t, s) = setup(&format!("threads{threads}"), &jdir, 4);
        let mut a = s.start_with("a", &[("WAYMARK_PROCESSING_THREADS", threads)]);
        a.wait_ready(Duration::from_secs(60));
        if threads != "1" {
            assert!(
                a.log_text().contains(&format!(
                    "processing threads: one group member each threads={threads}"
                )),
                "{}",
                a.log_text()
            );
        }
        produce_events(&s.names.events, &events);
        let got = outputs(&s, expected.len(), Duration::from_secs(90));
        assert_no_loss(&expected, &got);
        assert_eq!(
            a.metric_sum("waymark_partitions_assigned", ""),
            4.0,
            "the threads' partitions add up"
        );
        assert!(a.stop().success());
        let mut got = sorted(got);
        got.dedup();
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1], "1 and 3 threads gave different records");
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
    two_instances_split_partitions(&[("WAYMARK_PROCESSING_THREADS", "1")]);
}

/// The same with two processing threads in each instance (four group members): the partitions
/// are split among the threads, and the survivor's threads take over the other's partitions.
#[test]
fn two_instances_of_two_threads_split_partitions_and_one_carries_on_when_the_other_stops() {
    two_instances_split_partitions(&[("WAYMARK_PROCESSING_THREADS", "2")]);
}

fn two_instances_split_partitions(env: &[(&str, &str)]) {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let (_t2, s) = setup("pair", &jdir, 4);
    let mut a = s.start_with("a", env);
    a.wait_ready(Duration::from_secs(60));
    let mut b = s.start_with("b", env);
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

/// Stops the instance (SIGTERM or SIGKILL) once a third of the output has been read, restarts
/// it, and checks that every expected record arrives and extra ones are only identical
/// duplicates. The stop comes once the output is quiet: killing a member while it produces leaves
/// tansu's group coordinator unable to assign the group again (four restarts of 90 s each, none
/// assigned, 2026-12-02; see docs/reliability.md), so the kill in the middle of a flowing stream
/// is the chaos suite's (`kill_9_rotation`, which restarts the whole group after a stall).
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
    let mut unassigned = 0;
    for attempt in 0..4 {
        let mut b = s.start(&format!("b{attempt}"));
        if !b.try_wait_ready(Duration::from_secs(90)) {
            // tansu can leave a newcomer's JoinGroup unanswered after a crash under load (and
            // its metadata requests over 10 s, measured here): as the chaos suite does, kill it,
            // wait past the session timeout and start another. Counted and printed.
            unassigned += 1;
            logs = b.log_text();
            b.kill9();
            std::thread::sleep(Duration::from_secs(8));
            continue;
        }
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
        "{signal}: {} expected, {} read, {} duplicates, {unassigned} restarts not assigned in 90 s",
        expected.len(),
        got.len(),
        got.len() - distinct.len()
    );
}

#[test]
#[ignore = "on tansu the restarted member is never assigned the group after this stop (2026-12-02, docs/reliability.md); run with --ignored against Apache Kafka"]
fn sigterm_mid_stream_then_restart_loses_nothing() {
    crash_and_restart("TERM");
}

#[test]
#[ignore = "on tansu the restarted member is never assigned the group after this stop (2026-12-02, docs/reliability.md); run with --ignored against Apache Kafka"]
fn kill_9_mid_stream_then_restart_loses_nothing() {
    crash_and_restart("KILL");
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

/// A second SIGTERM ends the process at once, without draining: exit status 130. The drain is
/// held open by the `drain_delay` failpoint, so the second signal surely arrives during it; a
/// single SIGTERM with the same delay drains and exits 0.
#[test]
fn a_second_signal_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let (_t2, s) = setup("twosig", &jdir, 2);
    let mut a = s.start_with("a", &[("WAYMARK_FAILPOINT", "drain_delay:20000")]);
    a.wait_ready(Duration::from_secs(60));
    a.signal("TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !a.log_text().contains("failpoint drain_delay") {
        assert!(std::time::Instant::now() < deadline, "{}", a.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = std::time::Instant::now();
    a.signal("TERM");
    let status = a.wait_exit(Duration::from_secs(10), "after the second SIGTERM");
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}: not at once",
        sent.elapsed()
    );
    assert!(!a.log_text().contains("stopped"), "{}", a.log_text());
    // One signal alone waits for the drain and exits cleanly.
    let mut b = s.start_with("b", &[("WAYMARK_FAILPOINT", "drain_delay:1000")]);
    b.wait_ready(Duration::from_secs(60));
    b.signal("TERM");
    let status = b.wait_exit(Duration::from_secs(30), "after one SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(b.log_text().contains("stopped"), "{}", b.log_text());
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

/// Contract section 1: without `timestamp` the Kafka record's timestamp is the event time, and
/// without `eventId` the event is named `topic/partition/offset`.
#[test]
fn missing_timestamp_and_event_id_come_from_the_kafka_record() {
    use rdkafka::producer::{BaseRecord, Producer};
    let (s, a, _, _dirs) = start_one("record-defaults", &[waiting_journey("hello", "Hello")], 1);
    let record_time = now_ms() - 3_600_000;
    let full = json!({"application": "app", "event": "Hello", "userId": "full", "timestamp": now_ms(), "eventId": "given"}).to_string();
    let bare = json!({"application": "app", "event": "Hello", "userId": "bare"}).to_string();
    let p = producer_on(&s.names.brokers);
    for (key, value) in [("full", &full), ("bare", &bare)] {
        let r = BaseRecord::with_opaque_to(&s.names.events, 0)
            .key(key)
            .payload(value.as_str())
            .partition(0)
            .timestamp(record_time);
        p.send(r).map_err(|(e, _)| e).unwrap();
        p.flush(Duration::from_secs(30)).unwrap();
    }
    p.context().check().expect("delivered");
    let entries: Vec<Value> = read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(60),
        |g| g.len() >= 2,
    )
    .iter()
    .map(Got::json)
    .collect();
    let of = |u: &str| {
        entries
            .iter()
            .find(|e| e["user_id"] == u)
            .unwrap_or_else(|| panic!("no entry of {u}: {entries:?}"))
            .clone()
    };
    let bare = of("bare");
    assert_eq!(bare["event_id"], format!("{}/0/1", s.names.events));
    assert_eq!(bare["at"], waymark::time::format_millis(record_time));
    assert_eq!(of("full")["event_id"], "given");
    assert!(a.stop().success());
}

/// `/readyz` answers 503 while the assigned partitions are restored from the changelog, and 200
/// only once they are (contract section 4, docs/operations.md). The restore is held open for two
/// seconds by the `restore_delay` failpoint, so polls surely fall within it.
#[test]
fn readyz_answers_503_while_partitions_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let (_t2, s) = setup("readyz", &jdir, 1);
    let placed: Vec<Value> = order_stream(500, 1)
        .into_iter()
        .filter(|e| e["event"] == "Placed")
        .collect();
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    produce_events(&s.names.events, &placed);
    let first = outputs(&s, placed.len(), Duration::from_secs(120));
    assert_eq!(first.len(), placed.len(), "one entry per order");
    assert!(a.stop().success());
    std::fs::remove_dir_all(s.state_of("a")).unwrap();
    // A fresh state directory: the partition is rebuilt from the changelog.
    let mut b = s.start_with("a", &[("WAYMARK_FAILPOINT", "restore_delay:2000")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (mut during, mut polls) = (0, 0);
    loop {
        assert!(
            std::time::Instant::now() < deadline && b.is_running(),
            "{}",
            b.log_text()
        );
        let before = b.log_text();
        let code = b.readyz();
        let after = b.log_text();
        polls += 1;
        if code == Some(200) {
            assert!(
                after.contains("rebalance: partitions assigned"),
                "ready before the partitions were restored:\n{after}"
            );
            break;
        }
        if before.contains("assignment received") && !after.contains("partitions assigned") {
            assert_eq!(code, Some(503), "{after}");
            during += 1;
        }
    }
    let restored = b.metric_sum("waymark_restore_records_total", "");
    eprintln!("{polls} polls, {during} of them during the restore of {restored} records");
    assert!(restored >= placed.len() as f64, "{}", b.log_text());
    assert!(during > 0, "no poll fell within the restore");
    assert!(b.stop().success());
}

/// The one record whose `at` is not derived from the input: a session ended because its journey
/// was archived carries the wall-clock instant the archiving was applied (here, a SIGHUP
/// reload), not an event time (docs/semantics.md, "Records").
#[test]
fn archived_sessions_end_at_the_wall_clock_instant_of_the_archiving() {
    let mut j = waiting_journey("j", "Start");
    let (s, a, jdir, _dirs) = start_one("archive", std::slice::from_ref(&j), 1);
    // An event a day old: its time is far from the wall clock.
    let t = now_ms() - 86_400_000;
    produce_events(
        &s.names.events,
        &[
            json!({"application": "app", "event": "Start", "userId": "u", "timestamp": t, "eventId": "s"}),
        ],
    );
    read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(60),
        |g| !g.is_empty(),
    );
    let before = now_ms();
    j["status"] = json!("archived");
    write_journey(&jdir, &j);
    a.signal("HUP");
    let steps = read_until(
        std::slice::from_ref(&s.names.steps),
        Duration::from_secs(60),
        |g| !g.is_empty(),
    );
    let after = now_ms();
    assert_eq!(steps.len(), 1);
    let exit = steps[0].json();
    assert_eq!(
        (exit["type"].as_str(), exit["reason"].as_str()),
        (Some("journey_exit"), Some("archived"))
    );
    let at = waymark::time::parse_rfc3339(exit["at"].as_str().unwrap()).unwrap();
    assert!(before <= at && at <= after, "{before} <= {at} <= {after}");
    assert!(a.stop().success());
}

/// A batch whose delivery fails in a way that may be transient is redone in-process (at_least_once):
/// the staged state is dropped, the consumer rewound, the batch processed again under a new
/// changelog writer name, and the service stays up. The outputs are the replay's (repeats
/// identical), and a state rebuilt from the changelog afterwards is right: the dropped batch's
/// changelog records, sent without their marker, are never applied.
#[test]
fn a_batch_whose_delivery_failed_is_redone_in_process() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = order_journey_dir(tmp.path());
    let (_t2, s) = setup("retry", &jdir, 2);
    let events = order_stream(300, 2);
    let (placed, ready): (Vec<Value>, Vec<Value>) =
        events.iter().cloned().partition(|e| e["event"] == "Placed");
    // With the changelog on, commit 1 is the claim; commit 2 is the first batch of work.
    let mut a = s.start_with("a", &[("WAYMARK_FAILPOINT", "fail_outputs:2")]);
    a.wait_ready(Duration::from_secs(60));
    produce_events(&s.names.events, &placed);
    let first = outputs(&s, placed.len(), Duration::from_secs(60));
    assert!(
        a.log_text().contains("failpoint fail_outputs"),
        "{}",
        a.log_text()
    );
    assert!(a.metric_sum("waymark_batch_retries_total", "") >= 1.0);
    assert!(a.is_running(), "{}", a.log_text());
    assert_no_loss(&replay_records(&jdir, &placed, None), &first);
    assert!(a.stop().success());
    // Rebuilt from the changelog alone, the sessions are the ones the replay has.
    std::fs::remove_dir_all(s.state_of("a")).unwrap();
    let mut b = s.start("a");
    b.wait_ready(Duration::from_secs(60));
    produce_events(&s.names.events, &ready);
    let expected = replay_records(&jdir, &events, None);
    let all = outputs(&s, expected.len(), Duration::from_secs(60));
    assert_no_loss(&expected, &all);
    assert!(b.stop().success());
}
