//! The journey engine: a pure, deterministic state machine.
//!
//! Given the journeys, one user's live sessions and an input (an event, an entry decided for that
//! user, or a due timer), it changes the sessions in memory and emits output records. It reads no
//! clock, does no I/O and knows nothing of Kafka or RocksDB: the caller loads the sessions, calls
//! the engine, and writes back what changed ([`UserSessions::changes`]).
//!
//! Order of evaluation for one event (contract sections 2 and 5.2): goals of existing sessions,
//! then exit criteria, then waits of existing sessions, then entry. Entry is split in two so entries can cross partitions:
//! [`Engine::entry_intents`] decides who enters (stateless), [`Engine::apply_entry`] applies one
//! decision to the target user's sessions.

pub mod controls;
mod moves;
mod session;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use session::{
    Change, ChangeRef, Delivery, History, JourneyHistory, KeyEntry, Profile, Session, SessionRef,
    UserSessions, UserState,
};

use crate::event::{id_text, Event};
use crate::journey::condition::lookup;
use crate::journey::{progress_bit, Journey, JourneySet, SessionMode, Status, StepKind, Who};
use crate::record::{ConversionRecord, EntryRecord, Record};
use crate::time::{format_millis, Millis};
use moves::Leave;

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
    /// The entry key entered before and `entry.reentry` does not let it in again yet.
    Reentry,
    /// The user has entered `entry.max_entries` times.
    MaxEntries,
    /// `who` names more users than [`Limits::max_targets`].
    TooManyTargets,
    /// The user has [`Limits::max_sessions_per_user`] active sessions in the journey.
    TooManySessions,
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
            Refusal::Reentry => "reentry",
            Refusal::MaxEntries => "max_entries",
            Refusal::TooManyTargets => "too_many_targets",
            Refusal::TooManySessions => "too_many_sessions",
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
    /// The entry conditions read the profile and the event's partition could not decide them
    /// (a `who: {attribute}` entry): they are judged with the target's profile when the intent
    /// is applied.
    #[serde(default, skip_serializing_if = "is_false")]
    pub check_profile: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What one input caused besides state changes: the records, and counts for metrics.
#[derive(Debug, Default)]
pub struct Effects {
    pub records: Vec<Record>,
    pub refused: Vec<(String, Refusal)>,
    /// Journeys whose trigger, wait, goal or exit criterion matched the input.
    pub matched: Vec<String>,
    /// Journeys whose entry event the input is (before any condition): every trigger either
    /// enters someone or is refused.
    pub triggered: Vec<String>,
    /// Journeys of sessions held at an action step by quiet hours (one per hold).
    pub held: Vec<String>,
    /// Journeys of sessions released from a quiet-hours hold (one per release).
    pub released: Vec<String>,
}

impl Effects {
    pub fn clear(&mut self) {
        self.records.clear();
        self.refused.clear();
        self.matched.clear();
        self.triggered.clear();
        self.held.clear();
        self.released.clear();
    }
}

/// What caused a move: an event (name and id) or a timer (none).
#[derive(Clone, Copy)]
struct Cause<'a> {
    event: Option<(&'a str, &'a str)>,
    at: Millis,
}

/// Bounds on what one input may make the engine do (`processing.*` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Users one event may enter into one journey through `who: {attribute}`.
    pub max_targets: usize,
    /// Active sessions of one user in one journey.
    pub max_sessions_per_user: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_targets: 1_000,
            max_sessions_per_user: 1_000,
        }
    }
}

/// The engine over one set of journeys.
#[derive(Debug, Clone)]
pub struct Engine {
    journeys: Arc<JourneySet>,
    limits: Limits,
}

impl Engine {
    pub fn new(journeys: Arc<JourneySet>) -> Engine {
        Engine {
            journeys,
            limits: Limits::default(),
        }
    }

