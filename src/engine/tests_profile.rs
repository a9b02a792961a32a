//! Tests of profiles in the engine: `profile.` conditions everywhere a condition names an
//! attribute, the time zone from the profile, and erasure.

use serde_json::{json, Value};

use super::tests::*;
use super::tests_controls::refusals;
use super::*;

fn with_profile(user: &str, profile: Value) -> UserSessions {
    UserSessions::load(
        user,
        UserState {
            profile: Some(profile.as_object().unwrap().clone()),
            ..UserState::default()
        },
    )
}

fn gated(conditions: Value) -> Value {
    json!({
      "id": "j", "application": "app",
      "entry": { "event": "Go", "conditions": conditions },
      "steps": [ { "id": "w", "type": "wait_for_trigger", "event": "Done" } ]
    })
}

#[test]
fn entry_conditions_read_the_event_users_profile() {
    let e = engine(&[gated(
        json!([{ "attribute": "profile.plan", "operator": "eq", "value": "pro" }]),
    )]);
    let go = ev("Go", "u", "2026-12-01T10:00:00Z", json!({"plan": "pro"}));
    // The event's own `plan` is not the profile's.
    let mut none = UserSessions::default();
    assert_eq!(refusals(&apply(&e, &mut none, &go)), ["condition_false"]);
    let mut free = with_profile("u", json!({"plan": "free"}));
    assert_eq!(refusals(&apply(&e, &mut free, &go)), ["condition_false"]);
    let mut pro = with_profile("u", json!({"plan": "pro"}));
    assert_eq!(kinds(&apply(&e, &mut pro, &go)), ["entry@w"]);
}

#[test]
fn an_absent_profile_attribute_satisfies_only_not_exists_and_paths_reach_into_objects() {
    let cases = [
        (json!({}), "not_exists", Value::Null, true),
        (json!({}), "ne", json!("x"), false),
        (json!({}), "not_in", json!(["x"]), false),
        (
            json!({"address": {"city": "Berlin"}}),
            "eq",
            json!("Berlin"),
            true,
        ),
        (
            json!({"address": {"city": "Berlin"}}),
            "not_exists",
            Value::Null,
            false,
        ),
        (
            json!({"address": {"city": "Paris"}}),
            "ne",
            json!("Berlin"),
            true,
        ),
    ];
    for (profile, op, value, enters) in cases {
        let mut cond = json!({ "attribute": "profile.address.city", "operator": op });
        if !value.is_null() {
            cond["value"] = value.clone();
        }
        let e = engine(&[gated(json!([cond]))]);
        let mut us = with_profile("u", profile.clone());
        let fx = apply(
            &e,
            &mut us,
            &ev("Go", "u", "2026-12-01T10:00:00Z", json!({})),
        );
        assert_eq!(!fx.records.is_empty(), enters, "{profile} {op} {value}");
    }
}

#[test]
fn an_event_attribute_named_profile_is_not_read_as_the_profile() {
    let e = engine(&[gated(
        json!([{ "attribute": "profile.plan", "operator": "eq", "value": "pro" }]),
    )]);
    let mut us = UserSessions::default();
    let go = ev(
        "Go",
        "u",
        "2026-12-01T10:00:00Z",
        json!({"profile": {"plan": "pro"}}),
    );
    assert_eq!(refusals(&apply(&e, &mut us, &go)), ["condition_false"]);
}

fn invite(conditions: Value, any: bool) -> Value {
    let mut j = json!({
      "id": "inv", "application": "app",
      "entry": { "event": "Invite", "who": { "attribute": "to" }, "conditions": conditions },
      "steps": [ { "id": "w", "type": "wait_for_trigger", "event": "Done" } ]
    });
    if any {
        j["entry"]["match"] = json!("any");
    }
    j
}

#[test]
fn who_attribute_entries_judge_profile_conditions_with_each_targets_profile() {
    let plan_pro = json!({ "attribute": "profile.plan", "operator": "eq", "value": "pro" });
    let e = engine(&[invite(json!([plan_pro]), false)]);
    let mut fx = Effects::default();
    let invite = ev(
        "Invite",
        "src",
        "2026-12-01T10:00:00Z",
        json!({"to": ["a", "b"]}),
    );
    // The source's profile plays no part.
    let src_profile = json!({"plan": "pro"});
    let intents = e.entry_intents(&invite, src_profile.as_object(), &mut fx);
    assert_eq!(intents.len(), 2);
    assert!(intents.iter().all(|i| i.check_profile));
    assert!(fx.refused.is_empty());
    let mut a = with_profile("a", json!({"plan": "pro"}));
    let mut b = with_profile("b", json!({"plan": "free"}));
    e.apply_entry(&intents[0], &mut a, &mut fx);
    e.apply_entry(&intents[1], &mut b, &mut fx);
    assert_eq!(kinds(&fx), ["entry@w"]);
    assert_eq!(a.active().count(), 1);
    assert_eq!(b.active().count(), 0);
    assert_eq!(refusals(&fx), ["condition_false"]);
}

