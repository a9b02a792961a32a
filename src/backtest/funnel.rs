//! The funnel of each journey, counted from what the engine did: the records it emitted, the
//! triggers it matched and the entries it refused. Pure: fed one input's [`Output`] at a time, by
//! `backtest` (and, with the same counting, by anything else that runs the engine).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::journey::{JourneySet, StepKind};
use crate::processor::Output;
use crate::record::Record;
use crate::time::{parse_rfc3339, Millis};

/// How sessions left a step: one row per distinct (reason, destination, branch, variant,
/// suppression).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Way {
    pub reason: String,
    /// The next step; `None` when the session ended there.
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StepCount {
    pub step: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Sessions that arrived at the step (entered there or moved there).
    pub reached: u64,
    /// Sessions still at the step when the backtest ended.
    pub still_there: u64,
    pub left: Vec<WayCount>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WayCount {
    #[serde(flatten)]
    pub way: Way,
    pub sessions: u64,
}

/// Conversions of one group of sessions (all, treatment or holdout).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rate {
    pub entries: u64,
    pub converted: u64,
    /// converted / entries; `null` without entries.
    pub rate: Option<f64>,
}

impl Rate {
    fn new(entries: u64, converted: u64) -> Rate {
        Rate {
            entries,
            converted,
            rate: (entries > 0).then(|| converted as f64 / entries as f64),
        }
    }
}

/// Treatment minus holdout conversion rate, with a 95% confidence interval (normal approximation
/// of the difference of two proportions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lift {
    pub absolute: f64,
    /// absolute / holdout rate; `null` when the holdout converted nobody.
    pub relative: Option<f64>,
    pub ci95: [f64; 2],
}

#[derive(Debug, Clone, Serialize)]
pub struct GoalCount {
    pub goal: String,
    #[serde(flatten)]
    pub all: Rate,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub treatment: Option<Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holdout: Option<Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lift: Option<Lift>,
    /// Time from entry to conversion, in milliseconds: p50 and p90 (nearest rank).
    pub time_to_convert_ms: Option<Percentiles>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: Millis,
    pub p90: Millis,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ActionCount {
    pub action: String,
    /// Moves out of an action step that a sender would have delivered.
    pub sent: u64,
    /// Moves whose action was not delivered, by reason (`holdout`, `frequency_cap`).
    pub suppressed: BTreeMap<String, u64>,
    /// Sent per UTC day (`YYYY-MM-DD`).
    pub per_day: BTreeMap<String, u64>,
}

/// One journey's funnel.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JourneyFunnel {
    pub journey_id: String,
    pub application: String,
    /// Events that were the journey's entry event (of its application), before any check: each
    /// entered someone (several, with `who: {attribute}`) or was refused.
    pub triggers: u64,
    pub entries: u64,
    pub refused: BTreeMap<String, u64>,
    pub steps: Vec<StepCount>,
    pub exits: BTreeMap<String, u64>,
    pub goals: Vec<GoalCount>,
    pub actions: Vec<ActionCount>,
}

/// What is kept per session while counting: entry time, holdout flag, step now, goals converted.
struct Live {
    journey: usize,
    entered: Millis,
    holdout: bool,
    step: Option<String>,
}

#[derive(Default)]
struct Counts {
    triggers: u64,
    entries: u64,
    holdout_entries: u64,
    refused: BTreeMap<String, u64>,
    reached: HashMap<String, u64>,
    left: HashMap<String, HashMap<Way, u64>>,
    exits: BTreeMap<String, u64>,
    /// goal -> (converted treatment, converted holdout, times to convert)
    goals: HashMap<String, (u64, u64, Vec<Millis>)>,
    actions: BTreeMap<String, ActionCount>,
}

/// Counts funnels over a run of the engine.
pub struct Funnel {
    journeys: Vec<JourneyMeta>,
    index: HashMap<String, usize>,
    counts: Vec<Counts>,
    live: HashMap<String, Live>,
}

struct JourneyMeta {
    id: String,
    application: String,
    steps: Vec<(String, &'static str)>,
    goals: Vec<String>,
    holdout: bool,
    /// Action steps: step id -> action name (a suppressed move carries no action).
    actions: HashMap<String, String>,
}

fn kind_name(k: &StepKind) -> &'static str {
    match k {
        StepKind::WaitForTrigger { .. } => "wait_for_trigger",
        StepKind::Delay { .. } => "delay",
        StepKind::Action { .. } => "action",
        StepKind::Split { .. } => "split",
        StepKind::Experiment { .. } => "experiment",
        StepKind::Exit => "exit",
    }
}

