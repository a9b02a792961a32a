//! The deploy files: every YAML and JSON file parses, the Dockerfile builds the way the Makefile
//! does, and every metric the dashboard and the alert rules use is one a running instance exports.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::kafka::*;
use serde_json::json;

fn deploy_files(ext: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, ext: &[&str], out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, ext, out);
            } else if p.extension().is_some_and(|x| ext.iter().any(|e| x == *e)) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"),
        ext,
        &mut out,
    );
    out.sort();
    out
}

#[test]
fn every_yaml_and_json_file_parses() {
    let yaml = deploy_files(&["yaml", "yml"]);
    assert!(yaml.len() >= 5, "{yaml:?}");
    for f in yaml {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut docs = 0;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(!v.is_null(), "{}: empty document", f.display());
            docs += 1;
        }
        assert!(docs >= 1, "{}", f.display());
    }
    let jsons = deploy_files(&["json"]);
    assert!(!jsons.is_empty());
    for f in jsons {
        let text = std::fs::read_to_string(&f).unwrap();
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}

use serde::Deserialize;

#[test]
fn the_dockerfile_builds_as_the_makefile_does() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docker = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let make = std::fs::read_to_string(root.join("Makefile")).unwrap();
    let deps_line = make
        .lines()
        .find(|l| l.contains("for p in") && l.contains("cmake"))
        .expect("the Makefile's deps list");
    for pkg in [
        "cmake",
        "clang",
        "libclang-dev",
        "libcurl4-openssl-dev",
        "pkg-config",
        "build-essential",
    ] {
        assert!(deps_line.contains(pkg), "Makefile deps lack {pkg}");
        assert!(docker.contains(pkg), "Dockerfile lacks {pkg}");
    }
    assert!(make.contains("PROFILE := --release") && docker.contains("cargo build --release"));
    assert!(docker.contains("USER waymark") && docker.contains("VOLUME /var/lib/waymark/state"));
}

/// Metric names (without histogram suffixes) in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("waymark_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end] == b'_'
                || bytes[end].is_ascii_digit())
        {
            end += 1;
        }
        let mut name = text[start..end].to_string();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                name = base.to_string();
            }
        }
        out.insert(name);
        i = end;
    }
    out
}

#[test]
fn dashboard_and_alert_metrics_are_exported_by_a_running_instance() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut used =
        metric_names(&std::fs::read_to_string(root.join("deploy/grafana/waymark.json")).unwrap());
    used.extend(metric_names(
        &std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap(),
    ));
    assert!(used.len() >= 15, "{used:?}");

    // A workload that touches every metric: the seed scenario, a bad record, a short delay.
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journeys");
    std::fs::create_dir_all(&jdir).unwrap();
    for e in std::fs::read_dir(root.join("config/journeys")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, jdir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        jdir.join("nudge.json"),
        json!({"id": "nudge", "application": "XXXXX-XXXXX", "entry": {"event": "Nudge"},
               "steps": [{"id": "p", "type": "delay", "duration": "1s", "next": "x"}, {"id": "x", "type": "exit"}]})
        .to_string(),
    )
    .unwrap();
    own_broker();
    let s = Setup {
        names: Names::new("deploy"),
        journeys: jdir,
        state: tmp.path().join("state"),
        partitions: 4,
        extra_env: Vec::new(),
    };
    let mut a = s.start("a");
    a.wait_ready(Duration::from_secs(60));
    let text = std::fs::read_to_string(root.join("config/scenario/seed-events.jsonl")).unwrap();
    let mut events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    events.push(json!({"application": "XXXXX-XXXXX", "event": "Nudge", "userId": 5, "timestamp": now_ms(), "eventId": "n"}));
    // The journey controls scenario: a quiet-hours hold and release, a capped action.
    let controls =
        std::fs::read_to_string(root.join("config/scenario/controls-events.jsonl")).unwrap();
    events.extend(
        controls
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()),
    );
    produce_events(&s.names.events, &events);
    produce(&s.names.events, &[(None, Some(0), b"not json".to_vec())]);
    let mut missing = used.clone();
    for _ in 0..60 {
        let exported = a.metrics();
        missing.retain(|m| !exported.contains(&format!("# TYPE {m} ")));
        if missing.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        missing.is_empty(),
        "used by the dashboard or alerts but not exported: {missing:?}"
    );
    assert!(a.stop().success());
}
