//! Profiles through a real broker (issue 11): a profile topic joined like a table, `profile.`
//! conditions, records read on the wrong partition forwarded to their owner, dead letters, and
//! erasure (sessions end with `reason: "erased"`, `waymark inspect` finds nothing, and a restore
//! from the changelog brings nothing back).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::kafka::*;
use serde_json::{json, Value};
use waymark::kafka::owner_of;

const PARTITIONS: i32 = 4;

fn journey() -> Value {
    json!({
      "id": "pro-welcome", "application": "app",
      "entry": { "event": "Login", "conditions": [
          { "attribute": "profile.plan", "operator": "eq", "value": "pro" } ] },
      "steps": [
        { "id": "w", "type": "wait_for_trigger", "event": "Purchase", "timeout": "3d" }
      ]
    })
}

fn inspect(state: &Path, user: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_waymark"))
        .args(["inspect", "--state"])
        .arg(state)
        .args(["--user", user])
        .output()
        .unwrap();
    common::json_stdout(out)
}

fn wait_metric(a: &Instance, name: &str, at_least: f64, within: Duration) {
    let start = Instant::now();
    while a.metric_sum(name, "") < at_least {
        assert!(
            start.elapsed() < within,
            "{name} stayed at {} (want {at_least}):\n{}",
            a.metric_sum(name, ""),
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn profile_record(user: &str, attributes: Value, at: &str) -> Vec<u8> {
    json!({"application": "app", "userId": user, "attributes": attributes, "timestamp": at})
        .to_string()
        .into_bytes()
}

#[test]
fn profiles_gate_entries_and_an_erasure_removes_the_user_for_good() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    write_journey(&jdir, &journey());
    let (_state, mut s) = setup("profiles", &jdir, PARTITIONS);
    let profiles = format!("profiles-{}", s.names.group);
    s.extra_env
        .push(("WAYMARK_KAFKA_PROFILE_TOPICS".into(), profiles.clone()));
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));

    // A day ahead, so the wall clock fires no timer during the test.
    let day = now_ms() + 86_400_000;
    let at = |min: i64| waymark::time::format_millis(day + min * 60_000);
    let users: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    // Even users are pro. Every third record is produced to a partition that does not own its
    // user: it must be forwarded to the owner.
    let mut records = Vec::new();
    let mut replay_lines: Vec<Value> = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let plan = if i % 2 == 0 { "pro" } else { "free" };
        let value = profile_record(u, json!({"plan": plan, "name": u}), &at(0));
        let owner = owner_of(u, PARTITIONS);
        let partition = if i % 3 == 0 {
            (owner + 1) % PARTITIONS
        } else {
            owner
        };
        records.push((Some(u.clone()), Some(partition), value.clone()));
        let mut line: Value = serde_json::from_slice(&value).unwrap();
        line["type"] = json!("profile");
        replay_lines.push(line);
    }
    // Bad records: dead letters, and nothing else happens.
    let bad: [&[u8]; 3] = [
        b"not json",
        br#"{"application": "app", "userId": "user-0"}"#,
        br#"{"application": "app", "userId": "user-0", "attributes": {"plan": "free"}, "erase": true}"#,
    ];
    for b in bad {
        records.push((Some("user-0".into()), Some(0), b.to_vec()));
    }
    produce(&profiles, &records);
    wait_metric(
        &a,
        "waymark_profile_updates_total",
        12.0,
        Duration::from_secs(60),
    );
    wait_metric(
        &a,
        "waymark_dead_letters_total",
        3.0,
        Duration::from_secs(30),
    );
    assert_eq!(a.metric_sum("waymark_profiles_stored", ""), 12.0);

    let logins: Vec<Value> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            json!({"application": "app", "event": "Login", "userId": u,
                   "timestamp": at(1), "eventId": format!("login-{i}")})
        })
        .collect();
    produce_events(&s.names.events, &logins);
    replay_lines.extend(logins.iter().cloned());
    let entries = outputs(&s, 6, Duration::from_secs(60));
    let mut entered: Vec<&str> = entries
        .iter()
        .map(|r| r["user_id"].as_str().unwrap())
        .collect();
    entered.sort();
    assert_eq!(
        entered,
        ["user-0", "user-10", "user-2", "user-4", "user-6", "user-8"],
        "only pro users enter"
    );

    // Erase two users with sessions (one read on a partition that does not own it) and one
    // without any.
    let erase =
        |u: &str| json!({"application": "app", "userId": u, "erase": true, "timestamp": at(2)});
    let wrong = (owner_of("user-2", PARTITIONS) + 1) % PARTITIONS;
    produce(
        &profiles,
        &[
            (
                Some("user-0".into()),
                None,
                erase("user-0").to_string().into_bytes(),
            ),
            (
                Some("user-2".into()),
                Some(wrong),
                erase("user-2").to_string().into_bytes(),
            ),
            (
                Some("user-1".into()),
                None,
                erase("user-1").to_string().into_bytes(),
            ),
        ],
    );
    for u in ["user-0", "user-2", "user-1"] {
        let mut e = erase(u);
        e["type"] = json!("profile");
        replay_lines.push(e);
    }
    let all = outputs(&s, 8, Duration::from_secs(60));
    let mut exits: Vec<(String, String)> = all
        .iter()
        .filter(|r| r["type"] == "journey_exit")
        .map(|r| {
            (
                r["user_id"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    exits.sort();
    assert_eq!(
        exits,
        [
            ("user-0".to_string(), "erased".to_string()),
            ("user-2".to_string(), "erased".to_string())
        ]
    );
    wait_metric(&a, "waymark_erasures_total", 3.0, Duration::from_secs(30));
    assert_eq!(a.metric_sum("waymark_profiles_stored", ""), 9.0);
    // Run and replay agree record for record on this interleaving.
    let expected = replay_records(&jdir, &replay_lines, None);
    assert_eq!(
        sorted(all.clone()),
        sorted(expected),
        "run and replay differ"
    );
    assert!(a.stop().success());

    let state = s.state_of("a");
    for u in ["user-0", "user-1", "user-2"] {
        let v = inspect(&state, u);
        assert_eq!(v["sessions"], json!([]), "{u}: {v}");
        assert_eq!(v["profile"], json!([]), "{u}: {v}");
        assert_eq!(v["history"], json!([]), "{u}: {v}");
    }
    let kept = inspect(&state, "user-4");
    assert_eq!(kept["profile"][0]["attributes"]["plan"], "pro", "{kept}");
    assert_eq!(kept["sessions"].as_array().unwrap().len(), 1, "{kept}");

    // Rebuilt from the changelog alone: the erased users stay gone, the others come back.
    std::fs::remove_dir_all(&state).unwrap();
    let mut b = s.start("a");
    b.wait_ready(Duration::from_secs(90));
    assert_eq!(
        b.metric_sum("waymark_profiles_stored", ""),
        9.0,
        "{}",
        b.log_text()
    );
    assert!(b.stop().success());
    for u in ["user-0", "user-1", "user-2"] {
        let v = inspect(&state, u);
        assert_eq!(
            (&v["sessions"], &v["profile"]),
            (&json!([]), &json!([])),
            "{u} came back from the changelog: {v}"
        );
    }
    let kept = inspect(&state, "user-4");
    assert_eq!(kept["profile"][0]["attributes"]["name"], "user-4", "{kept}");
    assert_eq!(kept["sessions"].as_array().unwrap().len(), 1, "{kept}");
}

#[test]
fn a_profile_topic_of_another_size_stops_the_service() {
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    write_journey(&jdir, &journey());
    let (_state, mut s) = setup("profiles-size", &jdir, PARTITIONS);
    let profiles = format!("profiles-{}", s.names.group);
    // The profile topic exists with 2 partitions, the inputs get 4.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(waymark::kafka::ensure_topics(
        &brokers(),
        &[(s.names.events.clone(), PARTITIONS), (profiles.clone(), 2)],
        1,
        &[],
    ))
    .unwrap();
    s.extra_env
        .push(("WAYMARK_KAFKA_PROFILE_TOPICS".into(), profiles.clone()));
    let mut a = s.start("a");
    let status = a.wait_exit(Duration::from_secs(60), "(it should refuse to start)");
    assert_eq!(status.code(), Some(1), "{}", a.log_text());
    let log = a.log_text();
    assert!(
        log.contains(&format!("{profiles} has 2 partitions")),
        "the error names the topic:\n{log}"
    );
}
