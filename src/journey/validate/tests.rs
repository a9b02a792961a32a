//! Validation tests: every problem reported with its path.
use super::*;
use serde_json::json;

fn order_journey() -> Value {
    json!({
      "id": "order-journey",
      "application": "XXXXX-XXXXX",
      "entry": {
        "event": "OrderPlaced",
        "conditions": [ { "attribute": "total", "operator": "gte", "value": 10 } ],
        "who": "event_user",
        "availability": "any_time",
        "sessions": { "multiple": { "identifier": "order_id" } }
      },
      "start": "wait-ready",
      "steps": [
        { "id": "wait-ready", "type": "wait_for_trigger", "event": "OrderReady",
          "conditions": [], "timeout": "3d", "next": "notify", "on_timeout": "end" },
        { "id": "notify", "type": "action", "action": "push",
          "params": { "template": "order-ready" }, "next": "pause" },
        { "id": "pause", "type": "delay", "duration": "2h", "next": "end" },
        { "id": "end", "type": "exit" }
      ],
      "goals": [
        { "id": "delivered", "event": "OrderDelivered", "conditions": [],
          "within": "7d", "exit": true }
      ]
    })
}

fn problems_of(v: Value) -> Vec<String> {
    match compile_journey("j.json", &v) {
        Ok(_) => Vec::new(),
        Err(ps) => ps
            .iter()
            .map(|p| format!("{} {}", p.path, p.message))
            .collect(),
    }
}

fn with(mut v: Value, f: impl FnOnce(&mut Value)) -> Value {
    f(&mut v);
    v
}

#[test]
fn the_contract_example_compiles() {
    let j = compile_journey("j.json", &order_journey()).unwrap();
    assert_eq!(j.steps.len(), 4);
    assert_eq!(j.steps[j.start].id, "wait-ready");
    assert_eq!(
        j.entry.sessions,
        SessionMode::Multiple {
            identifier: "order_id".into()
        }
    );
    assert_eq!(j.goals[0].within, Some(7 * 86_400_000));
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let v = with(order_journey(), |v| {
        v["steps"][0]["next"] = json!("nowhere");
        v["steps"][2]["duration"] = json!("soon");
        v["entry"]["availability"] =
            json!({"start_date":"2026-12-24","end_date":"2026-12-01","timezone":"Mars/Base"});
        v["entry"]["colour"] = json!("red");
        v["goals"][0]["within"] = json!(5);
    });
    let ps = problems_of(v);
    let paths: Vec<&str> = ps.iter().map(|s| s.split(' ').next().unwrap()).collect();
    assert!(paths.contains(&"$.steps[0].next"), "{ps:?}");
    assert!(paths.contains(&"$.steps[2].duration"), "{ps:?}");
    assert!(paths.contains(&"$.entry.availability.timezone"), "{ps:?}");
    assert!(paths.contains(&"$.entry.colour"), "{ps:?}");
    assert!(paths.contains(&"$.goals[0].within"), "{ps:?}");
}

#[test]
fn end_date_before_start_date() {
    let v = with(order_journey(), |v| {
        v["entry"]["availability"] =
            json!({"start_date":"2026-12-24","end_date":"2026-12-01","timezone":"UTC"});
    });
    assert_eq!(
        problems_of(v),
        ["$.entry.availability.end_date end date 2026-12-01 is before start date 2026-12-24"]
    );
}

#[test]
fn unreachable_steps_and_instant_loops() {
    let v = with(order_journey(), |v| {
        v["steps"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id":"orphan","type":"exit"}));
    });
    assert_eq!(
        problems_of(v),
        ["$.steps[4] step \"orphan\" is unreachable from the start step"]
    );
    let v = with(order_journey(), |v| {
        v["steps"][1]["next"] = json!("route");
        v["steps"].as_array_mut().unwrap().push(
            json!({"id":"route","type":"split","branches":[{"conditions":[],"next":"notify"}],"default":"end"}),
        );
    });
    let ps = problems_of(v);
    assert_eq!(ps.len(), 2, "{ps:?}"); // the loop, and "pause" is now unreachable
    assert!(
        ps.iter().any(|p| p.contains("loop with no waiting step")),
        "{ps:?}"
    );
    // A loop through a wait is fine.
    let v = with(order_journey(), |v| {
        v["steps"][2]["next"] = json!("wait-ready");
    });
    assert_eq!(problems_of(v), Vec::<String>::new());
}

#[test]
fn duplicates_and_missing_identifier() {
    let v = with(order_journey(), |v| {
        v["steps"][1]["id"] = json!("wait-ready");
        v["goals"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id":"delivered","event":"X"}));
        v["entry"]["sessions"] = json!({"multiple": {}});
    });
    let ps = problems_of(v);
    assert!(
        ps.iter()
            .any(|p| p.starts_with("$.steps[1].id duplicate step id")),
        "{ps:?}"
    );
    assert!(
        ps.iter()
            .any(|p| p.starts_with("$.goals[1].id duplicate goal id")),
        "{ps:?}"
    );
    assert!(
        ps.iter().any(|p| p.contains("missing session identifier")),
        "{ps:?}"
    );
}

#[test]
fn wrong_shapes() {
    assert_eq!(problems_of(json!([])).len(), 1);
    let v = with(order_journey(), |v| {
        v["steps"][0]["type"] = json!("teleport");
        v["entry"]["who"] = json!("everyone");
        v["entry"]["conditions"][0]["value"] = json!("ten");
    });
    let ps = problems_of(v);
    assert_eq!(ps.len(), 3, "{ps:?}");
    let v = with(order_journey(), |v| {
        v["steps"][0].as_object_mut().unwrap().remove("timeout");
    });
    assert_eq!(
        problems_of(v),
        ["$.steps[0].on_timeout on_timeout needs a timeout: add \"timeout\" or remove \"on_timeout\""]
    );
}
