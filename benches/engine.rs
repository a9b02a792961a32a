//! Criterion benchmarks of the hot paths: condition matching, event decoding, and one engine step
//! (pure: no store). Run with `make bench-core`.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};

use waymark::engine::{Effects, Engine, UserSessions};
use waymark::event::{Event, RawEvent};
use waymark::journey::{compile_journey, JourneySet};

fn order_journey() -> Value {
    json!({
      "id": "order", "application": "app",
      "entry": { "event": "OrderPlaced",
                 "conditions": [ { "attribute": "total", "operator": "gte", "value": 10 },
                                 { "attribute": "country", "operator": "in", "value": ["DE", "FR", "NL"] },
                                 { "attribute": "coupon", "operator": "not_exists" } ],
                 "sessions": { "multiple": { "identifier": "order_id" } } },
      "start": "wait",
      "steps": [
        { "id": "wait", "type": "wait_for_trigger", "event": "OrderReady", "timeout": "3d", "next": "notify", "on_timeout": "end" },
        { "id": "notify", "type": "action", "action": "push", "params": { "t": "ready" }, "next": "pause" },
        { "id": "pause", "type": "delay", "duration": "2h", "next": "end" },
        { "id": "end", "type": "exit" }
      ],
      "goals": [ { "id": "delivered", "event": "OrderDelivered", "within": "7d", "exit": true } ]
    })
}

fn event(name: &str, attrs: Value) -> Event {
    Event {
        application: "app".into(),
        name: name.into(),
        user_id: "42".into(),
        attributes: attrs.as_object().unwrap().clone(),
        time: 1_795_860_000_000,
        event_id: "e1".into(),
    }
}

fn benches(c: &mut Criterion) {
    let journey = compile_journey("bench.json", &order_journey()).unwrap();
    let attrs = json!({"total": 99.5, "country": "NL", "order_id": "1001", "sku": "x-1"});
    let attrs = attrs.as_object().unwrap().clone();
    c.bench_function("conditions: 3 conditions, all hold", |b| {
        b.iter(|| black_box(journey.entry.conditions.eval(black_box(&attrs))))
    });

    let line = r#"{"application":"app","event":"PageView","userId":123456,"attributes":{"page":"/p/42","ref":"campaign-7"},"timestamp":1795860000000,"eventId":"e-1"}"#;
    c.bench_function("decode: validate an event (no journey cares)", |b| {
        b.iter(|| {
            black_box(
                RawEvent::decode_str(black_box(line))
                    .unwrap()
                    .user_id()
                    .len(),
            )
        })
    });

    let engine = Engine::new(Arc::new(JourneySet::new(vec![journey])));
    let placed = event(
        "OrderPlaced",
        json!({"total": 99.5, "country": "NL", "order_id": "1001"}),
    );
    let ready = event("OrderReady", json!({"order_id": "1001"}));
    c.bench_function("engine: entry (conditions, intent, new session)", |b| {
        b.iter(|| {
            let mut fx = Effects::default();
            let mut us = UserSessions::default();
            for intent in engine.entry_intents(&placed, None, &mut fx) {
                engine.apply_entry(&intent, &mut us, &mut fx);
            }
            black_box(us.changes().len() + fx.records.len())
        })
    });
    let mut fx = Effects::default();
    let mut base = UserSessions::default();
    for intent in engine.entry_intents(&placed, None, &mut fx) {
        engine.apply_entry(&intent, &mut base, &mut fx);
    }
    let sessions: Vec<_> = base.active().cloned().collect();
    c.bench_function("engine: wait trigger (advance, action, delay)", |b| {
        b.iter(|| {
            let mut fx = Effects::default();
            let mut us = UserSessions::new(sessions.clone());
            engine.apply_event(&ready, &mut us, &mut fx);
            black_box(us.changes().len() + fx.records.len())
        })
    });
}

/// Section 5: a branched wait (an `all` branch of two events, then an `any` branch) and the
/// frequency-cap check against a user's delivery history.
fn control_benches(c: &mut Criterion) {
    let j = json!({
      "id": "ctl", "application": "app", "entry": { "event": "Go" },
      "steps": [
        { "id": "w", "type": "wait_for_trigger", "branches": [
            { "id": "both", "events": [ { "event": "Open" }, { "event": "Click", "conditions": [ { "attribute": "n", "operator": "gte", "value": 1 } ] } ], "match": "all", "next": "x" },
            { "id": "bought", "events": [ { "event": "Purchase" } ], "next": "x" } ] },
        { "id": "x", "type": "exit" } ]
    });
    let journey = compile_journey("ctl.json", &j).unwrap();
    let engine = Engine::new(Arc::new(JourneySet::new(vec![journey])));
    let mut fx = Effects::default();
    let mut base = UserSessions::default();
    for intent in engine.entry_intents(&event("Go", json!({})), None, &mut fx) {
        engine.apply_entry(&intent, &mut base, &mut fx);
    }
    let sessions: Vec<_> = base.active().cloned().collect();
    let open = event("Open", json!({"n": 1}));
    c.bench_function(
        "engine: branched wait, event completes no branch (progress kept)",
        |b| {
            b.iter(|| {
                let mut fx = Effects::default();
                let mut us = UserSessions::new(sessions.clone());
                engine.apply_event(black_box(&open), &mut us, &mut fx);
                black_box(us.changes().len() + fx.records.len())
            })
        },
    );

    let policy = waymark::journey::policy::compile_policy(
        "p.json",
        &json!({"policy_for": "app", "frequency_caps": [
            {"action": "push", "max": 3, "per": "day"}, {"action": "push", "max": 10, "per": "week"}]}),
    )
    .unwrap();
    let mut history = waymark::engine::History::default();
    for i in 0..12 {
        waymark::engine::controls::record_delivery(
            &mut history,
            &policy,
            if i % 3 == 0 { "email" } else { "push" },
            1_795_860_000_000 - i * 3_600_000,
        );
    }
    let tz: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    c.bench_function(
        "caps: check push against 12 deliveries (day and week caps)",
        |b| {
            b.iter(|| {
                black_box(waymark::engine::controls::cap_reached(
                    black_box(&history),
                    &policy.caps,
                    "push",
                    1_795_860_000_000,
                    tz,
                ))
            })
        },
    );
}

criterion_group!(engine_benches, benches, control_benches);
criterion_main!(engine_benches);
