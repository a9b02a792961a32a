//! Rule-by-rule tests of the pure engine, with no store: sessions live in `UserSessions`.

use std::sync::Arc;

use serde_json::{json, Value};

use super::*;
use crate::journey::{compile_journey, JourneySet};
use crate::time::parse_rfc3339;

pub(super) fn engine(journeys: &[Value]) -> Engine {
    let js = journeys
        .iter()
        .map(|j| compile_journey("t.json", j).unwrap())
        .collect();
    Engine::new(Arc::new(JourneySet::new(js)))
}

pub(super) fn ev(name: &str, user: &str, at: &str, attrs: Value) -> Event {
    Event {
        application: "app".into(),
        name: name.into(),
        user_id: user.into(),
        attributes: attrs.as_object().unwrap().clone(),
        time: parse_rfc3339(at).unwrap(),
        event_id: format!("{name}-{user}-{at}"),
    }
}

/// Applies an event the way the processor does for a single user: goals, waits, then entries.
pub(super) fn apply(e: &Engine, us: &mut UserSessions, event: &Event) -> Effects {
    let mut fx = Effects::default();
    e.apply_event(event, us, &mut fx);
    for intent in e.entry_intents(event, us.profile().cloned().as_ref(), &mut fx) {
        assert_eq!(intent.user_id, event.user_id);
        e.apply_entry(&intent, us, &mut fx);
    }
    us.changes();
    fx
}

pub(super) fn kinds(fx: &Effects) -> Vec<String> {
    fx.records
        .iter()
        .map(|r| match r {
            Record::JourneyEntry(e) => format!("entry@{}", e.step),
            Record::StepAdvance(m) => {
                format!("{}->{}:{}", m.from, m.to.as_deref().unwrap_or(""), m.reason)
            }
            Record::JourneyExit(m) => format!("exit@{}:{}", m.from, m.reason),
            Record::Conversion(c) => format!("conv:{}", c.goal_id),
        })
        .collect()
}

pub(super) fn order_journey() -> Value {
    json!({
      "id": "order", "application": "app",
      "entry": { "event": "OrderPlaced", "sessions": { "multiple": { "identifier": "order_id" } } },
      "start": "wait-ready",
      "steps": [
        { "id": "wait-ready", "type": "wait_for_trigger", "event": "OrderReady",
          "timeout": "3d", "next": "notify", "on_timeout": "end" },
        { "id": "notify", "type": "action", "action": "push",
          "params": { "template": "order-ready" }, "next": "pause" },
        { "id": "pause", "type": "delay", "duration": "2h", "next": "end" },
        { "id": "end", "type": "exit" }
      ],
      "goals": [ { "id": "delivered", "event": "OrderDelivered", "within": "7d", "exit": true } ]
    })
}

#[test]
fn multiple_sessions_route_by_identifier() {
    let e = engine(&[order_journey()]);
    let mut us = UserSessions::default();
    let t = "2026-11-28T10:00:00Z";
    assert_eq!(
        kinds(&apply(
            &e,
            &mut us,
            &ev("OrderPlaced", "u", t, json!({"order_id": 1001}))
        )),
        ["entry@wait-ready"]
    );
    assert_eq!(
        kinds(&apply(
            &e,
            &mut us,
            &ev("OrderPlaced", "u", t, json!({"order_id": "1002"}))
        )),
        ["entry@wait-ready"]
    );
    // 1001 and "1001" are the same identifier: no second session.
    let fx = apply(
        &e,
        &mut us,
        &ev("OrderPlaced", "u", t, json!({"order_id": "1001"})),
    );
    assert!(fx.records.is_empty());
    assert_eq!(fx.refused, [("order".to_string(), Refusal::ActiveSession)]);
    // A trigger without the identifier does not enter.
    let fx = apply(&e, &mut us, &ev("OrderPlaced", "u", t, json!({})));
    assert_eq!(
        fx.refused,
        [("order".to_string(), Refusal::MissingIdentifier)]
    );
    // OrderReady with order_id 1002 applies only to session 2.
    let fx = apply(
        &e,
        &mut us,
        &ev(
            "OrderReady",
            "u",
            "2026-11-28T11:00:00Z",
            json!({"order_id": "1002"}),
        ),
    );
    assert_eq!(
        kinds(&fx),
        ["wait-ready->notify:trigger", "notify->pause:action"]
    );
    let Record::StepAdvance(m) = &fx.records[1] else {
        panic!()
    };
    assert_eq!(m.session_key.as_deref(), Some("1002"));
    assert_eq!(m.action.as_deref(), Some("push"));
    assert_eq!(m.params, Some(json!({"template": "order-ready"})));
    let Record::StepAdvance(m0) = &fx.records[0] else {
        panic!()
    };
    assert_eq!(
        (m0.action.as_ref(), m0.params.as_ref()),
        (None, None),
        "the arriving move carries no action"
    );
}