    pub fn with_limits(mut self, limits: Limits) -> Engine {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn journeys(&self) -> &Arc<JourneySet> {
        &self.journeys
    }

    /// The journey version session `ix` runs on.
    fn session_journey(&self, us: &UserSessions, ix: usize) -> Option<Arc<Journey>> {
        let s = us.session(ix);
        self.journeys.version(&s.journey_id, &s.version).cloned()
    }

    /// Goals, then exit criteria, then waits of the event user's existing sessions (`us` holds
    /// that user's sessions in the event's application).
    pub fn apply_event(&self, ev: &Event, us: &mut UserSessions, fx: &mut Effects) {
        let existing = us.len();
        let cause = Cause {
            event: Some((&ev.name, &ev.event_id)),
            at: ev.time,
        };
        // Goals first.
        for ix in 0..existing {
            if !us.is_active(ix) {
                continue;
            }
            let Some(journey) = self.session_journey(us, ix) else {
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
                if goal
                    .within
                    .is_some_and(|w| ev.time.saturating_sub(s.entered_at) > w)
                {
                    continue;
                }
                if !goal.conditions.eval_in(&ev.attributes, us.profile()) {
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
                    holdout: s.holdout.then_some(true),
                }));
                if goal.exit {
                    let from = s.step.clone();
                    self.end(&journey, us, ix, &from, "goal", cause, Leave::default(), fx);
                    break;
                }
            }
        }
        // Then exit criteria.
        for ix in 0..existing {
            if !us.is_active(ix) {
                continue;
            }
            let Some(journey) = self.session_journey(us, ix) else {
                continue;
            };
            if journey.application != ev.application
                || !journey
                    .exit_on
                    .iter()
                    .any(|t| t.matches(&ev.name, &ev.attributes, us.profile()))
                || !id_matches(&journey, us.session(ix), ev)
            {
                continue;
            }
            fx.matched.push(journey.id.clone());
            let from = us.session(ix).step.clone();
            self.end(
                &journey,
                us,
                ix,
                &from,
                "exit_event",
                cause,
                Leave::default(),
                fx,
            );
        }
        // Then waits.
        for ix in 0..existing {
            if !us.is_active(ix) {
                continue;
            }
            let Some(journey) = self.session_journey(us, ix) else {
                continue;
            };
            if journey.application != ev.application {
                continue;
            }
            let Some(step_ix) = journey.step_ix(&us.session(ix).step) else {
                continue;
            };
            let StepKind::WaitForTrigger { branches, .. } = &journey.steps[step_ix].kind else {
                continue;
            };
            // Every branch records what the event satisfies; then the first complete one wins.
            let mut progress = us.session(ix).progress;
            let mut matched = false;
            for (b, branch) in branches.iter().enumerate() {
                for (e, t) in branch.events.iter().enumerate() {
                    if t.matches(&ev.name, &ev.attributes, us.profile()) {
                        progress |= progress_bit(b, e);
                        matched = true;
                    }
                }
            }
            if !matched || !id_matches(&journey, us.session(ix), ev) {
                continue;
            }
            fx.matched.push(journey.id.clone());
            let s = us.session_mut(ix);
            for (k, v) in &ev.attributes {
                s.context.insert(k.clone(), v.clone());
            }
            s.progress = progress;
            let Some(branch) = branches
                .iter()
                .enumerate()
                .find(|(b, branch)| branch.complete(*b, progress))
                .map(|(_, branch)| branch)
            else {
                continue;
            };
            s.timer = None;
            let leave = Leave {
                branch: branch.id.as_deref(),
                ..Leave::default()
            };
            self.go(
                &journey,
                us,
                ix,
                step_ix,
                branch.next,
                "trigger",
                cause,
                leave,
                fx,
            );
        }
    }

    /// Decides who enters which journey because of `ev`; `profile` is the event user's (read
    /// by `profile.` conditions of `who: "event_user"` entries). Refusals that need the target's
    /// state (an active session, and the profile conditions of a `who: {attribute}` entry) are
    /// made by [`Engine::apply_entry`].
    pub fn entry_intents(
        &self,
        ev: &Event,
        profile: Option<&Profile>,
        fx: &mut Effects,
    ) -> Vec<EntryIntent> {
        let mut out = Vec::new();
        let Some(interest) = self.journeys.interest(&ev.application, &ev.name) else {
            return out;
        };
        for &jx in &interest.entries {
            let journey = &self.journeys.journeys[jx];
            let entry = &journey.entry;
            let refuse = |fx: &mut Effects, r: Refusal| fx.refused.push((journey.id.clone(), r));
            fx.triggered.push(journey.id.clone());
            // A `who: {attribute}` entry's profile conditions are each target's: decide what
            // the event alone decides here, the rest on the target's partition.
            let held = match entry.who {
                Who::EventUser => Some(entry.conditions.eval_in(&ev.attributes, profile)),
                Who::Attribute(_) => entry.conditions.eval_without_profile(&ev.attributes),
            };
            if held == Some(false) {
                refuse(fx, Refusal::ConditionFalse);
                continue;
            }
            let check_profile = held.is_none();
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
                    Ok(t) if t.len() > self.limits.max_targets => {
                        refuse(fx, Refusal::TooManyTargets);
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
                    check_profile,
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
        if intent.check_profile
            && !journey
                .entry
                .conditions
                .eval_in(&intent.attributes, us.profile())
        {
            fx.refused
                .push((journey.id.clone(), Refusal::ConditionFalse));
            return;
        }
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
        if intent.session_key.is_some() {
            let live = (0..us.len())
                .filter(|&ix| us.is_active(ix) && us.session(ix).journey_id == journey.id)
                .count();
            if live >= self.limits.max_sessions_per_user {
                fx.refused
                    .push((journey.id.clone(), Refusal::TooManySessions));
                return;
            }
        }
        let key = intent.session_key.as_deref();
        if journey.entry.keeps_history() {
            if let Some(r) = controls::reentry_refusal(&journey, us.history(), key, intent.time) {
                fx.refused.push((journey.id.clone(), r));
                return;
            }
            controls::record_entry(&journey, us.history_mut(), key, intent.time);
        } else if us.history().journey(&journey.id).is_some() {
            // The journey no longer has re-entry rules: its history can refuse nothing.
            us.history_mut().forget_journey(&journey.id);
        }
        let holdout = journey
            .holdout
            .is_some_and(|h| controls::held_out(&journey.id, &intent.user_id, h));
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
            holdout: holdout.then_some(true),
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
            progress: 0,
            holdout,
        });
        let cause = Cause {
            event: Some((&intent.event, &intent.event_id)),
            at: intent.time,
        };
        self.arrive(&journey, us, ix, journey.start, cause, fx);
    }

    /// Fires the timer due at `due` of session `ix` (a wait's timeout, a delay, a quiet-hours
    /// release); a timer the session no longer waits for is ignored. Returns whether it fired.
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
        let Some(journey) = self.session_journey(us, ix) else {
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
        let leave = Leave::default();
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
                    leave,
                    fx,
                ),
                None => {
                    let from = journey.steps[step_ix].id.clone();
                    self.end(&journey, us, ix, &from, "timeout", cause, leave, fx)
                }
            },
            StepKind::Delay { next, .. } => {
                self.go(&journey, us, ix, step_ix, *next, "delay", cause, leave, fx)
            }
            StepKind::Action { .. } => {
                fx.released.push(journey.id.clone());
                self.leave_action(&journey, us, ix, step_ix, cause, fx)
            }
            _ => {}
        }
        true
    }

    /// Erases the user (a profile topic's erasure): every active session ends with a
    /// `journey_exit` of reason `erased` at `at`, and the history (entries, deliveries) and
    /// profile are removed, so the caller's changes delete everything stored under the user.
    pub fn erase(&self, us: &mut UserSessions, at: Millis, fx: &mut Effects) {
        let cause = Cause { event: None, at };
        for ix in 0..us.len() {
            if !us.is_active(ix) {
                continue;
            }
            match self.session_journey(us, ix) {
                Some(journey) => {
                    let step = us.session(ix).step.clone();
                    self.end(
                        &journey,
                        us,
                        ix,
                        &step,
                        "erased",
                        cause,
                        Leave::default(),
                        fx,
                    );
                }
                // A version no longer known: nothing to say, but nothing may be kept.
                None => us.remove(ix),
            }
        }
        if !us.history().is_empty() {
            *us.history_mut() = History::default();
        }
        if us.profile().is_some() {
            us.set_profile(None);
        }
    }

    /// Ends session `ix` because its journey was archived (exit reason `archived`, at `at`).
    pub fn archive(&self, us: &mut UserSessions, ix: usize, at: Millis, fx: &mut Effects) {
        if !us.is_active(ix) {
            return;
        }
        let Some(journey) = self.session_journey(us, ix) else {
            return;
        };
        let step = us.session(ix).step.clone();
        let cause = Cause { event: None, at };
        self.end(
            &journey,
            us,
            ix,
            &step,
            "archived",
            cause,
            Leave::default(),
            fx,
        );
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
            let mut seen = std::collections::HashSet::with_capacity(items.len());
            for item in items {
                let id = id_text(item).ok_or(BadTargets)?;
                if seen.insert(id.clone()) {
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
#[cfg(test)]
mod tests_controls;
#[cfg(test)]
mod tests_profile;
#[cfg(test)]
mod tests_refusals;
