//! Invariants over random journeys and random event streams (proptest):
//! - single mode never holds two active sessions per user and journey;
//! - each session's records are entry, steps, exit, in order, with non-decreasing times;
//! - replay is deterministic;
//! - a replay split in two over one state equals one run;
//! - with the journey controls of contract section 5 on (re-entry rules, exit criteria, branched
//!   waits, experiments, holdout, quiet hours, frequency caps): `never` enters an entry key once,
//!   a session's holdout flag is the hash's and never changes, a variant is the hash's, no action
//!   leaves its step in quiet hours, and no user gets more capped actions a day than the cap.

#![allow(clippy::needless_range_loop)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use proptest::prelude::*;
use serde_json::{json, Value};

const EVENTS: &[&str] = &["A", "B", "C", "D"];

/// A random but valid journey: steps only point forward (so no instant loop) or at a wait.
fn journey_strategy(id: &'static str) -> impl Strategy<Value = Value> {
    (
        1usize..6,
        prop::collection::vec((0u8..5, 0usize..10, 0usize..10, 1u32..180, any::<bool>()), 6),
        0usize..4,
        any::<bool>(),
        prop::option::of(0usize..4),
        prop::collection::vec((0usize..4, prop::option::of(1u32..600), any::<bool>()), 0..3),
        0u8..3,
    )
        .prop_map(move |(n, kinds, trig, multiple, cond, goals, who)| {
            let mut steps = Vec::new();
            for i in 0..n {
                let (k, a, b, minutes, with_timeout) = kinds[i];
                let fwd = |x: usize| -> Option<String> {
                    let target = i + 1 + x % (n - i + 1);
                    (target < n).then(|| format!("s{target}"))
                };
                let mut s = serde_json::Map::new();
                s.insert("id".into(), json!(format!("s{i}")));
                match k {
                    0 | 1 => {
                        s.insert("type".into(), json!("wait_for_trigger"));
                        s.insert("event".into(), json!(EVENTS[a % EVENTS.len()]));
                        if with_timeout {
                            s.insert("timeout".into(), json!(format!("{minutes}m")));
                            if let Some(t) = fwd(b) {
                                s.insert("on_timeout".into(), json!(t));
                            }
                        }
                        if a % 3 == 0 {
                            s.insert("conditions".into(), json!([{"attribute": "k", "operator": "gte", "value": 1}]));
                        }
                    }
                    2 => {
                        s.insert("type".into(), json!("delay"));
                        s.insert("duration".into(), json!(format!("{minutes}m")));
                    }
                    3 => {
                        s.insert("type".into(), json!("action"));
                        s.insert("action".into(), json!("push"));
                        s.insert("params".into(), json!({"n": i}));
                    }
                    _ => {
                        s.insert("type".into(), json!("split"));
                        let branch = fwd(b).unwrap_or_else(|| format!("s{}", n - 1));
                        let branch = if branch == format!("s{i}") { format!("s{}", n - 1) } else { branch };
                        if branch == format!("s{i}") {
                            s.insert("type".into(), json!("exit"));
                        } else {
                            s.insert("branches".into(), json!([{"conditions": [{"attribute": "k", "operator": "eq", "value": 2}], "next": branch}]));
                            if let Some(d) = fwd(a) {
                                s.insert("default".into(), json!(d));
                            }
                        }
                    }
                }
                if s["type"] != "split" && s["type"] != "exit" {
                    if let Some(nx) = fwd(a + b) {
                        s.insert("next".into(), json!(nx));
                    }
                }
                steps.push(Value::Object(s));
            }
            // Make every step reachable: chain any step without a successor to the next one.
            for i in 0..n.saturating_sub(1) {
                let o = steps[i].as_object_mut().unwrap();
                let t = o["type"].as_str().unwrap().to_string();
                if (t == "wait_for_trigger" || t == "delay" || t == "action") && !o.contains_key("next") {
                    o.insert("next".into(), json!(format!("s{}", i + 1)));
                }
                if t == "split" && !o.contains_key("default") {
                    o.insert("default".into(), json!(format!("s{}", i + 1)));
                }
                if t == "exit" {
                    o.insert("type".into(), json!("action"));
                    o.insert("action".into(), json!("noop"));
                    o.insert("next".into(), json!(format!("s{}", i + 1)));
                }
            }
            let mut entry = json!({"event": EVENTS[trig]});
            if multiple {
                entry["sessions"] = json!({"multiple": {"identifier": "order_id"}});
            }
            if let Some(c) = cond {
                entry["conditions"] = json!([{"attribute": "k", "operator": "ne", "value": c}]);
            }
            if who == 2 {
                entry["who"] = json!({"attribute": "to"});
            }
            let goals: Vec<Value> = goals
                .iter()
                .enumerate()
                .map(|(gi, (e, within, exit))| {
                    let mut g = json!({"id": format!("g{gi}"), "event": EVENTS[*e], "exit": exit});
                    if let Some(w) = within {
                        g["within"] = json!(format!("{w}m"));
                    }
                    g
                })
                .collect();
            json!({"id": id, "application": "app", "entry": entry, "start": "s0", "steps": steps, "goals": goals})
        })
}