#[test]
fn who_attribute_entries_decide_on_the_events_partition_what_the_event_decides() {
    let plan_pro = json!({ "attribute": "profile.plan", "operator": "eq", "value": "pro" });
    let vip = json!({ "attribute": "vip", "operator": "eq", "value": true });
    // `all`: a failing event condition refuses at once, before refusals that follow it.
    let e = engine(&[invite(json!([plan_pro.clone(), vip.clone()]), false)]);
    let mut fx = Effects::default();
    let no_targets = ev(
        "Invite",
        "src",
        "2026-12-01T10:00:00Z",
        json!({"vip": false}),
    );
    assert!(e.entry_intents(&no_targets, None, &mut fx).is_empty());
    assert_eq!(refusals(&fx), ["condition_false"]);
    // ... and a holding one leaves the profile condition to the target.
    let mut fx = Effects::default();
    let vip_invite = ev(
        "Invite",
        "src",
        "2026-12-01T10:00:00Z",
        json!({"vip": true, "to": "a"}),
    );
    let intents = e.entry_intents(&vip_invite, None, &mut fx);
    assert!(intents[0].check_profile);
    // Refusals decided on the event's partition come before the target's condition_false.
    let mut fx = Effects::default();
    let nobody = ev(
        "Invite",
        "src",
        "2026-12-01T10:00:00Z",
        json!({"vip": true}),
    );
    assert!(e.entry_intents(&nobody, None, &mut fx).is_empty());
    assert_eq!(refusals(&fx), ["no_targets"]);
    // `any`: a holding event condition decides it whatever the profile says.
    let e = engine(&[invite(json!([plan_pro, vip]), true)]);
    let mut fx = Effects::default();
    let intents = e.entry_intents(&vip_invite, None, &mut fx);
    assert!(!intents[0].check_profile);
    let mut a = with_profile("a", json!({"plan": "free"}));
    e.apply_entry(&intents[0], &mut a, &mut fx);
    assert_eq!(kinds(&fx), ["entry@w"]);
}

#[test]
fn a_routed_intent_without_check_profile_reads_as_before() {
    // Routed intents of an older version carry no `check_profile`: it defaults to false.
    let text = r#"{"journey_id":"j","application":"app","user_id":"u","source_user_id":"s",
        "session_key":null,"event":"Go","event_id":"e1","time":0,"attributes":{}}"#;
    let intent: EntryIntent = serde_json::from_str(text).unwrap();
    assert!(!intent.check_profile);
    assert!(!serde_json::to_string(&intent)
        .unwrap()
        .contains("check_profile"));
}

