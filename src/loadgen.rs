//! Synthetic load for benchmarks: ten journeys and a stream of events in which about 30% touch a
//! journey (half of those entry triggers, half waits or goals of live sessions) and the rest are
//! events no journey cares about. Deterministic for a given seed.

use std::io::Write;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

pub const APPLICATION: &str = "bench-app";
pub const JOURNEYS: usize = 10;

/// Writes the ten benchmark journeys into `dir`.
pub fn write_journeys(dir: &Path) -> std::io::Result<()> {
    write_journeys_reading(dir, false)
}

/// Writes the ten benchmark journeys; with `profile`, their entry conditions and goals also read
/// the user's profile (conditions every profile of [`write_profiles`] meets, so the records are
/// those of the journeys without: the same work, plus the profile's).
pub fn write_journeys_reading(dir: &Path, profile: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for j in 0..JOURNEYS {
        let multiple = j % 2 == 1;
        let mut conditions = vec![json!({ "attribute": "amount", "operator": "gte", "value": 1 })];
        let mut goal_conditions = Vec::new();
        if profile {
            conditions.push(json!({ "attribute": "profile.plan", "operator": "in",
                                    "value": ["free", "pro", "team"] }));
            goal_conditions.push(json!({ "attribute": "profile.address.country",
                                         "operator": "exists" }));
        }
        let mut entry = json!({
            "event": format!("Trigger{j}"),
            "conditions": conditions,
        });
        if multiple {
            entry["sessions"] = json!({ "multiple": { "identifier": "order_id" } });
        }
        let journey = json!({
            "id": format!("bench-{j}"),
            "application": APPLICATION,
            "entry": entry,
            "start": "wait",
            "steps": [
                { "id": "wait", "type": "wait_for_trigger", "event": format!("Wait{j}"),
                  "timeout": "6h", "next": "notify", "on_timeout": "end" },
                { "id": "notify", "type": "action", "action": "push",
                  "params": { "template": format!("t{j}") }, "next": "pause" },
                { "id": "pause", "type": "delay", "duration": "1h", "next": "end" },
                { "id": "end", "type": "exit" }
            ],
            "goals": [ { "id": "goal", "event": format!("Goal{j}"), "within": "1d",
                         "exit": j % 3 == 0, "conditions": goal_conditions } ]
        });
        std::fs::write(
            dir.join(format!("bench-{j}.json")),
            serde_json::to_string_pretty(&journey)?,
        )?;
    }
    Ok(())
}

