//! Checking and compiling the journey controls of contract section 5: re-entry rules, exit
//! criteria, branched waits, experiments, holdout, and the journey's own zone and quiet hours.
//! Every problem is reported with its JSON path, like the rest of validation.

use std::collections::HashMap;

use chrono_tz::Tz;
use serde_json::{Map, Value};

use super::condition::{compile_conditions, kind};
use super::policy::{compile_quiet_hours, default_zone, zone_attribute, QuietHours};
use super::validate::{opt_duration, req_str, step_ref};
use super::{Problems, Reentry, StepIx, StepKind, Trigger, Variant, WaitBranch};

/// Most branches a wait step may have, and events a branch may list (progress fits a `u32`).
pub const MAX_BRANCHES: usize = 8;
pub const MAX_BRANCH_EVENTS: usize = 4;

/// `entry.reentry`.
pub fn compile_reentry(e: &Map<String, Value>, p: &mut Problems) -> Reentry {
    let path = "$.entry.reentry";
    match e.get("reentry") {
        None | Some(Value::Null) => Reentry::Always,
        Some(Value::String(s)) if s == "always" => Reentry::Always,
        Some(Value::String(s)) if s == "never" => Reentry::Never,
        Some(Value::Object(o)) => {
            p.unknown_keys(o, path, &["after"]);
            if !o.contains_key("after") {
                p.add(path, "missing field \"after\" (a duration such as \"7d\")");
                return Reentry::Always;
            }
            opt_duration(o, path, "after", p).map_or(Reentry::Always, Reentry::After)
        }
        Some(other) => {
            p.add(
                path,
                format!(
                    "reentry must be \"always\", \"never\" or {{\"after\": \"7d\"}}, found {other}"
                ),
            );
            Reentry::Always
        }
    }
}

/// `entry.max_entries`: an integer >= 1.
pub fn compile_max_entries(e: &Map<String, Value>, p: &mut Problems) -> Option<u64> {
    match e.get("max_entries") {
        None | Some(Value::Null) => None,
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => v.as_u64(),
        Some(other) => {
            p.add(
                "$.entry.max_entries",
                format!("max_entries must be an integer >= 1, found {other}"),
            );
            None
        }
    }
}

/// An object with `event` and optional `conditions` (and their `match`).
fn compile_trigger(v: &Value, path: &str, p: &mut Problems) -> Option<Trigger> {
    let Some(o) = v.as_object() else {
        p.add(
            path,
            format!(
                "expected {{\"event\": \"NAME\", \"conditions\": [...]}}, found {}",
                kind(v)
            ),
        );
        return None;
    };
    p.unknown_keys(o, path, &["event", "conditions", "match"]);
    let event = req_str(o, path, "event", p);
    let conditions = compile_conditions(o, path, p);
    Some(Trigger {
        event: event?,
        conditions,
    })
}

/// The journey's `exit_on` list.
pub fn compile_exit_on(root: &Map<String, Value>, p: &mut Problems) -> Vec<Trigger> {
    match root.get("exit_on") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| compile_trigger(v, &format!("$.exit_on[{i}]"), p))
            .collect(),
        Some(other) => {
            p.add(
                "$.exit_on",
                format!(
                    "exit_on must be an array of {{\"event\", \"conditions\"}}, found {}",
                    kind(other)
                ),
            );
            Vec::new()
        }
    }
}

/// `holdout: {"percent": P}`, P from 0 to 100 with at most two decimals; in hundredths of a
/// percent.
pub fn compile_holdout(root: &Map<String, Value>, p: &mut Problems) -> Option<u32> {
    let v = root.get("holdout").filter(|v| !v.is_null())?;
    let Some(o) = v.as_object() else {
        p.add(
            "$.holdout",
            format!("holdout must be {{\"percent\": 10}}, found {}", kind(v)),
        );
        return None;
    };
    p.unknown_keys(o, "$.holdout", &["percent"]);
    let bad = |p: &mut Problems, found: &Value| {
        p.add(
            "$.holdout.percent",
            format!(
                "percent must be a number from 0 to 100 with at most two decimals, found {found}"
            ),
        );
    };
    match o.get("percent") {
        Some(n @ Value::Number(_)) => {
            let f = n.as_f64().unwrap_or(-1.0);
            let hundredths = (f * 100.0).round();
            if !(0.0..=100.0).contains(&f) || (f * 100.0 - hundredths).abs() > 1e-6 {
                bad(p, n);
                return None;
            }
            Some(hundredths as u32)
        }
        Some(other) => {
            bad(p, other);
            None
        }
        None => {
            p.add("$.holdout", "missing field \"percent\"");
            None
        }
    }
}

