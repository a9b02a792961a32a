//! Journey changes: a changed journey is a new version; sessions continue on the version they
//! entered with (also in a processor that opens the store later, as a new partition owner does);
//! `paused` stops entries while sessions go on; `archived` ends sessions with reason `archived`.

use std::sync::Arc;

use serde_json::{json, Value};
use waymark::event::Event;
use waymark::journey::{compile_journey, JourneySet};
use waymark::processor::{Output, Processor};
use waymark::record::Record;
use waymark::store::rocks::RocksStore;
use waymark::store::State;

fn set(journeys: &[Value]) -> Arc<JourneySet> {
    Arc::new(JourneySet::new(
        journeys
            .iter()
            .map(|j| compile_journey("t.json", j).unwrap())
            .collect(),
    ))
}

fn v1() -> Value {
    json!({"id": "j", "application": "a", "entry": {"event": "Start"},
           "steps": [{"id": "w1", "type": "wait_for_trigger", "event": "Go", "next": "x"},
                     {"id": "x", "type": "exit"}]})
}

/// The same journey id with different steps: waits for another event.
fn v2(status: &str) -> Value {
    json!({"id": "j", "application": "a", "status": status, "entry": {"event": "Start"},
           "steps": [{"id": "w2", "type": "wait_for_trigger", "event": "Other", "next": "y"},
                     {"id": "y", "type": "exit"}]})
}

fn ev(name: &str, user: &str, t: i64) -> Event {
    Event {
        application: "a".into(),
        name: name.into(),
        user_id: user.into(),
        attributes: Default::default(),
        time: 1_795_860_000_000 + t,
        event_id: format!("{name}-{user}-{t}"),
    }
}

fn open(dir: &std::path::Path, journeys: Arc<JourneySet>) -> Processor<RocksStore> {
    Processor::new(
        journeys,
        State::new(RocksStore::open(dir, false).unwrap()).unwrap(),
    )
    .unwrap()
}

fn run(p: &mut Processor<RocksStore>, e: Event) -> Vec<String> {
    let mut out = Output::default();
    p.on_event(&e, &|_| true, &mut out).unwrap();
    p.commit().unwrap();
    summary(&out.records)
}

fn summary(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| match r {
            Record::JourneyEntry(e) => format!("{} entry@{}", e.user_id, e.step),
            Record::StepAdvance(m) => format!(
                "{} {}->{}",
                m.user_id,
                m.from,
                m.to.as_deref().unwrap_or("")
            ),
            Record::JourneyExit(m) => format!("{} exit:{}", m.user_id, m.reason),
            Record::Conversion(c) => format!("{} conv", c.user_id),
        })
        .collect()
}

#[test]
fn sessions_continue_on_their_version_and_new_entries_use_the_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = open(tmp.path(), set(&[v1()]));
    assert_eq!(run(&mut p, ev("Start", "old", 0)), ["old entry@w1"]);
    p.set_journeys(set(&[v2("active")]));
    assert_eq!(run(&mut p, ev("Start", "new", 1)), ["new entry@w2"]);
    // "old" still waits for Go (v1); "new" waits for Other (v2).
    assert_eq!(run(&mut p, ev("Other", "old", 2)), Vec::<String>::new());
    assert_eq!(
        run(&mut p, ev("Go", "old", 3)),
        ["old w1->x", "old exit:completed"]
    );
    assert_eq!(run(&mut p, ev("Go", "new", 4)), Vec::<String>::new());
    assert_eq!(
        run(&mut p, ev("Other", "new", 5)),
        ["new w2->y", "new exit:completed"]
    );
}

#[test]
fn a_new_owner_of_the_store_has_the_versions() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut p = open(tmp.path(), set(&[v1()]));
        assert_eq!(run(&mut p, ev("Start", "u", 0)), ["u entry@w1"]);
        p.state().flush().unwrap();
    }
    // Another instance, which only knows v2, opens the same partition's state.
    let mut q = open(tmp.path(), set(&[v2("active")]));
    assert_eq!(
        run(&mut q, ev("Go", "u", 1)),
        ["u w1->x", "u exit:completed"]
    );
}

#[test]
fn paused_stops_entries_and_archived_ends_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = open(tmp.path(), set(&[v1()]));
    assert_eq!(run(&mut p, ev("Start", "a1", 0)), ["a1 entry@w1"]);
    p.set_journeys(set(&[v2("paused")]));
    assert_eq!(
        run(&mut p, ev("Start", "a2", 1)),
        Vec::<String>::new(),
        "paused: no entry"
    );
    assert_eq!(
        run(&mut p, ev("Go", "a1", 2)),
        ["a1 w1->x", "a1 exit:completed"],
        "sessions go on"
    );
    assert_eq!(run(&mut p, ev("Start", "a3", 3)), Vec::<String>::new());
    p.set_journeys(set(&[v1()]));
    assert_eq!(run(&mut p, ev("Start", "a4", 4)), ["a4 entry@w1"]);
    let mut archived = v1();
    archived["status"] = json!("archived");
    p.set_journeys(set(&[archived]));
    let mut out = Output::default();
    p.archive_sessions(1_795_860_000_100, &mut out).unwrap();
    p.commit().unwrap();
    assert_eq!(summary(&out.records), ["a4 exit:archived"]);
    assert_eq!(
        run(&mut p, ev("Go", "a4", 5)),
        Vec::<String>::new(),
        "the session is gone"
    );
    assert_eq!(
        run(&mut p, ev("Start", "a5", 6)),
        Vec::<String>::new(),
        "archived: no entry"
    );
}

/// Old versions do not pile up: once no session is on a version, `collect_versions` (run at each
/// reload and partition open) deletes its stored definition and drops its compiled copy.
#[test]
fn versions_no_session_is_on_are_forgotten() {
    let tmp = tempfile::tempdir().unwrap();
    let version = |j: Value| compile_journey("t.json", &j).unwrap().version;
    let (old, new) = (version(v1()), version(v2("active")));
    let stored = |p: &Processor<RocksStore>| -> Vec<String> {
        let mut keys: Vec<String> = p
            .state()
            .meta_with_prefix("journey/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        keys
    };
    let mut p = open(tmp.path(), set(&[v1()]));
    assert_eq!(run(&mut p, ev("Start", "u", 0)), ["u entry@w1"]);
    p.set_journeys(set(&[v2("active")]));
    assert_eq!(
        p.collect_versions().unwrap(),
        0,
        "u is still on the old version"
    );
    assert!(p.engine().journeys().has_version("j", &old));
    assert_eq!(run(&mut p, ev("Start", "w", 1)), ["w entry@w2"]);
    let mut both = [format!("journey/j/{old}"), format!("journey/j/{new}")];
    both.sort();
    assert_eq!(stored(&p), both);
    assert_eq!(
        run(&mut p, ev("Go", "u", 2)),
        ["u w1->x", "u exit:completed"]
    );
    assert_eq!(p.collect_versions().unwrap(), 1);
    p.commit().unwrap();
    assert_eq!(stored(&p), [format!("journey/j/{new}")]);
    assert!(!p.engine().journeys().has_version("j", &old));
    // The current version's session goes on.
    assert_eq!(
        run(&mut p, ev("Other", "w", 3)),
        ["w w2->y", "w exit:completed"]
    );
    // Nothing stored beyond the current versions: no scan, nothing to do.
    assert_eq!(p.collect_versions().unwrap(), 0);
}