impl Funnel {
    /// A funnel for each current journey of `journeys`, in journey-id order.
    pub fn new(journeys: &JourneySet) -> Funnel {
        let metas: Vec<JourneyMeta> = journeys
            .journeys
            .iter()
            .map(|j| JourneyMeta {
                id: j.id.clone(),
                application: j.application.clone(),
                steps: j
                    .steps
                    .iter()
                    .map(|s| (s.id.clone(), kind_name(&s.kind)))
                    .collect(),
                goals: j.goals.iter().map(|g| g.id.clone()).collect(),
                holdout: j.holdout.is_some_and(|h| h > 0),
                actions: j
                    .steps
                    .iter()
                    .filter_map(|s| match &s.kind {
                        StepKind::Action { action, .. } => Some((s.id.clone(), action.clone())),
                        _ => None,
                    })
                    .collect(),
            })
            .collect();
        let index = metas
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        let counts = metas.iter().map(|_| Counts::default()).collect();
        Funnel {
            journeys: metas,
            index,
            counts,
            live: HashMap::new(),
        }
    }

    /// Counts what one input did.
    pub fn observe(&mut self, out: &Output) {
        for j in &out.triggered {
            if let Some(&ix) = self.index.get(j) {
                self.counts[ix].triggers += 1;
            }
        }
        for (j, reason) in &out.refused {
            if let Some(&ix) = self.index.get(j) {
                *self.counts[ix]
                    .refused
                    .entry(reason.as_str().to_string())
                    .or_default() += 1;
            }
        }
        for r in &out.records {
            self.record(r);
        }
    }

    fn record(&mut self, r: &Record) {
        let Some(&ix) = self.index.get(r.journey_id()) else {
            return;
        };
        let at = parse_rfc3339(r.at()).unwrap_or(0);
        let c = &mut self.counts[ix];
        match r {
            Record::JourneyEntry(e) => {
                c.entries += 1;
                let holdout = e.holdout == Some(true);
                c.holdout_entries += holdout as u64;
                *c.reached.entry(e.step.clone()).or_default() += 1;
                self.live.insert(
                    e.session_id.clone(),
                    Live {
                        journey: ix,
                        entered: at,
                        holdout,
                        step: Some(e.step.clone()),
                    },
                );
            }
            Record::StepAdvance(m) | Record::JourneyExit(m) => {
                let exit = matches!(r, Record::JourneyExit(_));
                // An action step without `next` is left by a step_advance to nowhere, then the
                // exit follows at the same step: count the leaving once, by the action.
                let after_action = exit
                    && self
                        .live
                        .get(&m.session_id)
                        .is_some_and(|l| l.step.is_none());
                if !after_action {
                    let way = Way {
                        reason: m.reason.clone(),
                        to: m.to.clone(),
                        branch: m.branch.clone(),
                        variant: m.variant.clone(),
                        suppressed: m.suppressed.clone(),
                    };
                    *c.left
                        .entry(m.from.clone())
                        .or_default()
                        .entry(way)
                        .or_default() += 1;
                }
                if let Some(to) = &m.to {
                    *c.reached.entry(to.clone()).or_default() += 1;
                }
                let action = match (&m.action, m.reason.as_str()) {
                    (Some(a), _) => Some(a),
                    (None, "action") => self.journeys[ix].actions.get(&m.from),
                    _ => None,
                };
                if let Some(action) = action {
                    let a = c
                        .actions
                        .entry(action.clone())
                        .or_insert_with(|| ActionCount {
                            action: action.clone(),
                            ..Default::default()
                        });
                    match &m.suppressed {
                        Some(why) => *a.suppressed.entry(why.clone()).or_default() += 1,
                        None => {
                            a.sent += 1;
                            let day = m.at.get(..10).unwrap_or("").to_string();
                            *a.per_day.entry(day).or_default() += 1;
                        }
                    }
                }
                if exit {
                    *c.exits.entry(m.reason.clone()).or_default() += 1;
                    self.live.remove(&m.session_id);
                } else if let Some(l) = self.live.get_mut(&m.session_id) {
                    l.step = m.to.clone();
                }
            }
            Record::Conversion(cv) => {
                let g = c.goals.entry(cv.goal_id.clone()).or_default();
                match self.live.get(&cv.session_id) {
                    Some(l) if l.journey == ix => {
                        if l.holdout {
                            g.1 += 1;
                        } else {
                            g.0 += 1;
                        }
                        g.2.push(at - l.entered);
                    }
                    _ => g.0 += 1,
                }
            }
        }
    }