/// The journey's own `quiet_hours` (`null` for none), `timezone_attribute` and
/// `default_timezone`.
pub type ZoneKeys = (Option<Option<QuietHours>>, Option<String>, Option<Tz>);

pub fn compile_zone_keys(root: &Map<String, Value>, p: &mut Problems) -> ZoneKeys {
    let quiet = match root.get("quiet_hours") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => Some(compile_quiet_hours(v, "$.quiet_hours", p)),
    };
    (
        quiet,
        zone_attribute(root, "$", p),
        default_zone(root, "$", p),
    )
}

/// A `wait_for_trigger` step: the single-event form of section 2, or `branches` (5.3).
pub fn compile_wait(
    o: &Map<String, Value>,
    path: &str,
    ids: &HashMap<String, StepIx>,
    p: &mut Problems,
) -> StepKind {
    let timeout = opt_duration(o, path, "timeout", p);
    let on_timeout = step_ref(o, path, "on_timeout", ids, p);
    if on_timeout.is_some() && timeout.is_none() && !o.contains_key("timeout") {
        p.add(
            format!("{path}.on_timeout"),
            "on_timeout needs a timeout: add \"timeout\" or remove \"on_timeout\"",
        );
    }
    let branches = match o.get("branches") {
        None => {
            p.unknown_keys(
                o,
                path,
                &[
                    "id",
                    "type",
                    "event",
                    "conditions",
                    "match",
                    "timeout",
                    "next",
                    "on_timeout",
                ],
            );
            let event = req_str(o, path, "event", p).unwrap_or_default();
            vec![WaitBranch {
                id: None,
                events: vec![Trigger {
                    event,
                    conditions: compile_conditions(o, path, p),
                }],
                all: false,
                next: step_ref(o, path, "next", ids, p),
            }]
        }
        Some(b) => {
            p.unknown_keys(
                o,
                path,
                &[
                    "id",
                    "type",
                    "branches",
                    "timeout",
                    "on_timeout",
                    "event",
                    "conditions",
                    "match",
                    "next",
                ],
            );
            for key in ["event", "conditions", "match", "next"] {
                if o.contains_key(key) {
                    p.add(
                        format!("{path}.{key}"),
                        format!("a wait step has either \"event\"/\"conditions\"/\"next\" or \"branches\", never both: move {key:?} into a branch"),
                    );
                }
            }
            compile_branches(b, &format!("{path}.branches"), ids, p)
        }
    };
    StepKind::WaitForTrigger {
        branches,
        timeout,
        on_timeout,
    }
}

fn compile_branches(
    v: &Value,
    path: &str,
    ids: &HashMap<String, StepIx>,
    p: &mut Problems,
) -> Vec<WaitBranch> {
    let Some(items) = v.as_array() else {
        p.add(
            path,
            format!("branches must be an array, found {}", kind(v)),
        );
        return Vec::new();
    };
    if items.is_empty() || items.len() > MAX_BRANCHES {
        p.add(
            path,
            format!(
                "a wait step has 1 to {MAX_BRANCHES} branches, found {}",
                items.len()
            ),
        );
    }
    let mut out: Vec<WaitBranch> = Vec::new();
    for (i, item) in items.iter().enumerate().take(MAX_BRANCHES) {
        let bpath = format!("{path}[{i}]");
        let Some(bo) = item.as_object() else {
            p.add(
                &bpath,
                format!("a branch must be an object, found {}", kind(item)),
            );
            continue;
        };
        p.unknown_keys(bo, &bpath, &["id", "events", "match", "next"]);
        let id = req_str(bo, &bpath, "id", p);
        if let Some(id) = &id {
            if let Some(first) = out.iter().position(|b| b.id.as_deref() == Some(id)) {
                p.add(
                    format!("{bpath}.id"),
                    format!("duplicate branch id {id:?}, first used at {path}[{first}]"),
                );
            }
        }
        let all = match bo.get("match") {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) if s == "any" => false,
            Some(Value::String(s)) if s == "all" => true,
            Some(other) => {
                p.add(
                    format!("{bpath}.match"),
                    format!("match must be \"any\" or \"all\", found {other}"),
                );
                false
            }
        };
        let events = match bo.get("events") {
            Some(Value::Array(evs)) if (1..=MAX_BRANCH_EVENTS).contains(&evs.len()) => evs
                .iter()
                .enumerate()
                .filter_map(|(e, v)| compile_trigger(v, &format!("{bpath}.events[{e}]"), p))
                .collect(),
            Some(Value::Array(evs)) => {
                p.add(
                    format!("{bpath}.events"),
                    format!(
                        "a branch lists 1 to {MAX_BRANCH_EVENTS} events, found {}",
                        evs.len()
                    ),
                );
                Vec::new()
            }
            Some(other) => {
                p.add(
                    format!("{bpath}.events"),
                    format!(
                        "events must be an array of {{\"event\", \"conditions\"}}, found {}",
                        kind(other)
                    ),
                );
                Vec::new()
            }
            None => {
                p.add(&bpath, "missing field \"events\"");
                Vec::new()
            }
        };
        out.push(WaitBranch {
            id: Some(id.unwrap_or_default()),
            events,
            all,
            next: step_ref(bo, &bpath, "next", ids, p),
        });
    }
    out
}

