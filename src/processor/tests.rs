//! The processor over a real store: profile records stored in their table under the user's
//! prefix, read by conditions, bounded, counted, and erased with everything else of the user.

use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::event::{Event, RawEvent};
use crate::journey::compile_journey;
use crate::profile::ProfileRecord;
use crate::store::rocks::RocksStore;
use crate::store::{user_prefix, Store, Table};

fn journeys() -> Arc<JourneySet> {
    let j = json!({
      "id": "j", "application": "app",
      "entry": { "event": "Go", "reentry": "never", "conditions": [
          { "attribute": "profile.plan", "operator": "eq", "value": "pro" } ] },
      "steps": [ { "id": "w", "type": "wait_for_trigger", "event": "Done" } ]
    });
    Arc::new(JourneySet::new(
        vec![compile_journey("j.json", &j).unwrap()],
    ))
}

fn open(dir: &std::path::Path) -> Processor<RocksStore> {
    let state = State::new(RocksStore::open(dir, false).unwrap()).unwrap();
    Processor::new(journeys(), state).unwrap()
}

fn update(user: &str, attributes: serde_json::Value) -> ProfileRecord {
    ProfileRecord::Update {
        application: "app".into(),
        user_id: user.into(),
        attributes: attributes.as_object().unwrap().clone(),
        time: None,
    }
}

fn erase(user: &str) -> ProfileRecord {
    ProfileRecord::Erase {
        application: "app".into(),
        user_id: user.into(),
        time: None,
    }
}

fn go(user: &str, time: i64) -> Event {
    Event {
        application: "app".into(),
        name: "Go".into(),
        user_id: user.into(),
        attributes: Default::default(),
        time,
        event_id: format!("go-{user}-{time}"),
    }
}

/// Keys stored under the user's prefix: sessions and history, and the profile.
fn keys_of(p: &Processor<RocksStore>, user: &str) -> usize {
    let mut n = 0;
    for table in [Table::Sessions, Table::Profiles] {
        p.state()
            .store()
            .scan_prefix(table, &user_prefix("app", user), &mut |_, _| {
                n += 1;
                true
            })
            .unwrap();
    }
    n
}

#[test]
fn a_profile_is_stored_read_by_conditions_counted_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path());
    let mut out = Output::default();
    let owns = |_: &str| true;
    p.on_event(&go("u", 10), &owns, &mut out).unwrap();
    assert_eq!(out.refused, [("j".to_string(), Refusal::ConditionFalse)]);
    out.clear();
    let applied = p.on_profile(&update("u", json!({"plan": "pro"})), 20, &mut out);
    assert_eq!(applied.unwrap(), Ok(ProfileApplied::Updated));
    assert_eq!(p.state().profiles(), 1);
    p.commit().unwrap();
    drop(p);

    let mut p = open(dir.path());
    assert_eq!(p.state().profiles(), 1, "counted when the state opens");
    p.on_event(&go("u", 30), &owns, &mut out).unwrap();
    assert_eq!(out.records.len(), 1, "entered: {:?}", out.refused);
    // The entry's history is in the sessions table and the profile in its own: each scan finds
    // its own kind only.
    let mut histories = 0;
    p.state()
        .all_histories(&mut |_, _, _| {
            histories += 1;
            true
        })
        .unwrap();
    assert_eq!(histories, 1);
    let mut profiles = Vec::new();
    p.state()
        .all_profiles(&mut |app, user, profile| {
            profiles.push((app.to_string(), user.to_string(), profile));
            true
        })
        .unwrap();
    assert_eq!(profiles.len(), 1);
    assert_eq!(profiles[0].2["plan"], "pro");
    // Removing the last attribute removes the profile.
    p.on_profile(&update("u", json!({"plan": null})), 40, &mut out)
        .unwrap()
        .unwrap();
    assert_eq!(p.state().profiles(), 0);
    assert_eq!(p.state().profile("app", "u").unwrap(), None);
    p.commit().unwrap();
    drop(p);
    let p = open(dir.path());
    assert_eq!(
        p.state().profiles(),
        0,
        "the count is stored with the changes"
    );
}

