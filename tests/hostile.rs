//! Hostile input through the running service (`waymark run` against a broker of the test's own):
//! each bad record lands in the dead-letter topic with its reason or is refused and counted, the
//! service stays up, and the records after it are processed. `docs/reliability.md` lists each
//! input with the test that shows it.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::kafka::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::json;

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

/// One event whose outputs cannot be published (a 450 KB user id makes the session's changelog
/// record larger than a record may be) goes to the dead-letter topic as output_too_large; the
/// service stays up, its state change is not applied, and the events around it are processed.
#[test]
fn an_input_whose_outputs_are_too_large_is_dead_lettered_and_processing_goes_on() {
    let (s, mut a, _, _dirs) = start_one("too-large", &[waiting_journey("buy", "Bought")], 2);
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

/// One event naming 20,000 users in its `who` attribute (over `processing.max_targets`, default
/// 1,000) enters nobody into that journey (refusal `too_many_targets`), while another journey on
/// the same event still sees it; the service stays up with a bounded peak memory, and the next
/// event is processed.
#[test]
fn an_event_naming_too_many_users_enters_nobody_and_the_service_goes_on() {
    let mut invite = waiting_journey("invite", "Invite");
    invite["entry"]["who"] = json!({"attribute": "to"});
    let (s, mut a, _, _dirs) =
        start_one("targets", &[invite, waiting_journey("sender", "Invite")], 2);
    let to: Vec<String> = (0..20_000).map(|i| format!("t{i}")).collect();
    let t = now_ms();
    let events = [
        json!({"application": "app", "event": "Invite", "userId": "mass", "attributes": {"to": to}, "timestamp": t, "eventId": "mass"}),
        json!({"application": "app", "event": "Invite", "userId": "next", "attributes": {"to": ["friend"]}, "timestamp": t + 1, "eventId": "next"}),
    ];
    produce_events(&s.names.events, &events);
    let entries = read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(60),
        |g| g.len() >= 3,
    );
    let got: HashSet<(String, String)> = entries
        .iter()
        .map(|g| {
            let v = g.json();
            (
                v["journey_id"].as_str().unwrap().to_string(),
                v["user_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: HashSet<(String, String)> =
        [("sender", "mass"), ("sender", "next"), ("invite", "friend")]
            .iter()
            .map(|(j, u)| (j.to_string(), u.to_string()))
            .collect();
    assert_eq!(got, want, "nobody of the 20,000 entered; the rest did");
    assert_eq!(
        a.metric_sum(
            "waymark_entries_refused_total",
            "reason=\"too_many_targets\""
        ),
        1.0
    );
    assert!(a.is_running(), "{}", a.log_text());
    let peak = a.peak_rss();
    eprintln!("peak RSS after a 20,000-target event: {} MiB", peak >> 20);
    assert!(peak < 1 << 30, "peak RSS {} MiB", peak >> 20);
    assert!(a.stop().success());
}

/// A dead letter's offset is committed like any other: an instance killed after the bad record
/// went to the DLQ and its batch was committed does not dead-letter it again when it restarts.
#[test]
fn a_dead_letter_is_not_sent_again_after_a_restart() {
    let (s, a, _, _dirs) = start_one("dlq-restart", &[waiting_journey("hello", "Hello")], 1);
    produce(
        &s.names.events,
        &[(Some("k".into()), Some(0), b"{broken".to_vec())],
    );
    let dlq = read_until(
        std::slice::from_ref(&s.names.dlq),
        Duration::from_secs(60),
        |g| !g.is_empty(),
    );
    assert_eq!(dlq.len(), 1);
    // The batch is committed once the instance is idle; give it that moment, then crash.
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.metric_sum("waymark_consumer_lag", &s.names.events) != 0.0 {
        assert!(Instant::now() < deadline, "{}", a.metrics());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    a.kill9();
    let mut b = s.start("a");
    b.wait_ready(Duration::from_secs(60));
    let hello = json!({"application": "app", "event": "Hello", "userId": "u", "timestamp": now_ms(), "eventId": "h"});
    produce_events(&s.names.events, &[hello]);
    let entries = read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(60),
        |g| !g.is_empty(),
    );
    assert_eq!(entries.len(), 1, "the restarted instance processes");
    assert_eq!(b.metric_sum("waymark_dead_letters_total", ""), 0.0);
    let dlq = read_until(
        std::slice::from_ref(&s.names.dlq),
        Duration::from_secs(5),
        |_| true,
    );
    assert_eq!(dlq.len(), 1, "the bad record was dead-lettered once");
    assert!(b.stop().success());
}

/// A raw changelog record: key, value (`None`: a tombstone), writer.
type RawRecord<'a> = (Vec<u8>, Option<Vec<u8>>, &'a str);

/// Sends raw records to `topic` with a writer header, as a changelog record would carry.
fn send_changelog(brokers: &str, topic: &str, records: &[RawRecord]) {
    let p = producer_on(brokers);
    for (key, value, writer) in records {
        let headers = OwnedHeaders::new().insert(Header {
            key: "waymark-writer",
            value: Some(*writer),
        });
        let mut r = BaseRecord::with_opaque_to(topic, 0)
            .key(key.as_slice())
            .partition(0)
            .headers(headers);
        if let Some(v) = value {
            r = r.payload(v.as_slice());
        }
        p.send(r).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
    p.context().check().expect("delivered");
}

/// Records on the changelog that do not decode (a key without a table tag, a marker whose value
/// is not JSON) are skipped and counted by the restore, which goes on: the sessions of the
/// records around them are restored and the instance serves.
#[test]
fn corrupt_changelog_records_are_skipped_and_counted() {
    let mut hello = waiting_journey("hello", "Hello");
    hello["steps"] = json!([{"id": "w", "type": "wait_for_trigger", "event": "Bye", "next": "x"},
                            {"id": "x", "type": "exit"}]);
    let (s, a, _, _dirs) = start_one("corrupt-changelog", &[hello], 1);
    let ev = |name: &str, id: &str| json!({"application": "app", "event": name, "userId": "u", "timestamp": now_ms(), "eventId": id});
    produce_events(&s.names.events, &[ev("Hello", "h")]);
    read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(60),
        |g| !g.is_empty(),
    );
    assert!(a.stop().success());
    send_changelog(
        &s.names.brokers,
        &s.names.changelog,
        &[
            (Vec::new(), Some(b"x".to_vec()), "intruder"),
            (b"?".to_vec(), Some(b"x".to_vec()), "intruder"),
            (
                b"\xffwaymark-commit/intruder".to_vec(),
                Some(b"not json".to_vec()),
                "intruder",
            ),
        ],
    );
    // A fresh state directory: everything comes from the changelog.
    let mut b = s.start("b");
    b.wait_ready(Duration::from_secs(60));
    assert_eq!(
        b.metric_sum("waymark_changelog_corrupt_records_total", ""),
        3.0,
        "{}",
        b.log_text()
    );
    assert!(b.log_text().contains("skipping a changelog record"));
    // The restored session is there: Bye moves it on.
    produce_events(&s.names.events, &[ev("Bye", "b")]);
    let steps = read_until(
        std::slice::from_ref(&s.names.steps),
        Duration::from_secs(60),
        |g| !g.is_empty(),
    );
    assert!(
        steps.iter().any(|g| g.json()["from"] == "w"),
        "{:?}",
        steps.iter().map(Got::json).collect::<Vec<_>>()
    );
    assert!(b.stop().success());
}

/// Two deployments (consumer groups) pointed at one changelog topic would restore each other's
/// sessions: the second refuses to start and says what to change.
#[test]
fn a_changelog_written_by_another_group_is_refused() {
    let (s, a, _, _dirs) = start_one("other-group", &[waiting_journey("hello", "Hello")], 1);
    let hello = json!({"application": "app", "event": "Hello", "userId": "u", "timestamp": now_ms(), "eventId": "h"});
    produce_events(&s.names.events, &[hello]);
    read_until(
        std::slice::from_ref(&s.names.entries),
        Duration::from_secs(60),
        |g| !g.is_empty(),
    );
    assert!(a.stop().success());
    let mut names = s.names.clone();
    names.group = format!("{}-staging", s.names.group);
    let other = Setup {
        names,
        journeys: s.journeys.clone(),
        state: s.state.clone(),
        partitions: s.partitions,
        extra_env: Vec::new(),
    };
    let mut b = other.start("b");
    let status = b.wait_exit(Duration::from_secs(90), "on another group's changelog");
    assert!(!status.success(), "{status}");
    let log = b.log_text();
    assert!(
        log.contains(&format!("{:?}", s.names.group)) && log.contains("topics.changelog"),
        "{log}"
    );
}
