//! Golden-file tests: `tests/fixtures/NAME/{journeys/, events.jsonl, expected.jsonl}`, with an
//! optional `until` (RFC 3339) and `expected-stderr.txt`. Each fixture is replayed and its records
//! compared line by line with `expected.jsonl`. `WAYMARK_BLESS=1` rewrites the expected files
//! (review the diff before committing).

mod common;

use common::*;

#[test]
fn every_fixture_matches_its_golden_output() {
    let bless = std::env::var("WAYMARK_BLESS").is_ok_and(|v| v == "1");
    // Blessing rewrites the expected files, so it would pass anything: never in CI.
    assert!(
        !(bless && std::env::var_os("CI").is_some()),
        "WAYMARK_BLESS is set under CI: a blessing run proves nothing"
    );
    let mut failures = Vec::new();
    let dirs = fixture_dirs();
    assert!(dirs.len() >= 10, "fixtures are missing");
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let (out, err) = run_replay(
            &dir.join("journeys"),
            &dir.join("events.jsonl"),
            until_of(&dir),
            None,
        );
        let expected_path = dir.join("expected.jsonl");
        let stderr_path = dir.join("expected-stderr.txt");
        if bless {
            std::fs::write(&expected_path, &out).unwrap();
            if err.is_empty() {
                let _ = std::fs::remove_file(&stderr_path);
            } else {
                std::fs::write(&stderr_path, &err).unwrap();
            }
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{name}: no expected.jsonl"));
        if out != expected {
            let diff: Vec<String> = out
                .lines()
                .zip(expected.lines().chain(std::iter::repeat("<missing>")))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .take(3)
                .map(|(i, (a, b))| format!("  line {}:\n    got      {a}\n    expected {b}", i + 1))
                .collect();
            failures.push(format!(
                "{name}: {} records, expected {}\n{}",
                out.lines().count(),
                expected.lines().count(),
                diff.join("\n")
            ));
        }
        let expected_err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if err != expected_err {
            failures.push(format!("{name}: stderr {err:?}, expected {expected_err:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// State survives restarts: the first half of a file and then the second half, over one state
/// directory, print exactly what one run over the whole file prints.
#[test]
fn split_replay_over_one_state_equals_one_run() {
    for dir in fixture_dirs() {
        let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
        let lines: Vec<&str> = events.lines().collect();
        for cut in [lines.len() / 2, 1, lines.len().saturating_sub(1)] {
            let tmp = tempfile::tempdir().unwrap();
            let first = tmp.path().join("first.jsonl");
            let second = tmp.path().join("second.jsonl");
            std::fs::write(
                &first,
                lines[..cut]
                    .iter()
                    .map(|l| format!("{l}\n"))
                    .collect::<String>(),
            )
            .unwrap();
            std::fs::write(
                &second,
                lines[cut..]
                    .iter()
                    .map(|l| format!("{l}\n"))
                    .collect::<String>(),
            )
            .unwrap();
            let state = tmp.path().join("state");
            let journeys = dir.join("journeys");
            let (a, _) = run_replay(&journeys, &first, None, Some(&state));
            let (b, _) = run_replay(&journeys, &second, until_of(&dir), Some(&state));
            let (whole, _) = run_replay(&journeys, &dir.join("events.jsonl"), until_of(&dir), None);
            assert_eq!(format!("{a}{b}"), whole, "{} cut at {cut}", dir.display());
        }
    }
}