#[test]
fn event_without_identifier_advances_every_waiting_session() {
    let e = engine(&[order_journey()]);
    let mut us = UserSessions::default();
    let t = "2026-11-28T10:00:00Z";
    apply(
        &e,
        &mut us,
        &ev("OrderPlaced", "u", t, json!({"order_id": "1001"})),
    );
    apply(
        &e,
        &mut us,
        &ev("OrderPlaced", "u", t, json!({"order_id": "1002"})),
    );
    let fx = apply(&e, &mut us, &ev("OrderReady", "u", t, json!({})));
    assert_eq!(
        kinds(&fx),
        [
            "wait-ready->notify:trigger",
            "notify->pause:action",
            "wait-ready->notify:trigger",
            "notify->pause:action"
        ]
    );
}

#[test]
fn goal_converts_once_and_exits() {
    let e = engine(&[order_journey()]);
    let mut us = UserSessions::default();
    apply(
        &e,
        &mut us,
        &ev(
            "OrderPlaced",
            "u",
            "2026-11-28T10:00:00Z",
            json!({"order_id": "1001"}),
        ),
    );
    let fx = apply(
        &e,
        &mut us,
        &ev(
            "OrderDelivered",
            "u",
            "2026-12-05T10:00:00Z",
            json!({"order_id": "1001"}),
        ),
    );
    assert_eq!(kinds(&fx), ["conv:delivered", "exit@wait-ready:goal"]);
    assert_eq!(us.active().count(), 0);
}

#[test]
fn goal_within_is_inclusive() {
    let e = engine(&[order_journey()]);
    let mut us = UserSessions::default();
    apply(
        &e,
        &mut us,
        &ev(
            "OrderPlaced",
            "u",
            "2026-11-28T10:00:00Z",
            json!({"order_id": 1}),
        ),
    );
    apply(
        &e,
        &mut us,
        &ev(
            "OrderPlaced",
            "u",
            "2026-11-28T10:00:00Z",
            json!({"order_id": 2}),
        ),
    );
    let last = apply(
        &e,
        &mut us,
        &ev(
            "OrderDelivered",
            "u",
            "2026-12-05T10:00:00Z",
            json!({"order_id": 1}),
        ),
    );
    assert_eq!(kinds(&last), ["conv:delivered", "exit@wait-ready:goal"]);
    let late = apply(
        &e,
        &mut us,
        &ev(
            "OrderDelivered",
            "u",
            "2026-12-05T10:00:00.001Z",
            json!({"order_id": 2}),
        ),
    );
    assert!(late.records.is_empty());
}

#[test]
fn non_exit_goal_converts_only_once() {
    let mut j = order_journey();
    j["goals"][0]["exit"] = json!(false);
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    apply(
        &e,
        &mut us,
        &ev(
            "OrderPlaced",
            "u",
            "2026-11-28T10:00:00Z",
            json!({"order_id": 1}),
        ),
    );
    let a = apply(
        &e,
        &mut us,
        &ev("OrderDelivered", "u", "2026-11-28T11:00:00Z", json!({})),
    );
    let b = apply(
        &e,
        &mut us,
        &ev("OrderDelivered", "u", "2026-11-28T12:00:00Z", json!({})),
    );
    assert_eq!(kinds(&a), ["conv:delivered"]);
    assert!(b.records.is_empty());
}

