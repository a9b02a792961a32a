//! Checking a journey definition and compiling it, reporting every problem at once.

use std::collections::HashMap;

use chrono::NaiveDate;
use chrono_tz::Tz;
use serde_json::{Map, Value};

use super::condition::{compile_conditions, kind};
use super::controls::{
    action_flags, compile_exit_on, compile_experiment, compile_holdout, compile_max_entries,
    compile_reentry, compile_wait, compile_zone_keys,
};
use super::graph::check_graph;
use super::{
    Entry, Goal, Journey, Problem, Problems, SessionMode, Status, Step, StepIx, StepKind, Who,
    Window,
};
use crate::time::{parse_duration, Millis};

const ROOT_KEYS: &[&str] = &[
    "id",
    "application",
    "name",
    "description",
    "status",
    "entry",
    "start",
    "steps",
    "goals",
    "exit_on",
    "holdout",
    "quiet_hours",
    "timezone_attribute",
    "default_timezone",
];
const ENTRY_KEYS: &[&str] = &[
    "event",
    "conditions",
    "match",
    "who",
    "availability",
    "sessions",
    "reentry",
    "max_entries",
];
const GOAL_KEYS: &[&str] = &["id", "event", "conditions", "match", "within", "exit"];

/// Most steps a journey may have. It bounds the depth of a chain of instant steps (action, split,
/// experiment), which validation and the engine walk recursively.
pub const MAX_STEPS: usize = 1000;

/// Checks one definition and compiles it; every problem found is returned.
pub fn compile_journey(file: &str, v: &Value) -> Result<Journey, Vec<Problem>> {
    let mut p = Problems::new(file);
    let Some(root) = v.as_object() else {
        p.add(
            "$",
            format!("a journey must be a JSON object, found {}", kind(v)),
        );
        return Err(p.list);
    };
    p.unknown_keys(root, "$", ROOT_KEYS);
    let id = req_str(root, "$", "id", &mut p);
    let application = req_str(root, "$", "application", &mut p);
    opt_str(root, "$", "name", &mut p);
    opt_str(root, "$", "description", &mut p);
    let status = match root.get("status") {
        None | Some(Value::Null) => Status::Active,
        Some(Value::String(s)) if s == "active" => Status::Active,
        Some(Value::String(s)) if s == "paused" => Status::Paused,
        Some(Value::String(s)) if s == "archived" => Status::Archived,
        Some(other) => {
            p.add(
                "$.status",
                format!("status must be \"active\", \"paused\" or \"archived\", found {other}"),
            );
            Status::Active
        }
    };
    let entry = match root.get("entry") {
        Some(Value::Object(e)) => compile_entry(e, &mut p),
        Some(other) => {
            p.add(
                "$.entry",
                format!("entry must be an object, found {}", kind(other)),
            );
            None
        }
        None => {
            p.add("$", "missing field \"entry\"");
            None
        }
    };
    let (steps, start) = compile_steps(root, &mut p);
    let goals = compile_goals(root, &mut p);
    let exit_on = compile_exit_on(root, &mut p);
    let holdout = compile_holdout(root, &mut p);
    let (quiet_hours, timezone_attribute, default_timezone) = compile_zone_keys(root, &mut p);
    if !p.is_empty() {
        return Err(p.list);
    }
    match (id, application, entry, start) {
        (Some(id), Some(application), Some(entry), Some(start)) => Ok(Journey {
            id,
            application,
            status,
            entry,
            start,
            steps,
            goals,
            exit_on,
            holdout,
            quiet_hours,
            timezone_attribute,
            default_timezone,
            version: format!(
                "{:016x}",
                xxhash_rust::xxh3::xxh3_64(v.to_string().as_bytes())
            ),
            source: v.clone(),
            file: file.to_string(),
        }),
        _ => {
            p.add("$", "incomplete definition");
            Err(p.list)
        }
    }
}

pub(super) fn req_str(
    obj: &Map<String, Value>,
    path: &str,
    key: &str,
    p: &mut Problems,
) -> Option<String> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            p.add(
                format!("{path}.{key}"),
                format!("{key} must be a non-empty string, found {other}"),
            );
            None
        }
        None => {
            p.add(path, format!("missing field {key:?}"));
            None
        }
    }
}

fn opt_str(obj: &Map<String, Value>, path: &str, key: &str, p: &mut Problems) -> Option<String> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(_) => req_str(obj, path, key, p),
    }
}