#[test]
fn waits_goals_exit_criteria_and_splits_read_the_profile() {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "Go" },
      "exit_on": [ { "event": "Stop", "conditions": [
          { "attribute": "profile.opt_out", "operator": "eq", "value": true } ] } ],
      "steps": [
        { "id": "w", "type": "wait_for_trigger", "event": "Open", "conditions": [
            { "attribute": "profile.push", "operator": "eq", "value": true } ], "next": "s" },
        { "id": "s", "type": "split", "branches": [
            { "conditions": [ { "attribute": "profile.plan", "operator": "eq", "value": "pro" } ],
              "next": "pro" } ], "default": "free" },
        { "id": "pro", "type": "wait_for_trigger", "event": "Never" },
        { "id": "free", "type": "wait_for_trigger", "event": "Never" }
      ],
      "goals": [ { "id": "g", "event": "Buy", "conditions": [
          { "attribute": "profile.country", "operator": "eq", "value": "DE" } ] } ]
    });
    let e = engine(&[j]);
    let at = "2026-12-01T10:00:00Z";
    let mut us = with_profile("u", json!({"push": false, "plan": "pro", "country": "FR"}));
    apply(&e, &mut us, &ev("Go", "u", at, json!({})));
    // Wait: the event matches by name, the profile says no.
    assert!(apply(&e, &mut us, &ev("Open", "u", at, json!({})))
        .records
        .is_empty());
    // Goal: likewise.
    assert!(apply(&e, &mut us, &ev("Buy", "u", at, json!({})))
        .records
        .is_empty());
    // Exit criterion: not opted out.
    assert!(apply(&e, &mut us, &ev("Stop", "u", at, json!({})))
        .records
        .is_empty());
    let mut p = us.take_profile().unwrap();
    p.insert("push".into(), json!(true));
    p.insert("country".into(), json!("DE"));
    p.insert("opt_out".into(), json!(true));
    us.set_profile(Some(p));
    assert_eq!(
        kinds(&apply(&e, &mut us, &ev("Open", "u", at, json!({})))),
        ["w->s:trigger", "s->pro:split"]
    );
    assert_eq!(
        kinds(&apply(&e, &mut us, &ev("Buy", "u", at, json!({})))),
        ["conv:g"]
    );
    assert_eq!(
        kinds(&apply(&e, &mut us, &ev("Stop", "u", at, json!({})))),
        ["exit@pro:exit_event"]
    );
}

#[test]
fn the_time_zone_may_come_from_the_profile() {
    let j = json!({
      "id": "j", "application": "app",
      "timezone_attribute": "profile.timezone",
      "quiet_hours": { "start": "21:00", "end": "08:00" },
      "entry": { "event": "Go" },
      "steps": [ { "id": "a", "type": "action", "action": "push", "next": "w" },
                 { "id": "w", "type": "wait_for_trigger", "event": "Never" } ]
    });
    let e = engine(&[j]);
    // 22:00 UTC is 23:00 in Berlin (held) and 17:00 in New York (not held).
    let go = ev(
        "Go",
        "u",
        "2026-12-01T22:00:00Z",
        json!({"timezone": "America/New_York"}),
    );
    let mut berlin = with_profile("u", json!({"timezone": "Europe/Berlin"}));
    let fx = apply(&e, &mut berlin, &go);
    assert_eq!(kinds(&fx), ["entry@a"], "held for quiet hours");
    let mut ny = with_profile("u", json!({"timezone": "America/New_York"}));
    let fx = apply(&e, &mut ny, &go);
    assert_eq!(kinds(&fx), ["entry@a", "a->w:action"]);
    // No profile: the event's attribute is not the profile's; the default zone (UTC) holds it.
    let mut none = UserSessions::default();
    assert_eq!(kinds(&apply(&e, &mut none, &go)), ["entry@a"]);
}

#[test]
fn erasure_ends_every_session_and_forgets_history_and_profile() {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "Go", "sessions": { "multiple": { "identifier": "k" } },
                 "reentry": "never" },
      "steps": [ { "id": "w", "type": "wait_for_trigger", "event": "Done" } ]
    });
    let e = engine(&[j]);
    let mut us = with_profile("u", json!({"plan": "pro"}));
    for k in [1, 2] {
        apply(
            &e,
            &mut us,
            &ev("Go", "u", "2026-12-01T10:00:00Z", json!({"k": k})),
        );
    }
    assert_eq!(us.active().count(), 2);
    let mut fx = Effects::default();
    e.erase(&mut us, 1_000, &mut fx);
    assert_eq!(kinds(&fx), ["exit@w:erased", "exit@w:erased"]);
    let Record::JourneyExit(m) = &fx.records[0] else {
        panic!("an exit")
    };
    assert_eq!(
        (m.event.as_deref(), m.at.as_str()),
        (None, "1970-01-01T00:00:01.000Z")
    );
    assert_eq!(us.active().count(), 0);
    assert!(us.history().is_empty() && us.profile().is_none());
    let changes = us.changes();
    assert!(changes
        .iter()
        .any(|c| matches!(c, Change::Profile { profile: None, .. })));
    assert!(changes
        .iter()
        .any(|c| matches!(c, Change::History { history, .. } if history.is_empty())));
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(c, Change::Delete { .. }))
            .count(),
        2
    );
    // With nothing forgotten, re-entry works again: the history is gone.
    let fx = apply(
        &e,
        &mut us,
        &ev("Go", "u", "2026-12-01T11:00:00Z", json!({"k": 1})),
    );
    assert_eq!(kinds(&fx), ["entry@w"]);
}
