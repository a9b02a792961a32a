//! The journey engine: a pure, deterministic state machine.
//!
//! Given the journeys, one user's live sessions and an input (an event, an entry decided for that
//! user, or a due timer), it changes the sessions in memory and emits output records. It reads no
//! clock, does no I/O and knows nothing of Kafka or RocksDB: the caller loads the sessions, calls
//! the engine, and writes back what changed ([`UserSessions::changes`]).
//!
//! Order of evaluation for one event (contract section 2): goals of existing sessions, then waits
//! of existing sessions, then entry. Entry is split in two so entries can cross partitions:
//! [`Engine::entry_intents`] decides who enters (stateless), [`Engine::apply_entry`] applies one
//! decision to the target user's sessions.

mod session;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use session::{Change, ChangeRef, Session, SessionRef, UserSessions};

use crate::event::{id_text, Event};
use crate::journey::condition::lookup;
use crate::journey::{Journey, JourneySet, SessionMode, Status, StepIx, StepKind, Who};
use crate::record::{ConversionRecord, EntryRecord, MoveRecord, Record};
use crate::time::{format_millis, Millis};

/// Why a matched trigger did not start a session (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The trigger event matched by name but its conditions did not hold.
    ConditionFalse,
    /// The event time is outside the journey's entry window.
    OutsideWindow,
    /// `who` names an attribute that is absent, null or empty.
    NoTargets,
    /// `who` names an attribute of the wrong shape.
    BadTargets,
    /// Multiple sessions: the trigger lacks the session identifier.
    MissingIdentifier,
    /// The user (or that identifier) already has an active session.
    ActiveSession,
    /// The journey is paused or archived.
    NotActive,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ConditionFalse => "condition_false",
            Refusal::OutsideWindow => "outside_window",
            Refusal::NoTargets => "no_targets",
            Refusal::BadTargets => "bad_targets",
            Refusal::MissingIdentifier => "missing_identifier",
            Refusal::ActiveSession => "active_session",
            Refusal::NotActive => "not_active",
        }
    }
}

/// A decision that `user_id` enters `journey_id`, made from an event; applied by whoever owns the
/// user's state (possibly another partition, through the route topic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryIntent {
    pub journey_id: String,
    pub application: String,
    pub user_id: String,
    pub source_user_id: String,
    pub session_key: Option<String>,
    pub event: String,
    pub event_id: String,
    pub time: Millis,
    pub attributes: Map<String, Value>,
}

/// What one input caused besides state changes: the records, and counts for metrics.
#[derive(Debug, Default)]
pub struct Effects {
    pub records: Vec<Record>,
    pub refused: Vec<(String, Refusal)>,
    /// Journeys whose trigger, wait or goal matched the input.
    pub matched: Vec<String>,
}

impl Effects {
    pub fn clear(&mut self) {
        self.records.clear();
        self.refused.clear();
        self.matched.clear();
    }
}

/// What caused a move: an event (name and id) or a timer (none).
#[derive(Clone, Copy)]
struct Cause<'a> {
    event: Option<(&'a str, &'a str)>,
    at: Millis,
}

/// The engine over one set of journeys.
#[derive(Debug, Clone)]
pub struct Engine {
    journeys: Arc<JourneySet>,
}

impl Engine {
    pub fn new(journeys: Arc<JourneySet>) -> Engine {
        Engine { journeys }
    }

    pub fn journeys(&self) -> &Arc<JourneySet> {
        &self.journeys
    }

