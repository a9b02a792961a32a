//! `waymark backtest` on the golden fixtures: its funnels agree with the records the same run
//! emits (counted independently here), the JSON report of two fixtures matches its golden file,
//! and `--compare` finds exactly the differences a change makes.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use common::*;
use serde_json::Value;
use waymark::backtest::{compare, run_file, Report};
use waymark::journey::load_dir;
use waymark::replay::ReplayOptions;

fn opts(dir: &Path) -> ReplayOptions {
    ReplayOptions {
        events: dir.join("events.jsonl"),
        until: until_of(dir),
        state: None,
        in_memory: false,
        progress: false,
        max_future: None,
        max_event_bytes: waymark::replay::DEFAULT_MAX_EVENT_BYTES,
        cache_bytes: waymark::store::cache::DEFAULT_MAX_BYTES,
    }
}

fn backtest(journeys: &Path, dir: &Path) -> Report {
    let set = Arc::new(load_dir(journeys).unwrap());
    run_file(set, &opts(dir), &mut std::io::sink()).unwrap().0
}

/// For every fixture: entries, step arrivals, ways out, exits, conversions and actions of the
/// report equal what the replay's records say, and every step's arrivals are accounted for
/// (left one way or another, or still there).
#[test]
fn funnels_agree_with_the_records_of_every_fixture() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let report = backtest(&dir.join("journeys"), &dir);
        let (out, _) = run_replay(
            &dir.join("journeys"),
            &dir.join("events.jsonl"),
            until_of(&dir),
            None,
        );
        let records: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(report.records as usize, records.len(), "{name}");
        for j in &report.journeys {
            let mine: Vec<&Value> = records
                .iter()
                .filter(|r| r["journey_id"] == j.journey_id.as_str())
                .collect();
            let count = |t: &str| mine.iter().filter(|r| r["type"] == t).count() as u64;
            assert_eq!(j.entries, count("journey_entry"), "{name} {}", j.journey_id);
            let exits: u64 = j.exits.values().sum();
            assert_eq!(exits, count("journey_exit"), "{name} {}", j.journey_id);
            let converted: u64 = j.goals.iter().map(|g| g.all.converted).sum();
            assert_eq!(converted, count("conversion"), "{name} {}", j.journey_id);
            // A trigger refused as a whole counts once; with `who: {attribute}` a refusal that
            // concerns one target (its profile, its active session) counts per target, as
            // entries do.
            let set = load_dir(&dir.join("journeys")).unwrap();
            let per_target = matches!(
                set.get(&j.journey_id).map(|x| &x.entry.who),
                Some(waymark::journey::Who::Attribute(_))
            );
            if !per_target {
                assert!(j.triggers >= j.refused.values().sum::<u64>(), "{name}");
            }
            let mut arrivals: HashMap<&str, u64> = HashMap::new();
            for r in &mine {
                let at = match r["type"].as_str() {
                    Some("journey_entry") => r["step"].as_str(),
                    Some("step_advance") => r["to"].as_str(),
                    _ => None,
                };
                if let Some(s) = at {
                    *arrivals.entry(s).or_default() += 1;
                }
            }
            for s in &j.steps {
                let left: u64 = s.left.iter().map(|w| w.sessions).sum();
                assert_eq!(
                    s.reached,
                    arrivals.get(s.step.as_str()).copied().unwrap_or(0),
                    "{name} {} {}",
                    j.journey_id,
                    s.step
                );
                assert_eq!(
                    left + s.still_there,
                    s.reached,
                    "{name} {} {}",
                    j.journey_id,
                    s.step
                );
            }
            let sent: u64 = j.actions.iter().map(|a| a.sent).sum();
            let delivered = mine
                .iter()
                .filter(|r| r["type"] == "step_advance" && !r["action"].is_null())
                .count() as u64;
            assert_eq!(sent, delivered, "{name} {}", j.journey_id);
        }
    }
}

/// The JSON report of two fixtures, against its golden file (`WAYMARK_BLESS=1` rewrites them,
/// never under CI).
#[test]
fn json_reports_match_their_golden_files() {
    let bless = std::env::var("WAYMARK_BLESS").is_ok_and(|v| v == "1");
    assert!(
        !(bless && std::env::var_os("CI").is_some()),
        "WAYMARK_BLESS under CI"
    );
    for name in ["seed-order-scenario", "ctl-experiment"] {
        let dir = fixtures().join(name);
        let report = backtest(&dir.join("journeys"), &dir);
        let text = serde_json::to_string_pretty(&report).unwrap() + "\n";
        let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/backtest")
            .join(format!("{name}.json"));
        if bless {
            std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
            std::fs::write(&golden, &text).unwrap();
            continue;
        }
        let expected =
            std::fs::read_to_string(&golden).unwrap_or_else(|_| panic!("no {}", golden.display()));
        assert_eq!(text, expected, "{name}");
    }
}

#[test]
fn a_journey_set_compared_with_itself_has_no_differences() {
    for dir in fixture_dirs() {
        let a = backtest(&dir.join("journeys"), &dir);
        let b = backtest(&dir.join("journeys"), &dir);
        assert_eq!(compare::differences(&a, &b), [], "{}", dir.display());
    }
}

/// A shorter timeout on the order journey's wait: the comparison names the moves that change
/// and nothing else.
#[test]
fn compare_names_what_a_change_does() {
    let dir = fixtures().join("seed-order-scenario");
    let tmp = tempfile::tempdir().unwrap();
    let src = dir.join("journeys/order-journey.json");
    let mut j: Value = serde_json::from_str(&std::fs::read_to_string(&src).unwrap()).unwrap();
    // OrderReady comes an hour or more after OrderPlaced: a one-minute timeout ends every session.
    j["steps"][0]["timeout"] = Value::from("1m");
    std::fs::write(tmp.path().join("order-journey.json"), j.to_string()).unwrap();
    let base = backtest(&dir.join("journeys"), &dir);
    let proposed = backtest(tmp.path(), &dir);
    let d = compare::differences(&base, &proposed);
    let metric = |m: &str| {
        d.iter()
            .find(|x| x.metric == m)
            .map(|x| (x.base, x.proposed))
    };
    assert_eq!(metric("entries"), None, "entries do not change");
    assert_eq!(metric("steps.notify.reached"), Some((Some(2.0), Some(0.0))));
    assert!(
        d.iter()
            .any(|x| x.metric.starts_with("steps.wait-ready.left.timeout")),
        "{d:?}"
    );
}
