//! Tests of the journey controls of contract section 5 and of the engine's limits.

use serde_json::{json, Value};

use super::tests::*;
use super::*;
use crate::journey::compile_journey;

pub(super) fn refusals(fx: &Effects) -> Vec<&'static str> {
    fx.refused.iter().map(|(_, r)| r.as_str()).collect()
}

#[test]
fn refusal_order_is_active_session_then_reentry_then_max_entries() {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "Go", "reentry": "never", "max_entries": 1 },
      "steps": [ { "id": "w", "type": "wait_for_trigger", "event": "Done" } ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    let fx = apply(
        &e,
        &mut us,
        &ev("Go", "u", "2026-12-01T10:00:00Z", json!({})),
    );
    assert_eq!(kinds(&fx), ["entry@w"]);
    let fx = apply(
        &e,
        &mut us,
        &ev("Go", "u", "2026-12-01T10:01:00Z", json!({})),
    );
    assert_eq!(refusals(&fx), ["active_session"]);
    apply(
        &e,
        &mut us,
        &ev("Done", "u", "2026-12-01T10:02:00Z", json!({})),
    );
    let fx = apply(
        &e,
        &mut us,
        &ev("Go", "u", "2026-12-01T10:03:00Z", json!({})),
    );
    assert_eq!(refusals(&fx), ["reentry"]);
    assert_eq!(us.history().journey("j").unwrap().entries, 1);
}

#[test]
fn max_entries_counts_every_identifier_and_history_outlives_sessions() {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "Go", "sessions": { "multiple": { "identifier": "k" } }, "max_entries": 2 },
      "steps": [ { "id": "x", "type": "exit" } ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    for (k, want) in [(1, 1), (2, 1), (3, 0), (1, 0)] {
        let fx = apply(
            &e,
            &mut us,
            &ev("Go", "u", "2026-12-01T10:00:00Z", json!({"k": k})),
        );
        let entries = kinds(&fx).iter().filter(|r| r.starts_with("entry")).count();
        assert_eq!(entries, want, "k={k}");
        if want == 0 {
            assert_eq!(refusals(&fx), ["max_entries"]);
        }
    }
    assert_eq!(us.active().count(), 0);
}

#[test]
fn reentry_after_prunes_keys_whose_window_passed() {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "Go", "sessions": { "multiple": { "identifier": "k" } }, "reentry": { "after": "1h" } },
      "steps": [ { "id": "x", "type": "exit" } ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    apply(
        &e,
        &mut us,
        &ev("Go", "u", "2026-12-01T10:00:00Z", json!({"k": "a"})),
    );
    apply(
        &e,
        &mut us,
        &ev("Go", "u", "2026-12-01T10:30:00Z", json!({"k": "b"})),
    );
    assert_eq!(us.history().journey("j").unwrap().keys.len(), 2);
    apply(
        &e,
        &mut us,
        &ev("Go", "u", "2026-12-01T11:00:00Z", json!({"k": "c"})),
    );
    let keys: Vec<_> = us
        .history()
        .journey("j")
        .unwrap()
        .keys
        .iter()
        .map(|k| k.key.clone().unwrap())
        .collect();
    assert_eq!(keys, ["b", "c"], "a's window closed at 11:00 exactly");
}