    /// Goals, then waits, of the event user's existing sessions (`us` holds that user's sessions
    /// in the event's application).
    pub fn apply_event(&self, ev: &Event, us: &mut UserSessions, fx: &mut Effects) {
        let existing = us.len();
        // Goals first.
        for ix in 0..existing {
            if !us.is_active(ix) {
                continue;
            }
            let Some(journey) = self
                .journeys
                .version(&us.session(ix).journey_id, &us.session(ix).version)
                .cloned()
            else {
                continue;
            };
            if journey.application != ev.application || !id_matches(&journey, us.session(ix), ev) {
                continue;
            }
            for goal in &journey.goals {
                let s = us.session(ix);
                if goal.event != ev.name || s.converted.iter().any(|g| g == &goal.id) {
                    continue;
                }
                if goal.within.is_some_and(|w| ev.time - s.entered_at > w) {
                    continue;
                }
                if !goal.conditions.eval(&ev.attributes) {
                    continue;
                }
                fx.matched.push(journey.id.clone());
                let s = us.session_mut(ix);
                s.converted.push(goal.id.clone());
                fx.records.push(Record::Conversion(ConversionRecord {
                    journey_id: journey.id.clone(),
                    application: journey.application.clone(),
                    user_id: s.user_id.clone(),
                    session_id: s.session_id.clone(),
                    session_key: s.key.clone(),
                    goal_id: goal.id.clone(),
                    event: ev.name.clone(),
                    event_id: ev.event_id.clone(),
                    at: format_millis(ev.time),
                }));
                if goal.exit {
                    let cause = Cause {
                        event: Some((&ev.name, &ev.event_id)),
                        at: ev.time,
                    };
                    let from = s.step.clone();
                    self.end(&journey, us, ix, &from, "goal", cause, None, fx);
                    break;
                }
            }
        }
        // Then waits.
        for ix in 0..existing {
            if !us.is_active(ix) {
                continue;
            }
            let Some(journey) = self
                .journeys
                .version(&us.session(ix).journey_id, &us.session(ix).version)
                .cloned()
            else {
                continue;
            };
            if journey.application != ev.application {
                continue;
            }
            let Some(step_ix) = journey.step_ix(&us.session(ix).step) else {
                continue;
            };
            let StepKind::WaitForTrigger {
                event,
                conditions,
                next,
                ..
            } = &journey.steps[step_ix].kind
            else {
                continue;
            };
            if event != &ev.name
                || !id_matches(&journey, us.session(ix), ev)
                || !conditions.eval(&ev.attributes)
            {
                continue;
            }
            fx.matched.push(journey.id.clone());
            let s = us.session_mut(ix);
            for (k, v) in &ev.attributes {
                s.context.insert(k.clone(), v.clone());
            }
            s.timer = None;
            let cause = Cause {
                event: Some((&ev.name, &ev.event_id)),
                at: ev.time,
            };
            self.go(&journey, us, ix, step_ix, *next, "trigger", cause, None, fx);
        }
    }

    /// Decides who enters which journey because of `ev`. Stateless: refusals that need state
    /// (an active session) are made by [`Engine::apply_entry`].
    pub fn entry_intents(&self, ev: &Event, fx: &mut Effects) -> Vec<EntryIntent> {
        let mut out = Vec::new();
        let Some(interest) = self.journeys.interest(&ev.application, &ev.name) else {
            return out;
        };
        for &jx in &interest.entries {
            let journey = &self.journeys.journeys[jx];
            let entry = &journey.entry;
            let refuse = |fx: &mut Effects, r: Refusal| fx.refused.push((journey.id.clone(), r));
            if !entry.conditions.eval(&ev.attributes) {
                refuse(fx, Refusal::ConditionFalse);
                continue;
            }
            fx.matched.push(journey.id.clone());
            if journey.status != Status::Active {
                refuse(fx, Refusal::NotActive);
                continue;
            }
            if entry.window.is_some_and(|w| !w.contains(ev.time)) {
                refuse(fx, Refusal::OutsideWindow);
                continue;
            }
            let session_key = match &entry.sessions {
                SessionMode::Single => None,
                SessionMode::Multiple { identifier } => {
                    match lookup(&ev.attributes, identifier).and_then(id_text) {
                        Some(k) => Some(k),
                        None => {
                            refuse(fx, Refusal::MissingIdentifier);
                            continue;
                        }
                    }
                }
            };
            let targets = match &entry.who {
                Who::EventUser => vec![ev.user_id.clone()],
                Who::Attribute(attr) => match targets(lookup(&ev.attributes, attr)) {
                    Ok(t) if t.is_empty() => {
                        refuse(fx, Refusal::NoTargets);
                        continue;
                    }
                    Ok(t) => t,
                    Err(BadTargets) => {
                        refuse(fx, Refusal::BadTargets);
                        continue;
                    }
                },
            };
            for user in targets {
                out.push(EntryIntent {
                    journey_id: journey.id.clone(),
                    application: journey.application.clone(),
                    user_id: user,
                    source_user_id: ev.user_id.clone(),
                    session_key: session_key.clone(),
                    event: ev.name.clone(),
                    event_id: ev.event_id.clone(),
                    time: ev.time,
                    attributes: ev.attributes.clone(),
                });
            }
        }
        out
    }