    /// The funnels, in journey-id order.
    pub fn report(&self) -> Vec<JourneyFunnel> {
        let mut still: Vec<HashMap<&str, u64>> = vec![HashMap::new(); self.journeys.len()];
        for l in self.live.values() {
            if let Some(s) = &l.step {
                *still[l.journey].entry(s.as_str()).or_default() += 1;
            }
        }
        self.journeys
            .iter()
            .zip(&self.counts)
            .zip(&still)
            .map(|((m, c), still)| {
                let steps = m
                    .steps
                    .iter()
                    .map(|(id, kind)| {
                        let mut left: Vec<WayCount> = c
                            .left
                            .get(id)
                            .map(|w| {
                                w.iter()
                                    .map(|(way, n)| WayCount {
                                        way: way.clone(),
                                        sessions: *n,
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        left.sort_by(|a, b| b.sessions.cmp(&a.sessions).then(a.way.cmp(&b.way)));
                        StepCount {
                            step: id.clone(),
                            kind,
                            reached: c.reached.get(id).copied().unwrap_or(0),
                            still_there: still.get(id.as_str()).copied().unwrap_or(0),
                            left,
                        }
                    })
                    .collect();
                let treatment_entries = c.entries - c.holdout_entries;
                let goals = m
                    .goals
                    .iter()
                    .map(|g| {
                        let (t, h, times) = c.goals.get(g).cloned().unwrap_or_default();
                        let all = Rate::new(c.entries, t + h);
                        let (treatment, holdout, lift) = if m.holdout {
                            let tr = Rate::new(treatment_entries, t);
                            let ho = Rate::new(c.holdout_entries, h);
                            let lift = lift(&tr, &ho);
                            (Some(tr), Some(ho), lift)
                        } else {
                            (None, None, None)
                        };
                        GoalCount {
                            goal: g.clone(),
                            all,
                            treatment,
                            holdout,
                            lift,
                            time_to_convert_ms: percentiles(times),
                        }
                    })
                    .collect();
                JourneyFunnel {
                    journey_id: m.id.clone(),
                    application: m.application.clone(),
                    triggers: c.triggers,
                    entries: c.entries,
                    refused: c.refused.clone(),
                    steps,
                    exits: c.exits.clone(),
                    goals,
                    actions: c.actions.values().cloned().collect(),
                }
            })
            .collect()
    }
}

/// Treatment minus holdout, with the 95% interval of the difference of two proportions (Wald).
fn lift(t: &Rate, h: &Rate) -> Option<Lift> {
    let (pt, ph) = (t.rate?, h.rate?);
    let se = (pt * (1.0 - pt) / t.entries as f64 + ph * (1.0 - ph) / h.entries as f64).sqrt();
    let d = pt - ph;
    Some(Lift {
        absolute: d,
        relative: (ph > 0.0).then(|| d / ph),
        ci95: [d - 1.96 * se, d + 1.96 * se],
    })
}

/// Nearest-rank p50 and p90.
fn percentiles(mut v: Vec<Millis>) -> Option<Percentiles> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Some(Percentiles {
        p50: rank(0.5),
        p90: rank(0.9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentiles(vec![]), None);
        let p = percentiles((1..=10).collect()).unwrap();
        assert_eq!((p.p50, p.p90), (5, 9));
        let p = percentiles(vec![7]).unwrap();
        assert_eq!((p.p50, p.p90), (7, 7));
    }

    #[test]
    fn lift_and_its_interval() {
        let t = Rate::new(1000, 200);
        let h = Rate::new(1000, 100);
        let l = lift(&t, &h).unwrap();
        assert!((l.absolute - 0.1).abs() < 1e-12);
        assert!((l.relative.unwrap() - 1.0).abs() < 1e-12);
        // se = sqrt(.2*.8/1000 + .1*.9/1000) = 0.0158114
        assert!((l.ci95[0] - (0.1 - 1.96 * 0.015811388)).abs() < 1e-6);
        assert!(lift(&t, &Rate::new(0, 0)).is_none());
    }
}