#[test]
fn a_journey_without_rules_keeps_no_history() {
    let j = json!({
      "id": "j", "application": "app", "entry": { "event": "Go" },
      "steps": [ { "id": "x", "type": "exit" } ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    apply(
        &e,
        &mut us,
        &ev("Go", "u", "2026-12-01T10:00:00Z", json!({})),
    );
    assert!(us.history().is_empty());
}

#[test]
fn two_branches_completing_on_one_event_take_the_first_in_list_order() {
    let j = json!({
      "id": "j", "application": "app", "entry": { "event": "Go" },
      "steps": [
        { "id": "w", "type": "wait_for_trigger", "branches": [
            { "id": "second-listed-first", "events": [ { "event": "X" }, { "event": "Y" } ], "match": "all", "next": "a" },
            { "id": "plain", "events": [ { "event": "Y" } ], "next": "b" } ] },
        { "id": "a", "type": "exit" }, { "id": "b", "type": "exit" } ]
    });
    let e = engine(&[j]);
    let mut us = UserSessions::default();
    apply(
        &e,
        &mut us,
        &ev("Go", "u", "2026-12-01T10:00:00Z", json!({})),
    );
    let fx = apply(
        &e,
        &mut us,
        &ev("X", "u", "2026-12-01T10:01:00Z", json!({"x": 1})),
    );
    assert!(fx.records.is_empty());
    assert_ne!(us.session(0).progress, 0);
    let fx = apply(
        &e,
        &mut us,
        &ev("Y", "u", "2026-12-01T10:02:00Z", json!({})),
    );
    assert_eq!(kinds(&fx), ["w->a:trigger", "exit@a:completed"]);
    let Record::StepAdvance(m) = &fx.records[0] else {
        panic!()
    };
    assert_eq!(m.branch.as_deref(), Some("second-listed-first"));
}

#[test]
fn variant_and_holdout_are_pure_functions_of_journey_step_and_user() {
    let j = json!({
      "id": "j", "application": "app", "entry": { "event": "Go" }, "holdout": { "percent": 30 },
      "steps": [
        { "id": "ab", "type": "experiment", "variants": [
            { "id": "a", "weight": 1, "next": "x" }, { "id": "b", "weight": 2, "next": "x" } ] },
        { "id": "x", "type": "exit" } ]
    });
    let e = engine(&[j]);
    for u in 0..200 {
        let user = format!("user{u}");
        let mut seen = Vec::new();
        for at in ["2026-12-01T10:00:00Z", "2027-05-01T10:00:00Z"] {
            let mut us = UserSessions::default();
            let fx = apply(&e, &mut us, &ev("Go", &user, at, json!({})));
            let Record::StepAdvance(m) = &fx.records[1] else {
                panic!()
            };
            seen.push((m.variant.clone(), m.holdout));
        }
        assert_eq!(seen[0], seen[1]);
        let h = controls::bucket_hash(&format!("j/ab/{user}")) % 3;
        assert_eq!(seen[0].0.as_deref(), Some(if h < 1 { "a" } else { "b" }));
        let held = controls::bucket_hash(&format!("j/holdout/{user}")) % 10_000 < 3000;
        assert_eq!(seen[0].1, held.then_some(true));
    }
}

#[test]
fn too_many_targets_enters_nobody_into_that_journey_only() {
    let a = json!({
      "id": "a", "application": "app",
      "entry": { "event": "Invite", "who": { "attribute": "to" } },
      "steps": [ { "id": "x", "type": "exit" } ]
    });
    let b = json!({
      "id": "b", "application": "app", "entry": { "event": "Invite" },
      "steps": [ { "id": "x", "type": "exit" } ]
    });
    let e = engine(&[a, b]).with_limits(Limits {
        max_targets: 3,
        max_sessions_per_user: 10,
    });
    let mut fx = Effects::default();
    let many = ev(
        "Invite",
        "u",
        "2026-12-01T10:00:00Z",
        json!({"to": [1, 2, 3, 4]}),
    );
    let intents = e.entry_intents(&many, None, &mut fx);
    assert_eq!(refusals(&fx), ["too_many_targets"]);
    assert_eq!(intents.len(), 1, "journey b still sees the event");
    assert_eq!(intents[0].journey_id, "b");
    let mut fx = Effects::default();
    let three = ev(
        "Invite",
        "u",
        "2026-12-01T10:00:00Z",
        json!({"to": [1, 2, 3, 3, "3"]}),
    );
    assert_eq!(e.entry_intents(&three, None, &mut fx).len(), 4);
}

#[test]
fn too_many_sessions_refuses_a_users_next_identifier() {
    let e = engine(&[order_journey()]).with_limits(Limits {
        max_targets: 10,
        max_sessions_per_user: 2,
    });
    let mut us = UserSessions::default();
    for (o, want) in [(1, None), (2, None), (3, Some("too_many_sessions"))] {
        let fx = apply(
            &e,
            &mut us,
            &ev(
                "OrderPlaced",
                "u",
                "2026-12-01T10:00:00Z",
                json!({"order_id": o}),
            ),
        );
        assert_eq!(refusals(&fx).first().copied(), want, "order {o}");
    }
    assert_eq!(us.active().count(), 2);
}

#[test]
fn the_longest_allowed_chain_of_instant_steps_runs_and_a_longer_journey_is_refused() {
    let chain = |n: usize| {
        let mut steps: Vec<Value> = (0..n - 1)
            .map(|i| json!({"id": format!("a{i}"), "type": "action", "action": "push", "params": null, "next": format!("a{}", i + 1)}))
            .collect();
        steps.push(json!({"id": format!("a{}", n - 1), "type": "exit"}));
        json!({"id": "long", "application": "app", "entry": {"event": "Go"}, "steps": steps})
    };
    let max = crate::journey::MAX_STEPS;
    let e = engine(&[chain(max)]);
    // The engine walks the chain on a thread with a small stack, as the service's threads have.
    let records = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let mut us = UserSessions::default();
            apply(
                &e,
                &mut us,
                &ev("Go", "u", "2026-12-01T10:00:00Z", json!({})),
            )
            .records
            .len()
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(records, 1 + (max - 1) + 1);
    let err = compile_journey("t.json", &chain(max + 1)).unwrap_err();
    assert!(err[0].message.contains("at most 1000 steps"), "{err:?}");
}
