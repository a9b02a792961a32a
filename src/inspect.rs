//! `waymark inspect` and `waymark journeys`: read-only views for operators.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::journey::JourneySet;
use crate::store::rocks::RocksStore;
use crate::store::State;
use crate::time::format_millis;

/// The stores under `dir`: `dir` itself (a replay state), or its `partition-N` directories (the
/// state root of `waymark run`).
fn stores(dir: &Path) -> anyhow::Result<Vec<(Option<i32>, PathBuf)>> {
    let mut parts: Vec<(Option<i32>, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("partition-")?.parse::<i32>().ok()?;
            Some((Some(n), e.path()))
        })
        .collect();
    parts.sort();
    if parts.is_empty() {
        parts.push((None, dir.to_path_buf()));
    }
    Ok(parts)
}

/// A user's sessions (every application, or one) as JSON: journey, step, identifier, context,
/// converted goals and the pending timer.
pub fn user_sessions(
    state_dir: &Path,
    user: &str,
    application: Option<&str>,
) -> anyhow::Result<Value> {
    let mut sessions = Vec::new();
    for (partition, dir) in stores(state_dir)? {
        let store = RocksStore::open_read_only(&dir)?;
        let state = State::new(store)?;
        state.all_sessions(&mut |app, s| {
            if s.user_id == user && application.is_none_or(|a| a == app) {
                sessions.push(json!({
                    "application": app,
                    "journey_id": s.journey_id,
                    "version": s.version,
                    "session_id": s.session_id,
                    "session_key": s.key,
                    "step": s.step,
                    "entered_at": format_millis(s.entered_at),
                    "source_user_id": s.source_user_id,
                    "context": s.context,
                    "converted": s.converted,
                    "timer": s.timer.map(format_millis),
                    "partition": partition,
                }));
            }
            true
        })?;
    }
    Ok(json!({ "user_id": user, "sessions": sessions }))
}

/// The journeys of a set with their status and a content version.
pub fn list_journeys(set: &JourneySet) -> Value {
    let list: Vec<Value> = set
        .journeys
        .iter()
        .map(|j| {
            let version = &j.version;
            json!({
                "id": j.id,
                "application": j.application,
                "status": j.status.as_str(),
                "version": version,
                "entry_event": j.entry.event,
                "steps": j.steps.len(),
                "goals": j.goals.len(),
                "file": j.file,
            })
        })
        .collect();
    Value::Array(list)
}
