//! Two backtests of the same events side by side (`--compare`): every number of every funnel,
//! named by a path, and the ones that differ.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::funnel::{JourneyFunnel, Rate, Way};
use super::Report;

/// One number that differs between the two sides. `None`: the journey (or that row) is not on
/// that side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub journey_id: String,
    pub metric: String,
    pub base: Option<f64>,
    pub proposed: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub base: Report,
    pub proposed: Report,
    pub differences: Vec<Difference>,
}

/// How a way out of a step is named in a metric path: `reason->to` plus any branch, variant or
/// suppression.
pub fn way_name(w: &Way) -> String {
    let mut s = format!("{}->{}", w.reason, w.to.as_deref().unwrap_or("(end)"));
    for (k, v) in [
        ("branch", &w.branch),
        ("variant", &w.variant),
        ("suppressed", &w.suppressed),
    ] {
        if let Some(v) = v {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    s
}

fn rate_into(m: &mut BTreeMap<String, f64>, prefix: &str, r: &Rate) {
    m.insert(format!("{prefix}.entries"), r.entries as f64);
    m.insert(format!("{prefix}.converted"), r.converted as f64);
    if let Some(x) = r.rate {
        m.insert(format!("{prefix}.rate"), x);
    }
}

/// Every number of a funnel, by path.
pub fn flatten(j: &JourneyFunnel) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    m.insert("triggers".into(), j.triggers as f64);
    m.insert("entries".into(), j.entries as f64);
    for (r, n) in &j.refused {
        m.insert(format!("refused.{r}"), *n as f64);
    }
    for s in &j.steps {
        m.insert(format!("steps.{}.reached", s.step), s.reached as f64);
        m.insert(
            format!("steps.{}.still_there", s.step),
            s.still_there as f64,
        );
        for w in &s.left {
            m.insert(
                format!("steps.{}.left.{}", s.step, way_name(&w.way)),
                w.sessions as f64,
            );
        }
    }
    for (r, n) in &j.exits {
        m.insert(format!("exits.{r}"), *n as f64);
    }
    for g in &j.goals {
        let p = format!("goals.{}", g.goal);
        rate_into(&mut m, &p, &g.all);
        if let Some(t) = &g.treatment {
            rate_into(&mut m, &format!("{p}.treatment"), t);
        }
        if let Some(h) = &g.holdout {
            rate_into(&mut m, &format!("{p}.holdout"), h);
        }
        if let Some(l) = &g.lift {
            m.insert(format!("{p}.lift"), l.absolute);
        }
        if let Some(t) = &g.time_to_convert_ms {
            m.insert(format!("{p}.time_to_convert_ms.p50"), t.p50 as f64);
            m.insert(format!("{p}.time_to_convert_ms.p90"), t.p90 as f64);
        }
    }
    for a in &j.actions {
        m.insert(format!("actions.{}.sent", a.action), a.sent as f64);
        for (why, n) in &a.suppressed {
            m.insert(format!("actions.{}.suppressed.{why}", a.action), *n as f64);
        }
    }
    m
}

/// The numbers that differ, journey by journey (journey-id order), then by path.
pub fn differences(base: &Report, proposed: &Report) -> Vec<Difference> {
    let by_id = |r: &Report| -> BTreeMap<String, BTreeMap<String, f64>> {
        r.journeys
            .iter()
            .map(|j| (j.journey_id.clone(), flatten(j)))
            .collect()
    };
    let (b, p) = (by_id(base), by_id(proposed));
    let ids: BTreeSet<&String> = b.keys().chain(p.keys()).collect();
    let empty = BTreeMap::new();
    let mut out = Vec::new();
    for id in ids {
        let (bm, pm) = (b.get(id).unwrap_or(&empty), p.get(id).unwrap_or(&empty));
        let metrics: BTreeSet<&String> = bm.keys().chain(pm.keys()).collect();
        for m in metrics {
            let (x, y) = (bm.get(m).copied(), pm.get(m).copied());
            if x != y {
                out.push(Difference {
                    journey_id: id.clone(),
                    metric: m.clone(),
                    base: x,
                    proposed: y,
                });
            }
        }
    }
    out
}