pub(super) fn opt_duration(
    obj: &Map<String, Value>,
    path: &str,
    key: &str,
    p: &mut Problems,
) -> Option<Millis> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match parse_duration(s) {
            Ok(ms) => Some(ms),
            Err(e) => {
                p.add(format!("{path}.{key}"), e);
                None
            }
        },
        Some(other) => {
            p.add(
                format!("{path}.{key}"),
                format!("{key} must be a duration such as \"3d\" or \"1d12h\", found {other}"),
            );
            None
        }
    }
}

fn compile_entry(e: &Map<String, Value>, p: &mut Problems) -> Option<Entry> {
    let path = "$.entry";
    p.unknown_keys(e, path, ENTRY_KEYS);
    let event = req_str(e, path, "event", p);
    let conditions = compile_conditions(e, path, p);
    let who = match e.get("who") {
        None | Some(Value::Null) => Who::EventUser,
        Some(Value::String(s)) if s == "event_user" => Who::EventUser,
        Some(Value::Object(o)) => {
            p.unknown_keys(o, "$.entry.who", &["attribute"]);
            match req_str(o, "$.entry.who", "attribute", p) {
                Some(a) => Who::Attribute(a),
                None => Who::EventUser,
            }
        }
        Some(other) => {
            p.add(
                "$.entry.who",
                format!("who must be \"event_user\" or {{\"attribute\": \"NAME\"}}, found {other}"),
            );
            Who::EventUser
        }
    };
    let window = match e.get("availability") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "any_time" => None,
        Some(Value::Object(o)) => compile_window(o, p),
        Some(other) => {
            p.add(
                "$.entry.availability",
                format!(
                    "availability must be \"any_time\" or {{\"start_date\", \"end_date\", \"timezone\"}}, found {other}"
                ),
            );
            None
        }
    };
    let sessions = match e.get("sessions") {
        None | Some(Value::Null) => SessionMode::Single,
        Some(Value::String(s)) if s == "single" => SessionMode::Single,
        Some(Value::Object(o)) => {
            p.unknown_keys(o, "$.entry.sessions", &["multiple"]);
            match o.get("multiple") {
                Some(Value::Object(m)) => {
                    p.unknown_keys(m, "$.entry.sessions.multiple", &["identifier"]);
                    match m.get("identifier") {
                        Some(Value::String(s)) if !s.is_empty() => SessionMode::Multiple {
                            identifier: s.clone(),
                        },
                        Some(other) => {
                            p.add(
                                "$.entry.sessions.multiple.identifier",
                                format!("the session identifier must be an attribute name, found {other}"),
                            );
                            SessionMode::Single
                        }
                        None => {
                            p.add(
                                "$.entry.sessions.multiple",
                                "missing session identifier: multiple sessions need {\"identifier\": \"ATTRIBUTE\"}",
                            );
                            SessionMode::Single
                        }
                    }
                }
                _ => {
                    p.add(
                        "$.entry.sessions",
                        "sessions must be \"single\" or {\"multiple\": {\"identifier\": \"ATTRIBUTE\"}}",
                    );
                    SessionMode::Single
                }
            }
        }
        Some(other) => {
            p.add(
                "$.entry.sessions",
                format!(
                    "sessions must be \"single\" or {{\"multiple\": {{\"identifier\": \"ATTRIBUTE\"}}}}, found {other}"
                ),
            );
            SessionMode::Single
        }
    };
    let reentry = compile_reentry(e, p);
    let max_entries = compile_max_entries(e, p);
    Some(Entry {
        event: event?,
        conditions,
        who,
        window,
        sessions,
        reentry,
        max_entries,
    })
}

fn compile_window(o: &Map<String, Value>, p: &mut Problems) -> Option<Window> {
    let path = "$.entry.availability";
    p.unknown_keys(o, path, &["start_date", "end_date", "timezone"]);
    let date = |key: &str, p: &mut Problems| -> Option<NaiveDate> {
        let s = req_str(o, path, key, p)?;
        match NaiveDate::parse_from_str(&s, "%Y-%m-%d") {
            Ok(d) if s.len() == 10 => Some(d),
            _ => {
                p.add(
                    format!("{path}.{key}"),
                    format!("{key} must be a date as YYYY-MM-DD, found {s:?}"),
                );
                None
            }
        }
    };
    let start = date("start_date", p);
    let end = date("end_date", p);
    let tz = req_str(o, path, "timezone", p).and_then(|s| match s.parse::<Tz>() {
        Ok(tz) => Some(tz),
        Err(_) => {
            p.add(
                format!("{path}.timezone"),
                format!(
                    "unknown IANA timezone {s:?} (use names such as \"Europe/Berlin\" or \"UTC\")"
                ),
            );
            None
        }
    });
    let (start, end, tz) = (start?, end?, tz?);
    if end < start {
        p.add(
            format!("{path}.end_date"),
            format!("end date {end} is before start date {start}"),
        );
        return None;
    }
    let w = Window::new(start, end, tz);
    if w.is_none() {
        p.add(path, "the window cannot be resolved in that timezone");
    }
    w
}

