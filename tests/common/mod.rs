//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use waymark::journey::load_dir;
use waymark::replay::{replay, ReplayOptions};
use waymark::time::parse_rfc3339;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every fixture directory, sorted.
pub fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// The `until` of a fixture, if it has one.
pub fn until_of(dir: &Path) -> Option<i64> {
    std::fs::read_to_string(dir.join("until"))
        .ok()
        .map(|s| parse_rfc3339(s.trim()).expect("until is RFC 3339"))
}

/// Runs replay in-process; returns (stdout, stderr).
pub fn run_replay(
    journeys: &Path,
    events: &Path,
    until: Option<i64>,
    state: Option<&Path>,
) -> (String, String) {
    let set = Arc::new(load_dir(journeys).unwrap_or_else(|e| panic!("{e}")));
    let opts = ReplayOptions {
        events: events.to_path_buf(),
        until,
        state: state.map(Path::to_path_buf),
        in_memory: false,
        progress: false,
        max_future: None,
        max_event_bytes: waymark::replay::DEFAULT_MAX_EVENT_BYTES,
        cache_bytes: waymark::store::cache::DEFAULT_MAX_BYTES,
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    replay(set, &opts, &mut out, &mut err).unwrap();
    (
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[path = "kafka.rs"]
pub mod kafka;

/// A finished command's standard output as JSON, after asserting that it succeeded (its standard
/// error is the failure message).
pub fn json_stdout(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
