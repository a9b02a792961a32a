//! Which refusal a trigger is counted with when several apply (the first, in the documented
//! order), and the context rules that decide what later steps see.

use serde_json::{json, Value};

use super::tests::{apply, engine, ev, kinds};
use super::*;

/// A journey on which every entry check can fail: a condition, a status, a window, a session
/// identifier, a `who` attribute, and re-entry rules with `max_entries`.
fn strict(status: &str) -> Value {
    json!({
      "id": "j", "application": "app", "status": status,
      "entry": {
        "event": "E",
        "conditions": [ {"attribute": "ok", "operator": "eq", "value": true} ],
        "availability": {"start_date": "2026-12-01", "end_date": "2026-12-24", "timezone": "UTC"},
        "sessions": { "multiple": { "identifier": "oid" } },
        "who": { "attribute": "to" },
        "reentry": { "after": "1d" },
        "max_entries": 2
      },
      "steps": [ { "id": "w", "type": "wait_for_trigger", "event": "Never" } ]
    })
}

const INSIDE: &str = "2026-12-10T10:00:00Z";
const OUTSIDE: &str = "2026-11-10T10:00:00Z";

/// The stateless checks, each case failing every check from its reason on.
#[test]
fn a_trigger_is_counted_with_the_first_reason_that_applies() {
    let paused = engine(&[strict("paused")]);
    let active = engine(&[strict("active")]).with_limits(Limits {
        max_targets: 2,
        max_sessions_per_user: 1_000,
    });
    let cases: [(&Engine, &str, Value, &str); 7] = [
        // Everything wrong: the condition is judged first.
        (
            &paused,
            OUTSIDE,
            json!({"ok": false, "to": {"x": 1}}),
            "condition_false",
        ),
        (
            &paused,
            OUTSIDE,
            json!({"ok": true, "to": {"x": 1}}),
            "not_active",
        ),
        (
            &active,
            OUTSIDE,
            json!({"ok": true, "to": {"x": 1}}),
            "outside_window",
        ),
        (
            &active,
            INSIDE,
            json!({"ok": true, "to": {"x": 1}}),
            "missing_identifier",
        ),
        (
            &active,
            INSIDE,
            json!({"ok": true, "oid": 1, "to": []}),
            "no_targets",
        ),
        (
            &active,
            INSIDE,
            json!({"ok": true, "oid": 1, "to": ["a", "b", "c"]}),
            "too_many_targets",
        ),
        (
            &active,
            INSIDE,
            json!({"ok": true, "oid": 1, "to": [["a"]]}),
            "bad_targets",
        ),
    ];
    for (e, at, attrs, want) in cases {
        let mut fx = Effects::default();
        let intents = e.entry_intents(&ev("E", "u", at, attrs.clone()), None, &mut fx);
        assert!(intents.is_empty(), "{attrs}");
        let got: Vec<&str> = fx.refused.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(got, [want], "{at} {attrs}");
    }
    // A paused journey still matched the trigger: `matched` counts it, `condition_false` not.
    let mut fx = Effects::default();
    paused.entry_intents(&ev("E", "u", INSIDE, json!({"ok": true})), None, &mut fx);
    assert_eq!(fx.matched, ["j"]);
    let mut fx = Effects::default();
    paused.entry_intents(&ev("E", "u", INSIDE, json!({"ok": false})), None, &mut fx);
    assert!(fx.matched.is_empty());
}

/// The checks that need the user's state: `active_session`, then `too_many_sessions`, then
/// `reentry`, then `max_entries`.
#[test]
fn stateful_refusals_come_in_order() {
    let e = engine(&[strict("active")]).with_limits(Limits {
        max_targets: 1_000,
        max_sessions_per_user: 2,
    });
    let mut us = UserSessions::default();
    let enter = |us: &mut UserSessions, at: &str, oid: i64| -> Vec<&'static str> {
        let mut fx = Effects::default();
        let event = ev("E", "u", at, json!({"ok": true, "oid": oid, "to": "u"}));
        for intent in e.entry_intents(&event, None, &mut fx) {
            e.apply_entry(&intent, us, &mut fx);
        }
        us.changes();
        fx.refused.iter().map(|(_, r)| r.as_str()).collect()
    };
    assert!(enter(&mut us, "2026-12-10T10:00:00Z", 1).is_empty());
    // Same identifier while active: active_session even though re-entry would refuse it too.
    assert_eq!(
        enter(&mut us, "2026-12-10T10:00:01Z", 1),
        ["active_session"]
    );
    assert!(enter(&mut us, "2026-12-10T10:00:02Z", 2).is_empty());
    // Two live sessions and two entries used: too_many_sessions before max_entries.
    assert_eq!(
        enter(&mut us, "2026-12-10T10:00:03Z", 3),
        ["too_many_sessions"]
    );
}

#[test]
fn reentry_is_judged_before_max_entries() {
    // Sessions end at once (an exit step), so `active_session` never applies.
    let mut j = strict("active");
    j["steps"] = json!([ { "id": "x", "type": "exit" } ]);
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    let enter = |us: &mut UserSessions, at: &str| -> Vec<&'static str> {
        let mut fx = Effects::default();
        let event = ev("E", "u", at, json!({"ok": true, "oid": 7, "to": "u"}));
        for intent in e.entry_intents(&event, None, &mut fx) {
            e.apply_entry(&intent, us, &mut fx);
        }
        assert_eq!(us.active().count(), 0);
        us.changes();
        fx.refused.iter().map(|(_, r)| r.as_str()).collect()
    };
    assert!(enter(&mut us, "2026-12-01T00:00:00Z").is_empty());
    assert_eq!(enter(&mut us, "2026-12-01T12:00:00Z"), ["reentry"]);
    assert!(enter(&mut us, "2026-12-02T00:00:00Z").is_empty());
    // Two entries used: a day later re-entry would allow it, max_entries refuses; within the
    // day both apply and re-entry is the one counted.
    assert_eq!(enter(&mut us, "2026-12-02T01:00:00Z"), ["reentry"]);
    assert_eq!(enter(&mut us, "2026-12-03T01:00:00Z"), ["max_entries"]);
}

/// A goal matches events but its attributes never reach the session context: only the entry
/// event and matched waits write it.
#[test]
fn goal_events_do_not_overwrite_the_context() {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "Start" },
      "steps": [
        { "id": "w", "type": "wait_for_trigger", "event": "Go", "next": "s" },
        { "id": "s", "type": "split", "branches": [ { "conditions": [ {"attribute": "tier", "operator": "eq", "value": "gold"} ], "next": "gold" } ], "default": "plain" },
        { "id": "gold", "type": "exit" },
        { "id": "plain", "type": "exit" }
      ],
      "goals": [ { "id": "bought", "event": "Buy" } ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    let t = "2026-11-28T10:00:00Z";
    apply(&e, &mut us, &ev("Start", "u", t, json!({"tier": "basic"})));
    let fx = apply(&e, &mut us, &ev("Buy", "u", t, json!({"tier": "gold"})));
    assert_eq!(kinds(&fx), ["conv:bought"]);
    // The Go event carries no tier: the split sees the entry's `basic`, not the goal's `gold`.
    let fx = apply(&e, &mut us, &ev("Go", "u", t, json!({})));
    assert_eq!(
        kinds(&fx),
        ["w->s:trigger", "s->plain:split", "exit@plain:completed"]
    );
}