/// Writes a profile record (a `replay` line: `"type": "profile"`) for each of `users` users, of
/// about 300 bytes, stamped at `at_ms`. Users are numbered as in [`write_events`].
pub fn write_profiles(
    out: &mut dyn Write,
    users: u64,
    seed: u64,
    at_ms: i64,
) -> std::io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9);
    let mut line = String::with_capacity(400);
    for user in 0..users {
        use std::fmt::Write as _;
        line.clear();
        let plan = ["free", "pro", "team"][rng.gen_range(0..3)];
        let country = ["DE", "FR", "US", "BR", "JP"][rng.gen_range(0..5)];
        let _ = write!(
            line,
            r#"{{"type":"profile","application":"{APPLICATION}","userId":{user},"attributes":{{"plan":"{plan}","name":"User {user}","email":"user{user}@example.com","address":{{"city":"City {}","country":"{country}"}},"timezone":"Europe/Berlin","push_opt_in":{},"signup_day":{},"tags":["t{}","t{}"]}},"timestamp":{at_ms}}}"#,
            rng.gen_range(0..1000),
            rng.gen_bool(0.7),
            rng.gen_range(0..3650),
            rng.gen_range(0..50),
            rng.gen_range(0..50),
        );
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// Writes the ten benchmark journeys with every journey control of contract section 5 on (the
/// same triggers, waits and goals, so one event stream serves both), and an application policy
/// with quiet hours and frequency caps.
pub fn write_control_journeys(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for j in 0..JOURNEYS {
        let multiple = j % 2 == 1;
        let mut entry = json!({
            "event": format!("Trigger{j}"),
            "conditions": [ { "attribute": "amount", "operator": "gte", "value": 1 } ],
            "reentry": { "after": "10m" },
            "max_entries": 1000,
        });
        if multiple {
            entry["sessions"] = json!({ "multiple": { "identifier": "order_id" } });
        }
        let journey = json!({
            "id": format!("bench-{j}"),
            "application": APPLICATION,
            "entry": entry,
            "holdout": { "percent": 10 },
            "start": "wait",
            "steps": [
                { "id": "wait", "type": "wait_for_trigger", "branches": [
                    { "id": "both", "events": [ { "event": format!("Goal{j}") }, { "event": format!("Wait{j}") } ],
                      "match": "all", "next": "ab" },
                    { "id": "waited", "events": [ { "event": format!("Wait{j}") } ], "next": "ab" } ],
                  "timeout": "6h", "on_timeout": "end" },
                { "id": "ab", "type": "experiment", "variants": [
                    { "id": "push", "weight": 50, "next": "notify" },
                    { "id": "email", "weight": 50, "next": "mail" } ] },
                { "id": "notify", "type": "action", "action": "push",
                  "params": { "template": format!("t{j}") }, "next": "pause" },
                { "id": "mail", "type": "action", "action": "email",
                  "params": { "template": format!("t{j}") }, "next": "pause" },
                { "id": "pause", "type": "delay", "duration": "1h", "next": "end" },
                { "id": "end", "type": "exit" }
            ],
            "goals": [ { "id": "goal", "event": format!("Goal{j}"), "within": "1d", "exit": j % 3 == 0 } ],
            "exit_on": [ { "event": format!("Goal{j}"), "conditions": [ { "attribute": "order_id", "operator": "eq", "value": "o3" } ] } ]
        });
        std::fs::write(
            dir.join(format!("bench-{j}.json")),
            serde_json::to_string_pretty(&journey)?,
        )?;
    }
    let policy = json!({
        "policy_for": APPLICATION,
        "default_timezone": "Europe/Berlin",
        "quiet_hours": { "start": "21:00", "end": "08:00" },
        "frequency_caps": [ { "action": "push", "max": 3, "per": "day" },
                            { "action": "email", "max": 5, "per": "week" } ]
    });
    std::fs::write(
        dir.join("policy.json"),
        serde_json::to_string_pretty(&policy)?,
    )
}

/// Generates `count` events for `users` users, one JSON object a line. Event time starts at
/// `start_ms` and advances `step_ms` per event.
pub fn write_events(
    out: &mut dyn Write,
    count: u64,
    users: u64,
    seed: u64,
    start_ms: i64,
    step_ms: i64,
) -> std::io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Recently triggered (user, journey, order) triples: waits and goals go to these.
    let mut live: Vec<(u64, usize, u32)> = Vec::with_capacity(4096);
    let mut t = start_ms;
    let mut line = String::with_capacity(256);
    for i in 0..count {
        t += step_ms;
        line.clear();
        let r: f64 = rng.gen();
        use std::fmt::Write as _;
        if r < 0.15 || (r < 0.30 && live.is_empty()) {
            let user = rng.gen_range(0..users);
            let j = rng.gen_range(0..JOURNEYS);
            let order: u32 = rng.gen_range(0..4);
            if live.len() < 4096 {
                live.push((user, j, order));
            } else {
                let slot = rng.gen_range(0..live.len());
                live[slot] = (user, j, order);
            }
            let _ = write!(
                line,
                r#"{{"application":"{APPLICATION}","event":"Trigger{j}","userId":{user},"attributes":{{"amount":{},"order_id":"o{order}","sku":"sku-{}"}},"timestamp":{t},"eventId":"e{i}"}}"#,
                rng.gen_range(1..500),
                rng.gen_range(0..1000)
            );
        } else if r < 0.30 {
            let (user, j, order) = live[rng.gen_range(0..live.len())];
            let name = if rng.gen_bool(0.5) { "Wait" } else { "Goal" };
            let _ = write!(
                line,
                r#"{{"application":"{APPLICATION}","event":"{name}{j}","userId":{user},"attributes":{{"order_id":"o{order}"}},"timestamp":{t},"eventId":"e{i}"}}"#
            );
        } else {
            let user = rng.gen_range(0..users);
            let name = ["PageView", "AppOpen", "Search", "AddToCart"][rng.gen_range(0..4)];
            let _ = write!(
                line,
                r#"{{"application":"{APPLICATION}","event":"{name}","userId":{user},"attributes":{{"page":"/p/{}","ref":"campaign-{}"}},"timestamp":{t},"eventId":"e{i}"}}"#,
                rng.gen_range(0..10_000),
                rng.gen_range(0..50)
            );
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}
