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
/// converted goals and the pending timer; and the user's history (past entries of journeys with
/// re-entry rules, delivered actions counted by caps); and the user's profile per application.
pub fn user_sessions(
    state_dir: &Path,
    user: &str,
    application: Option<&str>,
) -> anyhow::Result<Value> {
    let mut sessions = Vec::new();
    let mut histories = Vec::new();
    let mut profiles = Vec::new();
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
        state.all_histories(&mut |app, u, h| {
            if u == user && application.is_none_or(|a| a == app) {
                histories.push(json!({
                    "application": app,
                    "journeys": h.journeys.iter().map(|j| json!({
                        "journey_id": j.journey_id,
                        "entries": j.entries,
                        "last_entry": j.keys.iter().map(|k| json!({
                            "session_key": k.key, "at": format_millis(k.last),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                    "deliveries": h.deliveries.iter().map(|d| json!({
                        "action": d.action, "at": format_millis(d.at),
                    })).collect::<Vec<_>>(),
                    "partition": partition,
                }));
            }
            true
        })?;
        state.all_profiles(&mut |app, u, p| {
            if u == user && application.is_none_or(|a| a == app) {
                profiles.push(json!({
                    "application": app,
                    "attributes": p,
                    "partition": partition,
                }));
            }
            true
        })?;
    }
    Ok(json!({
        "user_id": user,
        "profile": profiles,
        "sessions": sessions,
        "history": histories,
    }))
}

/// The journeys of a set with their status and a content version, then the application
/// policies (entries with `policy_for`), by application.
pub fn list_journeys(set: &JourneySet) -> Value {
    let mut policies: Vec<_> = set.policies().values().collect();
    policies.sort_by(|a, b| a.application.cmp(&b.application));
    let policies = policies.into_iter().map(|p| {
        json!({
            "policy_for": p.application,
            "timezone_attribute": p.timezone_attribute,
            "default_timezone": p.default_timezone.name(),
            "quiet_hours": p.quiet_hours.map(|q| json!({
                "start": q.start.format("%H:%M").to_string(),
                "end": q.end.format("%H:%M").to_string(),
            })),
            "frequency_caps": p.caps.iter().map(|c| json!({
                "action": c.action, "max": c.max, "per": c.per.as_str(),
            })).collect::<Vec<_>>(),
            "file": p.file,
        })
    });
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
        .chain(policies)
        .collect();
    Value::Array(list)
}