#[test]
fn an_update_past_the_bound_is_refused_whole_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path());
    p.set_max_profile_bytes(64);
    let mut out = Output::default();
    p.on_profile(&update("u", json!({"plan": "pro", "n": 1})), 1, &mut out)
        .unwrap()
        .unwrap();
    p.commit().unwrap();
    let big = update("u", json!({"plan": "free", "bio": "x".repeat(100)}));
    let refused = p.on_profile(&big, 2, &mut out).unwrap();
    assert_eq!(refused.unwrap_err().reason(), "oversize");
    assert_eq!(p.state().staged(), 0, "nothing staged");
    let stored = p
        .state_mut()
        .user_state("app", "u")
        .unwrap()
        .profile
        .unwrap();
    assert_eq!(stored, *json!({"plan": "pro", "n": 1}).as_object().unwrap());
    assert_eq!(p.state().profiles(), 1);
}

#[test]
fn an_erasure_deletes_every_key_under_the_user_and_ends_the_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path());
    let mut out = Output::default();
    let owns = |_: &str| true;
    p.on_profile(&update("u", json!({"plan": "pro"})), 1, &mut out)
        .unwrap()
        .unwrap();
    p.on_profile(&update("v", json!({"plan": "pro"})), 1, &mut out)
        .unwrap()
        .unwrap();
    p.on_event(&go("u", 10), &owns, &mut out).unwrap();
    p.on_event(&go("v", 10), &owns, &mut out).unwrap();
    p.commit().unwrap();
    assert_eq!(
        keys_of(&p, "u"),
        3,
        "a session, its entry history and a profile"
    );
    out.clear();
    let erased = p.on_profile(&erase("u"), 50, &mut out).unwrap();
    assert_eq!(erased, Ok(ProfileApplied::Erased));
    assert_eq!(out.records.len(), 1);
    let exit = serde_json::to_value(&out.records[0]).unwrap();
    assert_eq!(exit["type"], "journey_exit");
    assert_eq!(exit["reason"], "erased");
    p.commit().unwrap();
    assert_eq!(keys_of(&p, "u"), 0);
    assert_eq!(keys_of(&p, "v"), 3, "another user is untouched");
    assert_eq!(p.state().profiles(), 1);
    assert_eq!(p.next_timer(), None, "no timer was pending");
    // Erasing nobody does nothing.
    out.clear();
    p.on_profile(&erase("nobody"), 60, &mut out)
        .unwrap()
        .unwrap();
    assert!(out.records.is_empty());
    assert_eq!(p.state().staged(), 0);
}

#[test]
fn an_input_no_journey_cares_about_is_never_decoded_and_one_that_is_cared_about_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path());
    let mut out = Output::default();
    let owns = |_: &str| true;
    // Attributes nested past serde_json's depth limit pass the first, shallow decoding stage and
    // are refused only when decoded: which happens only when some journey cares about the event.
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
    let text = |event: &str| {
        format!(r#"{{"application":"app","event":"{event}","userId":"u","attributes":{deep}}}"#)
    };
    let (other, go_deep) = (text("Other"), text("Go"));
    let ignored = p.on_input(
        RawEvent::decode_str(&other).unwrap(),
        10,
        || unreachable!(),
        &owns,
        &mut out,
    );
    assert_eq!(ignored.unwrap(), Ok(InputApplied::TimersOnly));
    let refused = p
        .on_input(
            RawEvent::decode_str(&go_deep).unwrap(),
            10,
            || "x".into(),
            &owns,
            &mut out,
        )
        .unwrap();
    assert!(
        matches!(refused, Err(EventError::NotJson(_))),
        "{refused:?}"
    );
    assert_eq!(p.state().staged(), 0, "a refused input changes nothing");
    p.on_profile(&update("u", json!({"plan": "pro"})), 20, &mut out)
        .unwrap()
        .unwrap();
    out.clear();
    let good = r#"{"application":"app","event":"Go","userId":"u"}"#;
    let applied = p.on_input(
        RawEvent::decode_str(good).unwrap(),
        30,
        || "topic/0/7".into(),
        &owns,
        &mut out,
    );
    assert_eq!(applied.unwrap(), Ok(InputApplied::Event));
    let entry = serde_json::to_value(&out.records[0]).unwrap();
    assert_eq!(entry["type"], "journey_entry");
    assert_eq!(
        entry["event_id"], "topic/0/7",
        "the default id names an input without one"
    );
}