    /// Starts a session for the intent's user unless one is active (`us` holds that user's
    /// sessions in the journey's application).
    pub fn apply_entry(&self, intent: &EntryIntent, us: &mut UserSessions, fx: &mut Effects) {
        let Some(journey) = self.journeys.get(&intent.journey_id).cloned() else {
            return;
        };
        let active = (0..us.len()).any(|ix| {
            us.is_active(ix) && {
                let s = us.session(ix);
                s.journey_id == journey.id && s.key == intent.session_key
            }
        });
        if active {
            fx.refused
                .push((journey.id.clone(), Refusal::ActiveSession));
            return;
        }
        let session_id = session_id(
            &journey.application,
            &journey.id,
            &intent.user_id,
            intent.session_key.as_deref(),
            &intent.event_id,
        );
        let start = &journey.steps[journey.start];
        fx.records.push(Record::JourneyEntry(EntryRecord {
            journey_id: journey.id.clone(),
            application: journey.application.clone(),
            user_id: intent.user_id.clone(),
            source_user_id: intent.source_user_id.clone(),
            session_id: session_id.clone(),
            session_key: intent.session_key.clone(),
            event: intent.event.clone(),
            event_id: intent.event_id.clone(),
            step: start.id.clone(),
            at: format_millis(intent.time),
        }));
        let ix = us.insert(Session {
            journey_id: journey.id.clone(),
            version: journey.version.clone(),
            user_id: intent.user_id.clone(),
            key: intent.session_key.clone(),
            session_id,
            source_user_id: intent.source_user_id.clone(),
            step: start.id.clone(),
            entered_at: intent.time,
            context: intent.attributes.clone(),
            converted: Vec::new(),
            timer: None,
        });
        let cause = Cause {
            event: Some((&intent.event, &intent.event_id)),
            at: intent.time,
        };
        self.arrive(&journey, us, ix, journey.start, cause, fx);
    }

    /// Fires the timer due at `due` of session `ix`; a timer the session no longer waits for is
    /// ignored. Returns whether it fired.
    pub fn fire_timer(
        &self,
        us: &mut UserSessions,
        ix: usize,
        due: Millis,
        fx: &mut Effects,
    ) -> bool {
        if !us.is_active(ix) || us.session(ix).timer != Some(due) {
            return false;
        }
        let Some(journey) = self
            .journeys
            .version(&us.session(ix).journey_id, &us.session(ix).version)
            .cloned()
        else {
            return false;
        };
        let Some(step_ix) = journey.step_ix(&us.session(ix).step) else {
            return false;
        };
        us.session_mut(ix).timer = None;
        let cause = Cause {
            event: None,
            at: due,
        };
        match &journey.steps[step_ix].kind {
            StepKind::WaitForTrigger { on_timeout, .. } => match on_timeout {
                Some(to) => self.go(
                    &journey,
                    us,
                    ix,
                    step_ix,
                    Some(*to),
                    "timeout",
                    cause,
                    None,
                    fx,
                ),
                None => {
                    let from = journey.steps[step_ix].id.clone();
                    self.end(&journey, us, ix, &from, "timeout", cause, None, fx)
                }
            },
            StepKind::Delay { next, .. } => {
                self.go(&journey, us, ix, step_ix, *next, "delay", cause, None, fx)
            }
            _ => {}
        }
        true
    }

    /// Ends session `ix` because its journey was archived (exit reason `archived`, at `at`).
    pub fn archive(&self, us: &mut UserSessions, ix: usize, at: Millis, fx: &mut Effects) {
        if !us.is_active(ix) {
            return;
        }
        let s = us.session(ix);
        let Some(journey) = self.journeys.version(&s.journey_id, &s.version).cloned() else {
            return;
        };
        let step = s.step.clone();
        let cause = Cause { event: None, at };
        self.end(&journey, us, ix, &step, "archived", cause, None, fx);
    }

    /// Moves session `ix` from `from` to `to` (or ends it when `to` is `None`).
    #[allow(clippy::too_many_arguments)]
    fn go(
        &self,
        journey: &Journey,
        us: &mut UserSessions,
        ix: usize,
        from: StepIx,
        to: Option<StepIx>,
        reason: &str,
        cause: Cause,
        action: Option<(&str, &Value)>,
        fx: &mut Effects,
    ) {
        let from_id = journey.steps[from].id.clone();
        let Some(to) = to else {
            self.end(journey, us, ix, &from_id, "completed", cause, action, fx);
            return;
        };
        let s = us.session_mut(ix);
        s.step = journey.steps[to].id.clone();
        fx.records.push(Record::StepAdvance(MoveRecord {
            journey_id: journey.id.clone(),
            application: journey.application.clone(),
            user_id: s.user_id.clone(),
            session_id: s.session_id.clone(),
            session_key: s.key.clone(),
            from: from_id,
            to: Some(s.step.clone()),
            step: None,
            reason: reason.to_string(),
            event: cause.event.map(|e| e.0.to_string()),
            event_id: cause.event.map(|e| e.1.to_string()),
            action: action.map(|a| a.0.to_string()),
            params: action.map(|a| a.1.clone()),
            at: format_millis(cause.at),
        }));
        self.arrive(journey, us, ix, to, cause, fx);
    }

