//! The `waymark` binary's commands as a user runs them: exit codes and messages.

use std::path::Path;
use std::process::Command;

fn waymark(args: &[&str]) -> (i32, String, String) {
    waymark_env(args, &[])
}

/// Like [`waymark`], with these environment variables set (values may be any OS string).
fn waymark_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_waymark"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("WAYMARK_TEST_BROKERS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_accepts_the_shipped_journeys() {
    let (code, out, _) = waymark(&["validate", "config/journeys"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("ok: 10 journey(s) and 1 application policy(ies)"),
        "{out}"
    );
}

#[test]
fn validate_reports_every_problem_with_file_and_path_and_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("a.json"),
        r#"{"id": "a", "application": "x", "entry": {"event": "E"},
            "steps": [{"id": "s", "type": "delay", "duration": "soon", "next": "nowhere"}]}"#,
    )
    .unwrap();
    std::fs::write(tmp.path().join("b.json"), "{ not json").unwrap();
    std::fs::write(
        tmp.path().join("c.json"),
        r#"{"id": "a", "application": "x", "entry": {"event": "E", "availability": {"start_date": "2026-12-24", "end_date": "2026-12-01", "timezone": "Europe/Nowhere"}}, "steps": [{"id": "x", "type": "exit"}]}"#,
    )
    .unwrap();
    let (code, _, err) = waymark(&["validate", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    for needle in [
        "a.json: $.steps[0].duration",
        "a.json: $.steps[0].next: unknown step id \"nowhere\"",
        "b.json: $: not valid JSON",
        "c.json: $.entry.availability.timezone: unknown IANA timezone",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
}

#[test]
fn replay_reports_malformed_lines_with_their_number_and_goes_on() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/edge-malformed-lines");
    let (code, out, err) = waymark(&[
        "replay",
        "--journeys",
        dir.join("journeys").to_str().unwrap(),
        "--events",
        dir.join("events.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(err.contains("line 1: not JSON"), "{err}");
    assert!(err.contains("line 2: missing field"), "{err}");
    assert!(err.contains("line 3: wrong type"), "{err}");
    assert_eq!(out.lines().count(), 6, "{out}");
}

#[test]
fn replay_refuses_invalid_journeys_and_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("bad.json"), r#"{"id": 1}"#).unwrap();
    let (code, _, err) = waymark(&[
        "replay",
        "--journeys",
        tmp.path().to_str().unwrap(),
        "--events",
        "/dev/null",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bad.json"), "{err}");
    let (code, _, err) = waymark(&["replay", "--events", "/dev/null", "--until", "tomorrow"]);
    assert_ne!(code, 0);
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, err) = waymark(&["replay", "--events", "/no/such/file.jsonl"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/no/such/file.jsonl"), "{err}");
}

#[test]
fn run_refuses_bad_config_naming_every_key() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("w.toml");
    std::fs::write(
        &f,
        "[kafka]\nbrokerz = \"x\"\n[metrics]\naddr = \"nowhere\"\n",
    )
    .unwrap();
    let (code, _, err) = waymark(&["run", "--config", f.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("kafka.brokerz"), "{err}");
    assert!(err.contains("metrics.addr"), "{err}");
}

#[test]
fn run_refuses_invalid_journeys() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("bad.json"), r#"{"id": "x"}"#).unwrap();
    let (code, _, err) = waymark(&[
        "run",
        "--journeys-dir",
        tmp.path().to_str().unwrap(),
        "--brokers",
        "127.0.0.1:1",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("refusing to start") && err.contains("bad.json"),
        "{err}"
    );
}

#[test]
fn inspect_prints_a_users_sessions_and_journeys_lists_the_set() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (code, _, err) = waymark(&[
        "replay",
        "--journeys",
        "config/journeys",
        "--events",
        "config/scenario/seed-events.jsonl",
        "--state",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = waymark(&[
        "inspect",
        "--state",
        state.to_str().unwrap(),
        "--user",
        "456",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["user_id"], "456");
    let sessions = v["sessions"].as_array().unwrap();
    // 456's gift session ended, the referral session ended on its purchase: nothing is left but
    // what the seed scenario leaves open.
    for s in sessions {
        assert!(s["journey_id"].is_string() && s["step"].is_string(), "{s}");
    }
    let (code, out, _) = waymark(&[
        "inspect",
        "--state",
        state.to_str().unwrap(),
        "--user",
        "123",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let post = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["journey_id"] == "post-purchase")
        .expect("the second post-purchase session is open");
    assert_eq!(post["step"], "wait-a-day");
    assert_eq!(post["timer"], "2026-12-03T10:00:00.000Z");
    assert_eq!(post["context"]["tier"], "gold");

    let (code, out, _) = waymark(&["journeys", "config/journeys"]);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let journeys: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j.get("policy_for").is_none())
        .collect();
    let ids: Vec<&str> = journeys.iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 10);
    assert!(ids.contains(&"order-journey"));
    assert!(journeys
        .iter()
        .all(|j| j["status"] == "active" && j["version"].as_str().unwrap().len() == 16));
}

#[test]
fn validate_names_every_mistake_in_journey_controls_and_policies() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures-invalid/controls");
    let (code, _, err) = waymark(&["validate", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    for needle in [
        "a.json: $.entry.reentry: reentry must be",
        "a.json: $.entry.max_entries: max_entries must be an integer >= 1",
        "a.json: $.steps[0].event: a wait step has either",
        "a.json: $.steps[0].branches[0].next: unknown step id \"nowhere\"",
        "a.json: $.steps[0].branches[1].id: duplicate branch id \"b\"",
        "a.json: $.steps[0].branches[1].match: match must be \"any\" or \"all\"",
        "a.json: $.steps[0].branches[1].events: a branch lists 1 to 4 events, found 0",
        "a.json: $.steps[1].variants[1].id: duplicate variant id \"v\"",
        "a.json: $.steps[1].variants: the variants' weights sum to 0",
        "a.json: $.steps[2].ignore_caps: ignore_caps applies to action steps only",
        "a.json: $.exit_on[0]: missing field \"event\"",
        "a.json: $.holdout.percent: percent must be a number from 0 to 100 with at most two decimals",
        "a.json: $.quiet_hours.start: start must be a local time as HH:MM",
        "p1.json: $.default_timezone: unknown IANA timezone \"Nowhere/City\"",
        "p1.json: $.quiet_hours.end: quiet hours start and end are both 08:00",
        "p1.json: $.frequency_caps[0].max: max must be an integer >= 0",
        "p1.json: $.frequency_caps[0].per: per must be \"day\" or \"week\"",
        "p3.json: $.policy_for: a second policy for application \"app\", also in",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
}

#[test]
fn journeys_lists_policies_after_the_journeys() {
    let (code, out, err) = waymark(&["journeys", "config/journeys"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let last = v.as_array().unwrap().last().unwrap();
    assert_eq!(last["policy_for"], "shop-demo");
    assert_eq!(last["quiet_hours"]["start"], "21:00");
    assert_eq!(last["frequency_caps"][0]["per"], "day");
}

#[test]
fn replay_skips_a_line_that_is_not_utf8_and_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join("events.jsonl");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"{\"application\":\"XXXXX-XXXXX\",\"event\":\"CheckoutSuccess\",\"userId\":1,\"timestamp\":\"2026-11-28T10:00:00Z\"}\n");
    bytes.extend_from_slice(b"{\"application\":\"XXXXX-XXXXX\",\"event\":\"\xff\xfe\"}\n");
    bytes.extend_from_slice(b"{\"application\":\"XXXXX-XXXXX\",\"event\":\"CheckoutSuccess\",\"userId\":2,\"timestamp\":\"2026-11-28T10:01:00Z\"}\n");
    std::fs::write(&events, bytes).unwrap();
    let (code, out, err) = waymark(&[
        "replay",
        "--journeys",
        "config/journeys",
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("line 2: not valid UTF-8"), "{err}");
    assert!(out.contains("\"user_id\":\"1\""), "{out}");
    assert!(
        out.contains("\"user_id\":\"2\""),
        "the line after the bad one is processed: {out}"
    );
}

#[test]
fn client_properties_reach_the_clients_and_secrets_are_never_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("password");
    std::fs::write(&pw, "s3cr3t-pass\n").unwrap();
    let f = tmp.path().join("w.toml");
    std::fs::write(
        &f,
        format!(
            "[kafka]\nbrokers = \"127.0.0.1:1\"\n[kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.username\" = \"svc-user\"\n\"sasl.password_file\" = {:?}\n[metrics]\naddr = \"127.0.0.1:0\"\n",
            pw.to_str().unwrap()
        ),
    )
    .unwrap();
    let state = tmp.path().join("state");
    // The mechanism comes from the environment (`__` for a dot); librdkafka refuses it by name,
    // which shows the properties reach the client.
    let (code, out, err) = waymark_env(
        &[
            "run",
            "--config",
            f.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[("WAYMARK_KAFKA_PROPERTIES_SASL__MECHANISM", "NOPE".as_ref())],
    );
    let all = format!("{out}{err}");
    assert_ne!(code, 0, "{all}");
    assert!(all.contains("Unsupported SASL mechanism: NOPE"), "{all}");
    assert!(all.contains("sasl.password"), "the names are logged: {all}");
    assert!(
        !all.contains("s3cr3t-pass") && !all.contains("svc-user"),
        "{all}"
    );
}

#[test]
fn run_refuses_owned_client_properties_and_exactly_once_without_changelog() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("w.toml");
    std::fs::write(
        &f,
        "[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n[kafka.consumer_properties]\n\"isolation.level\" = \"read_uncommitted\"\n[processing]\nguarantee = \"exactly_once\"\n[state]\nchangelog = false\n",
    )
    .unwrap();
    let (code, _, err) = waymark(&["run", "--config", f.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("kafka.properties.\"enable.auto.commit\""),
        "{err}"
    );
    assert!(
        err.contains("kafka.consumer_properties.\"isolation.level\""),
        "{err}"
    );
    assert!(
        err.contains("exactly_once needs state.changelog = true"),
        "{err}"
    );
    assert!(
        !err.contains("read_uncommitted"),
        "values are not repeated: {err}"
    );
}

#[test]
fn run_refuses_a_waymark_variable_that_is_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let (code, _, err) = waymark_env(
        &["run", "--brokers", "127.0.0.1:1"],
        &[
            (
                "WAYMARK_KAFKA_GROUP_ID",
                std::ffi::OsStr::from_bytes(b"bad\xff\xfe"),
            ),
            ("SOME_OTHER_VAR", std::ffi::OsStr::from_bytes(b"\xff")),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("WAYMARK_KAFKA_GROUP_ID is not valid UTF-8"),
        "{err}"
    );
}

#[test]
fn replay_max_future_skips_an_event_far_ahead_of_the_files_clock() {
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join("events.jsonl");
    std::fs::write(
        &events,
        concat!(
            r#"{"application":"XXXXX-XXXXX","event":"CheckoutSuccess","userId":1,"timestamp":"2026-11-28T10:00:00Z"}"#, "\n",
            r#"{"application":"XXXXX-XXXXX","event":"CheckoutSuccess","userId":2,"timestamp":"2100-01-01T00:00:00Z"}"#, "\n",
            r#"{"application":"XXXXX-XXXXX","event":"CheckoutSuccess","userId":3,"timestamp":"2026-11-28T10:05:00Z"}"#, "\n",
        ),
    )
    .unwrap();
    let ev = events.to_str().unwrap();
    let (code, out, err) = waymark(&[
        "replay",
        "--journeys",
        "config/journeys",
        "--events",
        ev,
        "--max-future",
        "1d",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("line 2: timestamp in the future"), "{err}");
    assert!(
        !out.contains("\"user_id\":\"2\"") && out.contains("\"user_id\":\"3\""),
        "{out}"
    );
    // Without the flag the file is its own clock: the event is processed.
    let (_, out, _) = waymark(&["replay", "--journeys", "config/journeys", "--events", ev]);
    assert!(out.contains("\"user_id\":\"2\""), "{out}");
}

#[test]
fn replay_skips_a_line_longer_than_max_event_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join("events.jsonl");
    let pad = "x".repeat(5000);
    std::fs::write(
        &events,
        format!(
            "{}\n{}\n{}\n",
            r#"{"application":"XXXXX-XXXXX","event":"CheckoutSuccess","userId":1,"timestamp":"2026-11-28T10:00:00Z"}"#,
            format_args!(r#"{{"application":"XXXXX-XXXXX","event":"CheckoutSuccess","userId":2,"timestamp":"2026-11-28T10:01:00Z","attributes":{{"pad":"{pad}"}}}}"#),
            r#"{"application":"XXXXX-XXXXX","event":"CheckoutSuccess","userId":3,"timestamp":"2026-11-28T10:02:00Z"}"#,
        ),
    )
    .unwrap();
    let (code, out, err) = waymark(&[
        "replay",
        "--journeys",
        "config/journeys",
        "--events",
        events.to_str().unwrap(),
        "--max-event-bytes",
        "4096",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("line 2: oversize"), "{err}");
    assert!(
        !out.contains("\"user_id\":\"2\"") && out.contains("\"user_id\":\"3\""),
        "{out}"
    );
}