#[test]
fn timeout_moves_to_on_timeout_and_delay_fires() {
    let e = engine(&[order_journey()]);
    let mut us = UserSessions::default();
    apply(
        &e,
        &mut us,
        &ev(
            "OrderPlaced",
            "u",
            "2026-11-28T10:00:00Z",
            json!({"order_id": 1}),
        ),
    );
    let due = us.session(0).timer.unwrap();
    assert_eq!(due, parse_rfc3339("2026-12-01T10:00:00Z").unwrap());
    let mut fx = Effects::default();
    e.fire_timer(&mut us, 0, due - 1, &mut fx);
    assert!(
        fx.records.is_empty(),
        "a timer the session does not wait for is ignored"
    );
    e.fire_timer(&mut us, 0, due, &mut fx);
    assert_eq!(
        kinds(&fx),
        ["wait-ready->end:timeout", "exit@end:completed"]
    );
    let Record::JourneyExit(x) = &fx.records[1] else {
        panic!()
    };
    assert_eq!(x.at, "2026-12-01T10:00:00.000Z");
    assert_eq!(x.event, None);
}

#[test]
fn timeout_without_on_timeout_ends_with_reason_timeout() {
    let mut j = order_journey();
    j["steps"][0].as_object_mut().unwrap().remove("on_timeout");
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    apply(
        &e,
        &mut us,
        &ev(
            "OrderPlaced",
            "u",
            "2026-11-28T10:00:00Z",
            json!({"order_id": 1}),
        ),
    );
    let due = us.session(0).timer.unwrap();
    let mut fx = Effects::default();
    e.fire_timer(&mut us, 0, due, &mut fx);
    assert_eq!(kinds(&fx), ["exit@wait-ready:timeout"]);
}