fn events_strategy() -> impl Strategy<Value = Vec<Value>> {
    events_with_zones(false)
}

fn events_with_zones(zones: bool) -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(
        (0usize..4, 1u8..4, 0u32..90, prop::option::of(0u8..3), prop::option::of(1u8..3), prop::option::of(1u8..4)),
        1..60,
    )
    .prop_map(move |raw| {
        let mut t = 1_795_860_000_000i64;
        raw.into_iter()
            .enumerate()
            .map(|(i, (e, user, gap, k, order, to))| {
                t += gap as i64 * 60_000;
                let mut attrs = serde_json::Map::new();
                if let Some(k) = k {
                    attrs.insert("k".into(), json!(k));
                }
                if let Some(o) = order {
                    attrs.insert("order_id".into(), if i % 2 == 0 { json!(o) } else { json!(o.to_string()) });
                }
                if let Some(to) = to {
                    attrs.insert("to".into(), json!([to, user]));
                }
                if zones && gap % 3 == 0 {
                    attrs.insert("timezone".into(), json!(["Asia/Tokyo", "America/New_York", "Not/AZone"][i % 3]));
                }
                json!({"application": "app", "event": EVENTS[e], "userId": user, "attributes": attrs,
                       "timestamp": t, "eventId": format!("e{i}")})
            })
            .collect()
    })
}

/// Section 5 on top of a generated journey: re-entry rules, exit criteria, holdout, splits turned
/// into experiments, waits turned into branched waits.
#[derive(Debug, Clone)]
struct Controls {
    reentry: u8,
    max_entries: Option<u8>,
    exit_on: Option<usize>,
    holdout: Option<u8>,
    weights: (u8, u8),
    branched: Option<(usize, bool)>,
}

fn controls_strategy() -> impl Strategy<Value = Controls> {
    (
        0u8..3,
        prop::option::of(1u8..4),
        prop::option::of(0usize..4),
        prop::option::of(0u8..101),
        (0u8..3, 1u8..3),
        prop::option::of((0usize..4, any::<bool>())),
    )
        .prop_map(
            |(reentry, max_entries, exit_on, holdout, weights, branched)| Controls {
                reentry,
                max_entries,
                exit_on,
                holdout,
                weights,
                branched,
            },
        )
}

fn with_controls(mut j: Value, c: &Controls) -> Value {
    match c.reentry {
        1 => j["entry"]["reentry"] = json!("never"),
        2 => j["entry"]["reentry"] = json!({"after": "2h"}),
        _ => {}
    }
    if let Some(m) = c.max_entries {
        j["entry"]["max_entries"] = json!(m);
    }
    if let Some(e) = c.exit_on {
        j["exit_on"] = json!([{"event": EVENTS[e], "conditions": [{"attribute": "k", "operator": "eq", "value": 0}]}]);
    }
    if let Some(h) = c.holdout {
        j["holdout"] = json!({"percent": h});
    }
    for s in j["steps"].as_array_mut().unwrap() {
        let o = s.as_object_mut().unwrap();
        if o["type"] == "split" {
            let first = o["branches"][0]["next"].clone();
            let default = o.remove("default");
            o.remove("branches");
            o.insert("type".into(), json!("experiment"));
            let mut b = json!({"id": "b", "weight": c.weights.1});
            if let Some(d) = default {
                b["next"] = d;
            }
            o.insert(
                "variants".into(),
                json!([{"id": "a", "weight": c.weights.0, "next": first}, b]),
            );
        } else if o["type"] == "wait_for_trigger" {
            if let Some((e, all)) = c.branched {
                let event = o.remove("event").unwrap();
                let conditions = o.remove("conditions").unwrap_or(json!([]));
                let next = o.remove("next");
                let mut first = json!({"id": "x", "events": [{"event": event, "conditions": conditions}, {"event": EVENTS[e]}],
                                       "match": if all { "all" } else { "any" }});
                if let Some(n) = &next {
                    first["next"] = n.clone();
                }
                let mut second =
                    json!({"id": "y", "events": [{"event": EVENTS[(e + 1) % EVENTS.len()]}]});
                if let Some(n) = next {
                    second["next"] = n;
                }
                o.insert("branches".into(), json!([first, second]));
            }
        }
    }
    j
}