fn compile_steps(root: &Map<String, Value>, p: &mut Problems) -> (Vec<Step>, Option<StepIx>) {
    let items = match root.get("steps") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            p.add("$.steps", "a journey needs at least one step");
            return (Vec::new(), None);
        }
        Some(other) => {
            p.add(
                "$.steps",
                format!("steps must be an array, found {}", kind(other)),
            );
            return (Vec::new(), None);
        }
        None => {
            p.add("$", "missing field \"steps\"");
            return (Vec::new(), None);
        }
    };
    if items.len() > MAX_STEPS {
        p.add(
            "$.steps",
            format!(
                "a journey has at most {MAX_STEPS} steps, found {}",
                items.len()
            ),
        );
        return (Vec::new(), None);
    }
    // First pass: ids, so references can be resolved in any order.
    let mut ids: HashMap<String, StepIx> = HashMap::new();
    let mut names: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("$.steps[{i}]");
        let name = match item.as_object().map(|o| o.get("id")) {
            Some(Some(Value::String(s))) if !s.is_empty() => s.clone(),
            Some(Some(other)) => {
                p.add(
                    format!("{path}.id"),
                    format!("id must be a non-empty string, found {other}"),
                );
                String::new()
            }
            Some(None) => {
                p.add(&path, "missing field \"id\"");
                String::new()
            }
            None => {
                p.add(
                    &path,
                    format!("a step must be an object, found {}", kind(item)),
                );
                String::new()
            }
        };
        if !name.is_empty() {
            if let Some(first) = ids.get(&name) {
                p.add(
                    format!("{path}.id"),
                    format!("duplicate step id {name:?}, first used at $.steps[{first}]"),
                );
            } else {
                ids.insert(name.clone(), i);
            }
        }
        names.push(name);
    }
    let mut steps = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("$.steps[{i}]");
        let kind = match item.as_object() {
            Some(o) => compile_step(o, &path, &ids, p),
            None => StepKind::Exit,
        };
        steps.push(Step {
            id: names[i].clone(),
            kind,
        });
    }
    let start = match root.get("start") {
        None | Some(Value::Null) => Some(0),
        Some(Value::String(s)) => match ids.get(s) {
            Some(&ix) => Some(ix),
            None => {
                p.add("$.start", format!("unknown step id {s:?}"));
                None
            }
        },
        Some(other) => {
            p.add("$.start", format!("start must be a step id, found {other}"));
            None
        }
    };
    if let Some(start) = start {
        if p.is_empty() {
            check_graph(&steps, start, p);
        }
    }
    (steps, start)
}

pub(super) fn step_ref(
    o: &Map<String, Value>,
    path: &str,
    key: &str,
    ids: &HashMap<String, StepIx>,
    p: &mut Problems,
) -> Option<StepIx> {
    match o.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match ids.get(s) {
            Some(&ix) => Some(ix),
            None => {
                p.add(format!("{path}.{key}"), format!("unknown step id {s:?}"));
                None
            }
        },
        Some(other) => {
            p.add(
                format!("{path}.{key}"),
                format!("{key} must be a step id, found {other}"),
            );
            None
        }
    }
}

