//! Bad-input fuzzing (issue 9): the event decoder and the journey compiler are fed arbitrary bytes
//! and arbitrary JSON, and mutated versions of valid journeys and events; none may panic, hang or
//! accept something that then crashes the engine. `make fuzz` runs many more cases
//! (`FUZZ_CASES`, default 500,000 per property); `make test` runs a few hundred.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use waymark::engine::{Effects, Engine, UserSessions};
use waymark::event::RawEvent;
use waymark::journey::{compile_journey, policy::compile_policy, JourneySet};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// Arbitrary JSON, a few levels deep, with the keys and values the formats use mixed in.
fn json_value() -> impl Strategy<Value = Value> {
    let words = prop::sample::select(vec![
        "id",
        "application",
        "event",
        "userId",
        "attributes",
        "timestamp",
        "eventId",
        "entry",
        "steps",
        "type",
        "next",
        "conditions",
        "operator",
        "value",
        "attribute",
        "branches",
        "events",
        "match",
        "variants",
        "weight",
        "holdout",
        "percent",
        "quiet_hours",
        "start",
        "end",
        "policy_for",
        "frequency_caps",
        "max",
        "per",
        "reentry",
        "after",
        "exit_on",
        "wait_for_trigger",
        "action",
        "delay",
        "split",
        "experiment",
        "exit",
        "sessions",
        "multiple",
        "identifier",
        "who",
        "timeout",
        "duration",
        "within",
        "goals",
        "all",
        "any",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        words.clone().prop_map(|w| Value::String(w.to_string())),
        prop::sample::select(vec![
            "21:00",
            "08:00",
            "3d",
            "1h",
            "Europe/Berlin",
            "UTC",
            "0s",
            "-1d",
            "25:61"
        ])
        .prop_map(|w| Value::String(w.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((words.clone(), inner), 0..6).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

fn valid_journey() -> Value {
    json!({
      "id": "j", "application": "app",
      "entry": { "event": "Go", "sessions": { "multiple": { "identifier": "k" } }, "reentry": { "after": "1h" },
                 "who": { "attribute": "to" } },
      "holdout": { "percent": 25 },
      "quiet_hours": { "start": "21:00", "end": "08:00" },
      "steps": [
        { "id": "w", "type": "wait_for_trigger", "branches": [
            { "id": "a", "events": [ { "event": "A" }, { "event": "B" } ], "match": "all", "next": "x" },
            { "id": "b", "events": [ { "event": "C", "conditions": [ { "attribute": "n", "operator": "gte", "value": 1 } ] } ], "next": "s" } ],
          "timeout": "1d", "on_timeout": "e" },
        { "id": "x", "type": "experiment", "variants": [ { "id": "p", "weight": 1, "next": "act" }, { "id": "q", "weight": 0 } ] },
        { "id": "s", "type": "split", "branches": [ { "conditions": [ { "attribute": "n", "operator": "eq", "value": 2 } ], "next": "act" } ], "default": "e" },
        { "id": "act", "type": "action", "action": "push", "params": {}, "next": "d" },
        { "id": "d", "type": "delay", "duration": "1h", "next": "e" },
        { "id": "e", "type": "exit" } ],
      "goals": [ { "id": "g", "event": "Buy", "within": "2d" } ],
      "exit_on": [ { "event": "Stop" } ]
    })
}

/// Replaces the value at one path of `v` (chosen by `pick`) with `with`.
fn mutate(v: &mut Value, pick: usize, with: Value) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn go(v: &mut Value, mut n: usize, with: &mut Option<Value>) -> usize {
        if n == 0 {
            if let Some(w) = with.take() {
                *v = w;
            }
            return 0;
        }
        n -= 1;
        match v {
            Value::Array(a) => {
                for x in a {
                    n = go(x, n, with);
                    if with.is_none() {
                        return 0;
                    }
                }
            }
            Value::Object(o) => {
                for x in o.values_mut() {
                    n = go(x, n, with);
                    if with.is_none() {
                        return 0;
                    }
                }
            }
            _ => {}
        }
        n
    }
    let total = count(v);
    go(v, pick % total, &mut Some(with));
}

fn event(name: &str, attrs: Value, t: i64) -> waymark::event::Event {
    // Attributes the journey reads, so entries happen, then arbitrary ones over them.
    let mut attributes = json!({"k": "1", "n": 1, "to": ["u"]})
        .as_object()
        .cloned()
        .unwrap();
    if let Some(extra) = attrs.as_object() {
        attributes.extend(extra.clone());
    }
    waymark::event::Event {
        application: "app".into(),
        name: name.into(),
        user_id: "u".into(),
        attributes,
        time: t,
        event_id: format!("e{t}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn the_event_decoder_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = RawEvent::decode(&bytes, 1 << 20).map(|r| r.into_event(Some(0), || "x".into()));
    }

    #[test]
    fn the_event_decoder_never_panics_on_json(v in json_value()) {
        let text = v.to_string();
        let _ = RawEvent::decode(text.as_bytes(), 1 << 20).map(|r| r.into_event(Some(0), || "x".into()));
    }

    #[test]
    fn the_compilers_never_panic_on_json(v in json_value()) {
        let _ = compile_journey("f.json", &v);
        let _ = compile_policy("p.json", &v);
    }

    /// A valid journey with one value replaced anywhere: refused with problems, or accepted and
    /// then run over a few events without a panic.
    #[test]
    fn mutated_journeys_are_refused_or_run(pick in any::<usize>(), with in json_value(), attrs in json_value(), names in prop::collection::vec(prop::sample::select(vec!["Go", "A", "B", "C", "Buy", "Stop", "X"]), 1..8)) {
        let mut j = valid_journey();
        mutate(&mut j, pick, with);
        let Ok(journey) = compile_journey("f.json", &j) else {
            return Ok(());
        };
        let engine = Engine::new(Arc::new(JourneySet::new(vec![journey])));
        let mut us = UserSessions::default();
        let mut t = 1_795_860_000_000i64;
        for name in names {
            t += 1_800_000;
            let ev = event(name, attrs.clone(), t);
            let mut fx = Effects::default();
            engine.apply_event(&ev, &mut us, &mut fx);
            for intent in engine.entry_intents(&ev, None, &mut fx) {
                // Every target's state is this one view here: enough to exercise the engine.
                engine.apply_entry(&intent, &mut us, &mut fx);
            }
            for ix in 0..us.len() {
                if let Some(due) = us.session(ix).timer.filter(|_| us.is_active(ix)) {
                    engine.fire_timer(&mut us, ix, due, &mut fx);
                }
            }
            us.changes();
        }
    }
}
