//! `waymark backtest --html`: the page a browser builds from it (headless Chromium's DOM) carries
//! every funnel number of the JSON report, and it renders (a screenshot is taken to
//! `.run/backtest-funnel.png`). Needs Chromium (`make deps` installs Debian's `chromium`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn chromium() -> PathBuf {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(c).exists() {
            return PathBuf::from(c);
        }
    }
    panic!("no Chromium at /usr/bin/chromium: `make deps` installs Debian's chromium package");
}

fn headless(args: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("running chromium")
}

/// `(data-stage, data-value)` of every bar of one journey section in a DOM dump.
fn bars(dom: &str, journey: &str, side: &str) -> Vec<(String, u64)> {
    let open = format!("data-journey=\"{journey}\" data-side=\"{side}\"");
    let start = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no section {open}"));
    let end = start + dom[start..].find("</section>").expect("section closed");
    let section = &dom[start..end];
    let mut out = Vec::new();
    let mut rest = section;
    while let Some(i) = rest.find("data-stage=\"") {
        rest = &rest[i + 12..];
        let stage = rest[..rest.find('"').unwrap()].to_string();
        let j = rest.find("data-value=\"").unwrap() + 12;
        let value = rest[j..j + rest[j..].find('"').unwrap()].parse().unwrap();
        out.push((stage, value));
    }
    out
}

#[test]
fn the_html_report_shows_every_funnel_number_in_a_browser() {
    let dir = fixtures().join("ctl-experiment");
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_waymark"))
        .args(["backtest", "--json", "--journeys"])
        .arg(dir.join("journeys"))
        .arg("--events")
        .arg(dir.join("events.jsonl"))
        .arg("--html")
        .arg(&page)
        .output()
        .unwrap();
    let report = json_stdout(out);

    let dump = headless(&["--dump-dom", &format!("file://{}", page.display())]);
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dom = String::from_utf8(dump.stdout).unwrap();
    for j in report["journeys"].as_array().unwrap() {
        let id = j["journey_id"].as_str().unwrap();
        let mut expected = vec![
            ("triggers".to_string(), j["triggers"].as_u64().unwrap()),
            ("entries".to_string(), j["entries"].as_u64().unwrap()),
        ];
        for s in j["steps"].as_array().unwrap() {
            expected.push((
                format!("step:{}", s["step"].as_str().unwrap()),
                s["reached"].as_u64().unwrap(),
            ));
        }
        for g in j["goals"].as_array().unwrap() {
            expected.push((
                format!("goal:{}", g["goal"].as_str().unwrap()),
                g["converted"].as_u64().unwrap(),
            ));
        }
        assert_eq!(bars(&dom, id, ""), expected, "journey {id}");
        assert!(expected[1].1 > 0, "the fixture enters someone");
    }
    // The tables made it into the DOM whole (a malformed page would lose or move them).
    assert_eq!(
        dom.matches("<section class=\"journey\"").count(),
        report["journeys"].as_array().unwrap().len()
    );
    assert!(dom.contains("<table class=\"goals\">"));

    // It renders: a screenshot, kept in .run/ for people to look at.
    let run = Path::new(env!("CARGO_MANIFEST_DIR")).join(".run");
    std::fs::create_dir_all(&run).unwrap();
    let shot = run.join("backtest-funnel.png");
    let _ = std::fs::remove_file(&shot);
    let r = headless(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1100,1500",
        &format!("file://{}", page.display()),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let png = std::fs::read(&shot).expect("a screenshot");
    assert_eq!(&png[1..4], b"PNG");
    assert!(
        png.len() > 10_000,
        "a page with content: {} bytes",
        png.len()
    );
}

/// `--compare` of a journey set with itself: both sides next to each other with the same bars,
/// and no differences.
#[test]
fn the_html_comparison_shows_both_sides_and_no_difference_for_the_same_set() {
    let dir = fixtures().join("ctl-experiment");
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("compare.html");
    let out = Command::new(env!("CARGO_BIN_EXE_waymark"))
        .args(["backtest", "--journeys"])
        .arg(dir.join("journeys"))
        .arg("--compare")
        .arg(dir.join("journeys"))
        .arg("--events")
        .arg(dir.join("events.jsonl"))
        .arg("--html")
        .arg(&page)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = headless(&["--dump-dom", &format!("file://{}", page.display())]);
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dom = String::from_utf8(dump.stdout).unwrap();
    let base = bars(&dom, "welcome", "base");
    assert!(!base.is_empty());
    assert_eq!(base, bars(&dom, "welcome", "proposed"));
    // The two sections share one row.
    let row = dom.find("<div class=\"pair\"><section class=\"journey\" data-journey=\"welcome\" data-side=\"base\"");
    assert!(row.is_some(), "base and proposed of a journey in one row");
    assert!(dom.contains("no differences"));
}