fn compile_step(
    o: &Map<String, Value>,
    path: &str,
    ids: &HashMap<String, StepIx>,
    p: &mut Problems,
) -> StepKind {
    let ty = match o.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            p.add(
                format!("{path}.type"),
                format!("type must be a string, found {other}"),
            );
            return StepKind::Exit;
        }
        None => {
            p.add(path, "missing field \"type\"");
            return StepKind::Exit;
        }
    };
    if ty != "action" {
        action_flags(o, path, false, p);
    }
    let o = &without_action_flags(o, ty);
    match ty {
        "wait_for_trigger" => compile_wait(o, path, ids, p),
        "delay" => {
            p.unknown_keys(o, path, &["id", "type", "duration", "next"]);
            let duration = opt_duration(o, path, "duration", p);
            if !o.contains_key("duration") {
                p.add(path, "missing field \"duration\"");
            }
            StepKind::Delay {
                duration: duration.unwrap_or(1),
                next: step_ref(o, path, "next", ids, p),
            }
        }
        "action" => {
            p.unknown_keys(
                o,
                path,
                &[
                    "id",
                    "type",
                    "action",
                    "params",
                    "next",
                    "ignore_quiet_hours",
                    "ignore_caps",
                ],
            );
            let action = req_str(o, path, "action", p).unwrap_or_default();
            let params = o.get("params").cloned().unwrap_or(Value::Null);
            let (ignore_quiet_hours, ignore_caps) = action_flags(o, path, true, p);
            StepKind::Action {
                action,
                params,
                next: step_ref(o, path, "next", ids, p),
                ignore_quiet_hours,
                ignore_caps,
            }
        }
        "split" => {
            p.unknown_keys(o, path, &["id", "type", "branches", "default"]);
            let mut branches = Vec::new();
            match o.get("branches") {
                Some(Value::Array(items)) => {
                    for (i, b) in items.iter().enumerate() {
                        let bpath = format!("{path}.branches[{i}]");
                        let Some(bo) = b.as_object() else {
                            p.add(
                                &bpath,
                                format!("a branch must be an object, found {}", kind(b)),
                            );
                            continue;
                        };
                        p.unknown_keys(bo, &bpath, &["conditions", "match", "next"]);
                        let conditions = compile_conditions(bo, &bpath, p);
                        if !bo.contains_key("next") {
                            p.add(&bpath, "missing field \"next\"");
                        }
                        if let Some(next) = step_ref(bo, &bpath, "next", ids, p) {
                            branches.push((conditions, next));
                        }
                    }
                }
                Some(other) => p.add(
                    format!("{path}.branches"),
                    format!("branches must be an array, found {}", kind(other)),
                ),
                None => p.add(path, "missing field \"branches\""),
            }
            StepKind::Split {
                branches,
                default: step_ref(o, path, "default", ids, p),
            }
        }
        "experiment" => compile_experiment(o, path, ids, p),
        "exit" => {
            p.unknown_keys(o, path, &["id", "type"]);
            StepKind::Exit
        }
        other => {
            p.add(
                format!("{path}.type"),
                format!(
                    "unknown step type {other:?}; expected wait_for_trigger, delay, action, split, experiment or exit"
                ),
            );
            StepKind::Exit
        }
    }
}

/// The step without the action-only flags, once they have been reported on a non-action step
/// (so they are not reported again as unknown keys).
fn without_action_flags(o: &Map<String, Value>, ty: &str) -> Map<String, Value> {
    let mut o = o.clone();
    if ty != "action" {
        o.remove("ignore_quiet_hours");
        o.remove("ignore_caps");
    }
    o
}

fn compile_goals(root: &Map<String, Value>, p: &mut Problems) -> Vec<Goal> {
    let items = match root.get("goals") {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(items)) => items,
        Some(other) => {
            p.add(
                "$.goals",
                format!("goals must be an array, found {}", kind(other)),
            );
            return Vec::new();
        }
    };
    let mut goals: Vec<Goal> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("$.goals[{i}]");
        let Some(o) = item.as_object() else {
            p.add(
                &path,
                format!("a goal must be an object, found {}", kind(item)),
            );
            continue;
        };
        p.unknown_keys(o, &path, GOAL_KEYS);
        let id = req_str(o, &path, "id", p);
        let event = req_str(o, &path, "event", p);
        let conditions = compile_conditions(o, &path, p);
        let within = opt_duration(o, &path, "within", p);
        let exit = match o.get("exit") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                p.add(
                    format!("{path}.exit"),
                    format!("exit must be true or false, found {other}"),
                );
                false
            }
        };
        if let (Some(id), Some(event)) = (id, event) {
            if let Some(first) = goals.iter().position(|g| g.id == id) {
                p.add(
                    format!("{path}.id"),
                    format!("duplicate goal id {id:?}, first used at $.goals[{first}]"),
                );
                continue;
            }
            goals.push(Goal {
                id,
                event,
                conditions,
                within,
                exit,
            });
        }
    }
    goals
}

#[cfg(test)]
mod tests;