    /// What happens on arriving at a step: waits arm their timer, instant steps move on.
    fn arrive(
        &self,
        journey: &Journey,
        us: &mut UserSessions,
        ix: usize,
        step: StepIx,
        cause: Cause,
        fx: &mut Effects,
    ) {
        match &journey.steps[step].kind {
            StepKind::WaitForTrigger { timeout, .. } => {
                us.session_mut(ix).timer = timeout.map(|t| cause.at.saturating_add(t));
            }
            StepKind::Delay { duration, .. } => {
                us.session_mut(ix).timer = Some(cause.at.saturating_add(*duration));
            }
            StepKind::Action {
                action,
                params,
                next,
            } => self.go(
                journey,
                us,
                ix,
                step,
                *next,
                "action",
                cause,
                Some((action, params)),
                fx,
            ),
            StepKind::Split { branches, default } => {
                let ctx = &us.session(ix).context;
                let to = branches
                    .iter()
                    .find(|(c, _)| c.eval(ctx))
                    .map(|b| b.1)
                    .or(*default);
                self.go(journey, us, ix, step, to, "split", cause, None, fx)
            }
            StepKind::Exit => {
                let from = journey.steps[step].id.clone();
                self.end(journey, us, ix, &from, "completed", cause, None, fx)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn end(
        &self,
        journey: &Journey,
        us: &mut UserSessions,
        ix: usize,
        at_step: &str,
        reason: &str,
        cause: Cause,
        action: Option<(&str, &Value)>,
        fx: &mut Effects,
    ) {
        let s = us.session(ix);
        fx.records.push(Record::JourneyExit(MoveRecord {
            journey_id: journey.id.clone(),
            application: journey.application.clone(),
            user_id: s.user_id.clone(),
            session_id: s.session_id.clone(),
            session_key: s.key.clone(),
            from: at_step.to_string(),
            to: None,
            step: Some(at_step.to_string()),
            reason: reason.to_string(),
            event: cause.event.map(|e| e.0.to_string()),
            event_id: cause.event.map(|e| e.1.to_string()),
            action: action.map(|a| a.0.to_string()),
            params: action.map(|a| a.1.clone()),
            at: format_millis(cause.at),
        }));
        us.remove(ix);
    }
}

/// Multiple-session routing: an event carrying the identifier concerns only the session with that
/// value; an event without it concerns every session of the user.
fn id_matches(journey: &Journey, s: &Session, ev: &Event) -> bool {
    match &journey.entry.sessions {
        SessionMode::Single => true,
        SessionMode::Multiple { identifier } => {
            match lookup(&ev.attributes, identifier).and_then(id_text) {
                Some(k) => s.key.as_deref() == Some(k.as_str()),
                None => true,
            }
        }
    }
}

/// A `who` attribute of a shape that names no users (an object, a fraction, an array holding
/// something other than strings and integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadTargets;

/// The users a `who: {attribute}` value names: one id or an array of ids, deduplicated in order.
/// `Ok(empty)` for absent, null, "" or []; `Err` for any other shape.
pub fn targets(v: Option<&Value>) -> Result<Vec<String>, BadTargets> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            let mut out: Vec<String> = Vec::with_capacity(items.len());
            for item in items {
                let id = id_text(item).ok_or(BadTargets)?;
                if !out.contains(&id) {
                    out.push(id);
                }
            }
            Ok(out)
        }
        Some(other) => id_text(other).map(|id| vec![id]).ok_or(BadTargets),
    }
}

/// A deterministic session id: the same journey, user, identifier and entry event give the same
/// id on every replay. Formatted like a UUID.
pub fn session_id(
    application: &str,
    journey: &str,
    user: &str,
    key: Option<&str>,
    event_id: &str,
) -> String {
    let mut buf = Vec::with_capacity(64);
    for part in [application, journey, user, key.unwrap_or(""), event_id] {
        buf.extend_from_slice(part.as_bytes());
        buf.push(0);
    }
    buf.push(key.is_some() as u8);
    let h = xxhash_rust::xxh3::xxh3_128(&buf);
    let hex = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests;