fn write_case(dir: &Path, journeys: &[Value], events: &[Value]) {
    std::fs::create_dir_all(dir.join("journeys")).unwrap();
    for j in journeys {
        std::fs::write(
            dir.join("journeys")
                .join(format!("{}.json", j["id"].as_str().unwrap())),
            j.to_string(),
        )
        .unwrap();
    }
    let text: String = events.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(dir.join("events.jsonl"), text).unwrap();
}

/// The output of the events before `cut` and then the rest, replayed over one state in `dir`.
fn split_replay(dir: &Path, events: &[Value], cut: usize, until: Option<i64>) -> String {
    let journeys = dir.join("journeys");
    let first = dir.join("first.jsonl");
    let second = dir.join("second.jsonl");
    let lines = |evs: &[Value]| evs.iter().map(|e| format!("{e}\n")).collect::<String>();
    std::fs::write(&first, lines(&events[..cut])).unwrap();
    std::fs::write(&second, lines(&events[cut..])).unwrap();
    let state = dir.join("state");
    let (a, _) = common::run_replay(&journeys, &first, None, Some(&state));
    let (b, _) = common::run_replay(&journeys, &second, until, Some(&state));
    format!("{a}{b}")
}

fn records(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn journeys_keep_their_invariants(
        j1 in journey_strategy("j1"),
        j2 in journey_strategy("j2"),
        events in events_strategy(),
        cut in 0usize..60,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        write_case(tmp.path(), &[j1.clone(), j2.clone()], &events);
        let journeys = tmp.path().join("journeys");
        if let Err(e) = waymark::journey::load_dir(&journeys) {
            // The generator aims at valid journeys; one it gets wrong is no test of the engine.
            prop_assume!(false, "invalid journey: {}", e);
        }
        let until = Some(1_795_860_000_000i64 + 400 * 86_400_000);
        let (out, _) = common::run_replay(&journeys, &tmp.path().join("events.jsonl"), until, None);
        let (again, _) = common::run_replay(&journeys, &tmp.path().join("events.jsonl"), until, None);
        prop_assert_eq!(&out, &again, "replay is deterministic");

        // Split + restart equals one run.
        let cut = cut.min(events.len());
        prop_assert_eq!(split_replay(tmp.path(), &events, cut, until), out.clone(), "split at {} equals one run", cut);

        let recs = records(&out);
        let single: HashMap<&str, bool> = [("j1", &j1), ("j2", &j2)]
            .into_iter()
            .map(|(id, j)| (id, j["entry"].get("sessions").is_none()))
            .collect();
        // Session lifecycles.
        let mut life: HashMap<String, (bool, bool, String)> = HashMap::new(); // id -> (entered, exited, last at)
        let mut active: HashMap<(String, String), usize> = HashMap::new();
        for r in &recs {
            let sid = r["session_id"].as_str().unwrap().to_string();
            let at = r["at"].as_str().unwrap().to_string();
            let key = (r["journey_id"].as_str().unwrap().to_string(), r["user_id"].as_str().unwrap().to_string());
            match r["type"].as_str().unwrap() {
                "journey_entry" => {
                    prop_assert!(!life.contains_key(&sid), "session {} entered twice", sid);
                    life.insert(sid, (true, false, at));
                    let n = active.entry(key.clone()).or_default();
                    *n += 1;
                    if single[key.0.as_str()] {
                        prop_assert!(*n <= 1, "two active sessions of {:?} in single mode", key);
                    }
                }
                kind => {
                    let l = life.get_mut(&sid).expect("a record before its entry");
                    prop_assert!(!l.1, "a record after the exit of {}", sid);
                    prop_assert!(at >= l.2, "time went back in {}: {} after {}", sid, at, l.2);
                    l.2 = at;
                    if kind == "journey_exit" {
                        l.1 = true;
                        *active.get_mut(&key).unwrap() -= 1;
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn journey_controls_keep_their_invariants(
        j1 in journey_strategy("j1"),
        j2 in journey_strategy("j2"),
        c1 in controls_strategy(),
        c2 in controls_strategy(),
        caps in (0u64..3, any::<bool>()),
        events in events_with_zones(false),
        cut in 0usize..60,
    ) {
        let (j1, j2) = (with_controls(j1, &c1), with_controls(j2, &c2));
        let tmp = tempfile::tempdir().unwrap();
        write_case(tmp.path(), &[j1.clone(), j2.clone()], &events);
        let (max, quiet) = caps;
        let mut policy = json!({"policy_for": "app", "frequency_caps": [{"action": "push", "max": max, "per": "day"}]});
        if quiet {
            policy["quiet_hours"] = json!({"start": "21:00", "end": "08:00"});
        }
        std::fs::write(tmp.path().join("journeys/policy.json"), policy.to_string()).unwrap();
        let journeys = tmp.path().join("journeys");
        if let Err(e) = waymark::journey::load_dir(&journeys) {
            prop_assume!(false, "invalid journey: {}", e);
        }
        let until = Some(1_795_860_000_000i64 + 400 * 86_400_000);
        let events_file = tmp.path().join("events.jsonl");
        let (out, _) = common::run_replay(&journeys, &events_file, until, None);
        let (again, _) = common::run_replay(&journeys, &events_file, until, None);
        prop_assert_eq!(&out, &again, "replay is deterministic");

        let cut = cut.min(events.len());
        prop_assert_eq!(split_replay(tmp.path(), &events, cut, until), out.clone(), "split at {} equals one run", cut);

        let defs: HashMap<&str, &Controls> = [("j1", &c1), ("j2", &c2)].into_iter().collect();
        let hash = waymark::engine::controls::bucket_hash;
        let mut entries: HashMap<(String, String, Value), usize> = HashMap::new();
        let mut holdout_of: HashMap<String, bool> = HashMap::new();
        let mut delivered: HashMap<(String, i64), u64> = HashMap::new();
        for r in records(&out) {
            let journey = r["journey_id"].as_str().unwrap();
            let user = r["user_id"].as_str().unwrap().to_string();
            let sid = r["session_id"].as_str().unwrap().to_string();
            let c = defs[journey];
            let held = r.get("holdout") == Some(&json!(true));
            prop_assert!(r.get("holdout").is_none() || held, "holdout is true or absent: {}", r);
            let want = c.holdout.is_some_and(|p| hash(&format!("{journey}/holdout/{user}")) % 10_000 < u64::from(p) * 100);
            prop_assert_eq!(held, want, "holdout of {} in {}", &user, journey);
            prop_assert_eq!(*holdout_of.entry(sid).or_insert(held), held, "holdout flag changed within a session");
            if r["type"] == "journey_entry" {
                let n = entries.entry((journey.to_string(), user.clone(), r["session_key"].clone())).or_default();
                *n += 1;
                if c.reentry == 1 {
                    prop_assert!(*n <= 1, "reentry never: {} entered {} twice", &user, journey);
                }
            }
            if r["reason"] == "experiment" {
                let (w0, w1) = (u64::from(c.weights.0), u64::from(c.weights.1));
                let step = r["from"].as_str().unwrap();
                let b = hash(&format!("{journey}/{step}/{user}")) % (w0 + w1);
                prop_assert_eq!(r["variant"].as_str().unwrap(), if b < w0 { "a" } else { "b" });
            }
            if r["type"] == "step_advance" && r["reason"] == "action" {
                let at = waymark::time::parse_rfc3339(r["at"].as_str().unwrap()).unwrap();
                let hour = (at.rem_euclid(86_400_000)) / 3_600_000;
                if quiet {
                    prop_assert!((8..21).contains(&hour), "an action left its step in quiet hours: {}", r);
                }
                match r.get("suppressed").and_then(|s| s.as_str()) {
                    Some(why) => {
                        prop_assert!(r["action"].is_null() && r["params"].is_null());
                        prop_assert_eq!(why == "holdout", held);
                    }
                    None => {
                        prop_assert!(!held && !r["action"].is_null());
                        if r["action"] == "push" {
                            let n = delivered.entry((user.clone(), at.div_euclid(86_400_000))).or_default();
                            *n += 1;
                            prop_assert!(*n <= max, "{} pushes for {} in one day, cap {}", n, &user, max);
                        }
                    }
                }
            }
        }
    }
}