#[test]
fn single_mode_refuses_a_second_session_until_the_first_ends() {
    let j = json!({
      "id": "welcome", "application": "app",
      "entry": { "event": "SignUp" },
      "steps": [ { "id": "w", "type": "wait_for_trigger", "event": "Done", "next": "x" }, { "id": "x", "type": "exit" } ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    let t = "2026-11-28T10:00:00Z";
    assert_eq!(
        kinds(&apply(&e, &mut us, &ev("SignUp", "u", t, json!({})))),
        ["entry@w"]
    );
    let fx = apply(&e, &mut us, &ev("SignUp", "u", t, json!({})));
    assert_eq!(
        fx.refused,
        [("welcome".to_string(), Refusal::ActiveSession)]
    );
    assert_eq!(
        kinds(&apply(&e, &mut us, &ev("Done", "u", t, json!({})))),
        ["w->x:trigger", "exit@x:completed"]
    );
    let fx = apply(
        &e,
        &mut us,
        &ev("SignUp", "u", "2026-11-28T10:00:01Z", json!({})),
    );
    assert_eq!(kinds(&fx), ["entry@w"]);
}

#[test]
fn the_creating_event_does_not_advance_or_convert() {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "E" },
      "steps": [ { "id": "w", "type": "wait_for_trigger", "event": "E", "next": "x" }, { "id": "x", "type": "exit" } ],
      "goals": [ { "id": "g", "event": "E" } ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    let t = "2026-11-28T10:00:00Z";
    assert_eq!(
        kinds(&apply(&e, &mut us, &ev("E", "u", t, json!({})))),
        ["entry@w"]
    );
    // The second E converts and advances the first session, which ends; only then is entry
    // evaluated, so the same event starts a new session.
    assert_eq!(
        kinds(&apply(&e, &mut us, &ev("E", "u", t, json!({})))),
        ["conv:g", "w->x:trigger", "exit@x:completed", "entry@w"]
    );
}

#[test]
fn who_from_attribute() {
    let j = json!({
      "id": "inv", "application": "app",
      "entry": { "event": "invitation", "who": { "attribute": "targetIds" } },
      "steps": [ { "id": "x", "type": "exit" } ]
    });
    let e = engine(&[j]);
    let mut fx = Effects::default();
    let intents = e.entry_intents(
        &ev(
            "invitation",
            "123",
            "2026-11-28T10:00:00Z",
            json!({"targetIds": [1, "2", 2, 3, 4]}),
        ),
        None,
        &mut fx,
    );
    let users: Vec<&str> = intents.iter().map(|i| i.user_id.as_str()).collect();
    assert_eq!(users, ["1", "2", "3", "4"]);
    assert!(intents.iter().all(|i| i.source_user_id == "123"));
    for (value, refusal) in [
        (json!({}), Refusal::NoTargets),
        (json!({"targetIds": null}), Refusal::NoTargets),
        (json!({"targetIds": []}), Refusal::NoTargets),
        (json!({"targetIds": {"a": 1}}), Refusal::BadTargets),
        (json!({"targetIds": [1, null]}), Refusal::BadTargets),
        (json!({"targetIds": [1.5]}), Refusal::BadTargets),
        (json!({"targetIds": true}), Refusal::BadTargets),
    ] {
        let mut fx = Effects::default();
        let intents = e.entry_intents(
            &ev("invitation", "123", "2026-11-28T10:00:00Z", value.clone()),
            None,
            &mut fx,
        );
        assert!(intents.is_empty(), "{value}");
        assert_eq!(fx.refused, [("inv".to_string(), refusal)], "{value}");
    }
    let mut fx = Effects::default();
    let one = e.entry_intents(
        &ev(
            "invitation",
            "123",
            "2026-11-28T10:00:00Z",
            json!({"targetIds": 321}),
        ),
        None,
        &mut fx,
    );
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].user_id, "321");
}

#[test]
fn entry_window_judged_on_event_time() {
    let j = json!({
      "id": "xmas", "application": "app",
      "entry": { "event": "E", "availability": {"start_date": "2026-12-01", "end_date": "2026-12-24", "timezone": "Europe/Berlin"} },
      "steps": [ { "id": "x", "type": "exit" } ]
    });
    let e = engine(&[j]);
    for (at, enters) in [
        ("2026-11-30T22:59:59.999Z", false),
        ("2026-11-30T23:00:00Z", true),
        ("2026-12-24T22:59:59.999Z", true),
        ("2026-12-24T23:00:00Z", false),
    ] {
        let mut fx = Effects::default();
        let n = e
            .entry_intents(&ev("E", "u", at, json!({})), None, &mut fx)
            .len();
        assert_eq!(n == 1, enters, "{at}");
        if !enters {
            assert_eq!(fx.refused, [("xmas".to_string(), Refusal::OutsideWindow)]);
        }
    }
}

#[test]
fn split_uses_context_updated_by_waits() {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "Start" },
      "steps": [
        { "id": "w", "type": "wait_for_trigger", "event": "Upd", "next": "s" },
        { "id": "s", "type": "split", "branches": [ { "conditions": [ {"attribute": "tier", "operator": "eq", "value": "gold"} ], "next": "gold" } ], "default": "plain" },
        { "id": "gold", "type": "exit" },
        { "id": "plain", "type": "exit" }
      ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    let t = "2026-11-28T10:00:00Z";
    apply(
        &e,
        &mut us,
        &ev("Start", "u", t, json!({"tier": "basic", "x": 1})),
    );
    let fx = apply(&e, &mut us, &ev("Upd", "u", t, json!({"tier": "gold"})));
    assert_eq!(
        kinds(&fx),
        ["w->s:trigger", "s->gold:split", "exit@gold:completed"]
    );
}

#[test]
fn action_without_next_moves_out_carrying_the_action_then_exits() {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "Start" },
      "steps": [ { "id": "a", "type": "action", "action": "email", "params": {"t": 1} } ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    let fx = apply(
        &e,
        &mut us,
        &ev("Start", "u", "2026-11-28T10:00:00Z", json!({})),
    );
    assert_eq!(kinds(&fx), ["entry@a", "a->:action", "exit@a:completed"]);
    let Record::StepAdvance(m) = &fx.records[1] else {
        panic!()
    };
    assert_eq!(m.action.as_deref(), Some("email"));
    assert_eq!(m.params, Some(json!({"t": 1})));
    assert_eq!(m.to, None);
    let Record::JourneyExit(x) = &fx.records[2] else {
        panic!()
    };
    assert_eq!((x.action.as_deref(), &x.params), (None, &None));
    assert_eq!(us.active().count(), 0);
}

#[test]
fn session_ids_are_deterministic_and_distinct() {
    let a = session_id("app", "j", "u", Some("1"), "e1");
    assert_eq!(a, session_id("app", "j", "u", Some("1"), "e1"));
    assert_ne!(a, session_id("app", "j", "u", Some("2"), "e1"));
    assert_ne!(a, session_id("app", "j", "u", None, "e1"));
    assert_ne!(a, session_id("app", "j2", "u", Some("1"), "e1"));
    assert_eq!(a.len(), 36);
}

#[test]
fn other_applications_are_not_seen() {
    let e = engine(&[order_journey()]);
    let mut other = ev(
        "OrderPlaced",
        "u",
        "2026-11-28T10:00:00Z",
        json!({"order_id": 1}),
    );
    other.application = "other".into();
    let mut fx = Effects::default();
    assert!(e.entry_intents(&other, None, &mut fx).is_empty());
}