/// An `experiment` step.
pub fn compile_experiment(
    o: &Map<String, Value>,
    path: &str,
    ids: &HashMap<String, StepIx>,
    p: &mut Problems,
) -> StepKind {
    p.unknown_keys(o, path, &["id", "type", "variants"]);
    let vpath = format!("{path}.variants");
    let items = match o.get("variants") {
        Some(Value::Array(items)) if !items.is_empty() => items.as_slice(),
        Some(Value::Array(_)) => {
            p.add(&vpath, "an experiment needs at least one variant");
            &[]
        }
        Some(other) => {
            p.add(
                &vpath,
                format!("variants must be an array, found {}", kind(other)),
            );
            &[]
        }
        None => {
            p.add(path, "missing field \"variants\"");
            &[]
        }
    };
    let mut variants: Vec<Variant> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("{vpath}[{i}]");
        let Some(vo) = item.as_object() else {
            p.add(
                &ipath,
                format!("a variant must be an object, found {}", kind(item)),
            );
            continue;
        };
        p.unknown_keys(vo, &ipath, &["id", "weight", "next"]);
        let id = req_str(vo, &ipath, "id", p).unwrap_or_default();
        if !id.is_empty() {
            if let Some(first) = variants.iter().position(|v| v.id == id) {
                p.add(
                    format!("{ipath}.id"),
                    format!("duplicate variant id {id:?}, first used at {vpath}[{first}]"),
                );
            }
        }
        let weight = match vo.get("weight") {
            Some(v) if v.as_u64().is_some() => v.as_u64().unwrap_or(0),
            Some(other) => {
                p.add(
                    format!("{ipath}.weight"),
                    format!("weight must be an integer >= 0, found {other}"),
                );
                0
            }
            None => {
                p.add(&ipath, "missing field \"weight\"");
                0
            }
        };
        variants.push(Variant {
            id,
            weight,
            next: step_ref(vo, &ipath, "next", ids, p),
        });
    }
    let total = variants
        .iter()
        .try_fold(0u64, |acc, v| acc.checked_add(v.weight));
    let total = match total {
        Some(t) if t > 0 => t,
        Some(_) if !items.is_empty() => {
            p.add(
                &vpath,
                "the variants' weights sum to 0: at least one weight must be positive",
            );
            1
        }
        None => {
            p.add(&vpath, "the variants' weights are too large to add up");
            1
        }
        Some(_) => 1,
    };
    StepKind::Experiment { variants, total }
}

/// Action-only flags (`ignore_quiet_hours`, `ignore_caps`): booleans on action steps, refused
/// on every other kind of step.
pub fn action_flags(
    o: &Map<String, Value>,
    path: &str,
    is_action: bool,
    p: &mut Problems,
) -> (bool, bool) {
    let mut flag = |key: &str| -> bool {
        match o.get(key) {
            None | Some(Value::Null) => false,
            Some(_) if !is_action => {
                p.add(
                    format!("{path}.{key}"),
                    format!("{key} applies to action steps only"),
                );
                false
            }
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                p.add(
                    format!("{path}.{key}"),
                    format!("{key} must be true or false, found {other}"),
                );
                false
            }
        }
    };
    (flag("ignore_quiet_hours"), flag("ignore_caps"))
}
