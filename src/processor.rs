//! The engine over a state store: one partition's (or one replay's) processing loop body.
//!
//! [`Processor`] turns inputs into records and staged state changes: it fires due timers, loads
//! the sessions an event concerns (one prefix scan per user, none at all for events no journey
//! cares about), runs the pure [`Engine`], and stages what changed in [`State`]. It knows nothing
//! of Kafka: `waymark replay` and `waymark run` both drive it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::engine::{Effects, Engine, EntryIntent, Refusal, UserSessions};
use crate::event::{Event, EventError};
use crate::journey::{Journey, JourneySet, Status};
use crate::profile::ProfileRecord;
use crate::record::Record;
use crate::store::{State, Store, StoreError, TimerRef};
use crate::time::Millis;

/// What processing produced, to publish and to count.
#[derive(Debug, Default)]
pub struct Output {
    pub records: Vec<Record>,
    /// Entries for users whose state lives elsewhere (another partition).
    pub routed: Vec<EntryIntent>,
    pub refused: Vec<(String, Refusal)>,
    pub matched: Vec<String>,
    /// Journeys whose entry event the input was.
    pub triggered: Vec<String>,
    /// Timers fired, with their due times (for lateness).
    pub timers_fired: Vec<Millis>,
    /// Journeys of sessions held by quiet hours, and of sessions released (one per event).
    pub held: Vec<String>,
    pub released: Vec<String>,
}

impl Output {
    pub fn clear(&mut self) {
        self.records.clear();
        self.routed.clear();
        self.refused.clear();
        self.matched.clear();
        self.triggered.clear();
        self.timers_fired.clear();
        self.held.clear();
        self.released.clear();
    }

    fn take_effects(&mut self, fx: &mut Effects) {
        self.records.append(&mut fx.records);
        self.refused.append(&mut fx.refused);
        self.matched.append(&mut fx.matched);
        self.triggered.append(&mut fx.triggered);
        self.held.append(&mut fx.held);
        self.released.append(&mut fx.released);
    }
}

/// Processes inputs against one store.
pub struct Processor<S: Store> {
    engine: Engine,
    state: State<S>,
    /// The earliest timer's due time, kept so events need no store access to know none is due.
    next_timer: Option<Millis>,
    /// The next timers, read ahead in one scan and fired in order; dropped when a new timer may
    /// sort before the last of them (due no later: timers due at the same instant are ordered by
    /// application, user, journey and key, so the buffer cannot tell by time alone). An entry whose session has moved on is skipped when fired.
    due: VecDeque<TimerRef>,
    /// Journey versions whose definitions this store holds (`journey/ID/VERSION` in meta), so an
    /// instance that takes the partition over runs each session on the version it entered.
    persisted: HashMap<String, HashSet<String>>,
    fx: Effects,
    max_profile_bytes: usize,
}

/// What [`Processor::on_input`] did with an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputApplied {
    /// No journey cares about its event: only the timers due by its time fired.
    TimersOnly,
    /// Applied as an event.
    Event,
}

/// What an accepted profile record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileApplied {
    Updated,
    Erased,
}

const META_JOURNEY: &str = "journey/";

/// Due timers read per scan.
const DUE_BATCH: usize = 256;

impl<S: Store> Processor<S> {
    pub fn new(journeys: Arc<JourneySet>, state: State<S>) -> Result<Processor<S>, StoreError> {
        let next_timer = state.next_timer();
        // Versions stored with the state, compiled again: sessions may still be on them.
        let mut persisted: HashMap<String, HashSet<String>> = HashMap::new();
        let mut older = Vec::new();
        for (key, value) in state.meta_with_prefix(META_JOURNEY)? {
            let mut parts = key[META_JOURNEY.len()..].rsplitn(2, '/');
            let (Some(version), Some(id)) = (parts.next(), parts.next()) else {
                continue;
            };
            persisted
                .entry(id.to_string())
                .or_default()
                .insert(version.to_string());
            if journeys.has_version(id, version) {
                continue;
            }
            let text = String::from_utf8_lossy(&value);
            match crate::journey::parse_journey(&key, &text) {
                Ok(mut j) => {
                    // The stored text is the definition; keep the version it was stored under.
                    j.version = version.to_string();
                    older.push(Arc::new(j));
                }
                Err(problems) => {
                    return Err(StoreError::Corrupt {
                        key,
                        reason: format!("{} problem(s) in a stored journey", problems.len()),
                    })
                }
            }
        }
        let set = if older.is_empty() {
            journeys
        } else {
            Arc::new(
                JourneySet::with_versions(journeys.journeys.clone(), older)
                    .with_policies(journeys.policies().clone()),
            )
        };
        Ok(Processor {
            engine: Engine::new(set),
            state,
            next_timer,
            due: VecDeque::new(),
            persisted,
            fx: Effects::default(),
            max_profile_bytes: crate::profile::DEFAULT_MAX_PROFILE_BYTES,
        })
    }

    /// Sets the engine's bounds (`processing.max_targets`, `processing.max_sessions_per_user`).
    pub fn set_limits(&mut self, limits: crate::engine::Limits) {
        self.engine = self.engine.clone().with_limits(limits);
    }

    pub fn state(&self) -> &State<S> {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut State<S> {
        &mut self.state
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Replaces the journey set (a reload).
    /// Replaces the journey set (a reload). Versions of the old set stay available to the
    /// sessions on them.
    pub fn set_journeys(&mut self, journeys: Arc<JourneySet>) {
        let older: Vec<Arc<Journey>> = self
            .engine
            .journeys()
            .all_versions()
            .filter(|j| !journeys.has_version(&j.id, &j.version))
            .cloned()
            .collect();
        let set = JourneySet::with_versions(journeys.journeys.clone(), older)
            .with_policies(journeys.policies().clone());
        self.engine = Engine::new(Arc::new(set)).with_limits(self.engine.limits());
    }

    /// Forgets the journey versions no session is on any more: their stored definitions (meta
    /// `journey/ID/VERSION`, deleted in the changelog too) and their compiled copies. Run when a
    /// partition opens and after each reload, so an old version outlives its last session only
    /// until the next of either. Costs one scan of the sessions, and none while every stored
    /// version is a current one. Returns how many stored versions were deleted.
    pub fn collect_versions(&mut self) -> Result<usize, StoreError> {
        let journeys = self.engine.journeys().clone();
        let stale_stored = self
            .persisted
            .iter()
            .any(|(id, vs)| vs.iter().any(|v| !journeys.is_current(id, v)));
        let older = journeys.all_versions().count() > journeys.journeys.len();
        if !stale_stored && !older {
            return Ok(0);
        }
        let mut used: HashSet<(String, String)> = HashSet::new();
        self.state.all_sessions(&mut |_, s| {
            used.insert((s.journey_id, s.version));
            true
        })?;
        let in_use = |id: &str, v: &str| used.contains(&(id.to_string(), v.to_string()));
        let mut deleted = 0;
        let state = &mut self.state;
        for (id, versions) in self.persisted.iter_mut() {
            versions.retain(|v| {
                let keep = in_use(id, v);
                if !keep {
                    state.stage(
                        crate::store::Table::Meta,
                        format!("{META_JOURNEY}{id}/{v}").into_bytes(),
                        None,
                    );
                    deleted += 1;
                }
                keep
            });
        }
        self.persisted.retain(|_, vs| !vs.is_empty());
        if older {
            let kept: Vec<Arc<Journey>> = journeys
                .all_versions()
                .filter(|j| !journeys.is_current(&j.id, &j.version) && in_use(&j.id, &j.version))
                .cloned()
                .collect();
            let set = JourneySet::with_versions(journeys.journeys.clone(), kept)
                .with_policies(journeys.policies().clone());
            self.engine = Engine::new(Arc::new(set)).with_limits(self.engine.limits());
        }
        Ok(deleted)
    }

    /// Ends every session of an archived journey (exit reason `archived`, at `at`).
    pub fn archive_sessions(&mut self, at: Millis, out: &mut Output) -> Result<(), StoreError> {
        let archived: HashSet<String> = self
            .engine
            .journeys()
            .journeys
            .iter()
            .filter(|j| j.status == Status::Archived)
            .map(|j| j.id.clone())
            .collect();
        if archived.is_empty() {
            return Ok(());
        }
        let mut users: Vec<(String, String)> = Vec::new();
        self.state.all_sessions(&mut |app, s| {
            if archived.contains(&s.journey_id) {
                users.push((app.to_string(), s.user_id));
            }
            true
        })?;
        users.sort();
        users.dedup();
        for (app, user) in users {
            let mut us = self.load(&app, &user)?;
            for ix in 0..us.len() {
                if us.is_active(ix) && archived.contains(&us.session(ix).journey_id) {
                    self.engine.archive(&mut us, ix, at, &mut self.fx);
                }
            }
            self.save(&app, &user, us);
        }
        out.take_effects(&mut self.fx);
        Ok(())
    }

    /// The earliest pending timer, if any.
    pub fn next_timer(&self) -> Option<Millis> {
        self.next_timer
    }

    /// Re-reads the earliest timer from the state (after a discard or a restore).
    pub fn reload_next_timer(&mut self) -> Result<(), StoreError> {
        self.next_timer = self.state.next_timer();
        Ok(())
    }

    fn note_timer(&mut self, due: Option<Millis>) {
        if let Some(d) = due {
            self.next_timer = Some(self.next_timer.map_or(d, |n| n.min(d)));
            if self.due.back().is_some_and(|last| d <= last.due) {
                self.due.clear();
            }
        }
    }

    /// Fires every timer due at or before `upto`, earliest first (a timer that sets another due by
    /// then fires that one too).
    ///
    /// `next_timer` is kept a lower bound of every live timer's due time: firing in due order
    /// keeps it, and every new timer lowers it if need be. Scans start there, past the
    /// tombstones of fired timers.
    pub fn fire_due(&mut self, upto: Millis, out: &mut Output) -> Result<(), StoreError> {
        while let Some(from) = self.next_timer.filter(|&n| n <= upto) {
            let Some(front) = self.due.front() else {
                // Read the next timers ahead, due or not: later events fire them without a scan.
                let batch = self.state.timers_from(from, DUE_BATCH);
                if batch.is_empty() {
                    self.next_timer = None;
                    break;
                }
                self.due.extend(batch);
                continue;
            };
            if front.due > upto {
                self.next_timer = Some(front.due);
                break;
            }
            let t = self.due.pop_front().expect("not empty");
            // Every live timer is due at or after this one (new ones lower the bound).
            self.next_timer = Some(t.due);
            self.fire(t, out)?;
        }
        Ok(())
    }

    fn fire(&mut self, t: TimerRef, out: &mut Output) -> Result<(), StoreError> {
        self.state.remove_timer(&t);
        let mut us = self.load(&t.application, &t.user_id)?;
        if let Some(ix) = us.find(&t.journey_id, t.key.as_deref()) {
            if self.engine.fire_timer(&mut us, ix, t.due, &mut self.fx) {
                out.timers_fired.push(t.due);
            }
        }
        self.save(&t.application, &t.user_id, us);
        out.take_effects(&mut self.fx);
        Ok(())
    }

    /// A user's sessions, taken from the state's cache (no copy) or read from the store.
    fn load(&mut self, application: &str, user: &str) -> Result<UserSessions, StoreError> {
        Ok(UserSessions::load(
            user,
            self.state.take_user_state(application, user)?,
        ))
    }

    /// Stages what changed and hands the user's sessions back to the cache.
    fn save(&mut self, application: &str, user: &str, us: UserSessions) {
        let mut earliest: Option<Millis> = None;
        let state = &mut self.state;
        let persisted = &mut self.persisted;
        let journeys = self.engine.journeys();
        let kept = us.finish(|c| {
            if let crate::engine::ChangeRef::Put { session: s, .. } = c {
                let known = persisted
                    .get(&s.journey_id)
                    .is_some_and(|v| v.contains(&s.version));
                if !known {
                    if let Some(j) = journeys.version(&s.journey_id, &s.version) {
                        let key = format!("{META_JOURNEY}{}/{}", j.id, j.version);
                        state.stage_meta(&key, j.source.to_string().into_bytes());
                        persisted
                            .entry(j.id.clone())
                            .or_default()
                            .insert(j.version.clone());
                    }
                }
            }
            if let Some(due) = state.stage_change(application, c) {
                earliest = Some(earliest.map_or(due, |e: Millis| e.min(due)));
            }
        });
        self.note_timer(earliest);
        self.state.return_user_state(application, user, kept);
    }

    /// Applies one decoded input at `time`, deciding first whether any journey cares about it:
    /// if none does (no entry, wait, goal or exit criterion names its event in its application),
    /// only the timers due by then fire, and the attributes are never decoded; otherwise it
    /// becomes an [`Event`] (`default_id` names it when it has no `eventId`) and is applied with
    /// [`Processor::on_event`]. The inner error is why the input is refused (a dead letter), with
    /// nothing changed. What `run`, `replay` and `backtest` share.
    pub fn on_input(
        &mut self,
        raw: crate::event::RawEvent<'_>,
        time: Millis,
        default_id: impl FnOnce() -> String,
        owns: &dyn Fn(&str) -> bool,
        out: &mut Output,
    ) -> Result<Result<InputApplied, EventError>, StoreError> {
        let cared = self
            .engine
            .journeys()
            .interest(raw.application(), raw.name())
            .is_some();
        if !cared {
            self.fire_due(time, out)?;
            return Ok(Ok(InputApplied::TimersOnly));
        }
        let ev = match raw.into_event(Some(time), default_id) {
            Ok(ev) => ev,
            Err(e) => return Ok(Err(e)),
        };
        self.on_event(&ev, owns, out)?;
        Ok(Ok(InputApplied::Event))
    }

    /// Applies one event: due timers first, then goals and waits of the user's sessions, then
    /// entries. `owns` says whether a user's state lives in this store; entries for other users
    /// go to `out.routed`.
    pub fn on_event(
        &mut self,
        ev: &Event,
        owns: &dyn Fn(&str) -> bool,
        out: &mut Output,
    ) -> Result<(), StoreError> {
        self.fire_due(ev.time, out)?;
        let Some(interest) = self.engine.journeys().interest(&ev.application, &ev.name) else {
            return Ok(());
        };
        let wants_sessions = interest.sessions;
        let has_entries = !interest.entries.is_empty();
        let mut own: Option<UserSessions> = None;
        if wants_sessions || interest.entry_profile {
            let mut us = self.load(&ev.application, &ev.user_id)?;
            self.engine.apply_event(ev, &mut us, &mut self.fx);
            own = Some(us);
        }
        if has_entries {
            let profile = own.as_ref().and_then(|us| us.profile());
            let intents = self.engine.entry_intents(ev, profile, &mut self.fx);
            let mut others: Vec<(String, UserSessions)> = Vec::new();
            for intent in intents {
                if intent.user_id == ev.user_id {
                    if own.is_none() {
                        own = Some(self.load(&ev.application, &ev.user_id)?);
                    }
                    let us = own.as_mut().expect("loaded above");
                    self.engine.apply_entry(&intent, us, &mut self.fx);
                } else if owns(&intent.user_id) {
                    let pos = match others.iter().position(|(u, _)| u == &intent.user_id) {
                        Some(p) => p,
                        None => {
                            let us = self.load(&intent.application, &intent.user_id)?;
                            others.push((intent.user_id.clone(), us));
                            others.len() - 1
                        }
                    };
                    self.engine
                        .apply_entry(&intent, &mut others[pos].1, &mut self.fx);
                } else {
                    out.routed.push(intent);
                }
            }
            for (user, us) in others {
                self.save(&ev.application, &user, us);
            }
        }
        if let Some(us) = own {
            self.save(&ev.application, &ev.user_id, us);
        }
        out.take_effects(&mut self.fx);
        Ok(())
    }

    /// Applies a profile record at `time` (its `timestamp`, else the record's): timers due by
    /// then fire first, as before an event. An update is merged into the user's profile (refused
    /// whole, changing nothing, when the result would pass the profile bound); an erasure ends
    /// the user's sessions (`journey_exit`, reason `erased`) and removes everything stored under
    /// the user in the application. The inner error is the dead-letter reason of a refused update.
    pub fn on_profile(
        &mut self,
        record: &ProfileRecord,
        time: Millis,
        out: &mut Output,
    ) -> Result<Result<ProfileApplied, EventError>, StoreError> {
        self.fire_due(time, out)?;
        let (app, user) = (record.application(), record.user_id());
        let mut us = self.load(app, user)?;
        let had = us.profile().is_some();
        let applied = match record {
            ProfileRecord::Update { attributes, .. } => {
                let stored = us.take_profile();
                let max = self.max_profile_bytes;
                match crate::profile::merge_in_place(stored, attributes, max) {
                    Ok(merged) => {
                        us.set_profile(merged);
                        Ok(ProfileApplied::Updated)
                    }
                    Err((stored, e)) => {
                        us.return_profile(stored);
                        Err(e)
                    }
                }
            }
            ProfileRecord::Erase { .. } => {
                self.engine.erase(&mut us, time, &mut self.fx);
                Ok(ProfileApplied::Erased)
            }
        };
        let has = us.profile().is_some();
        self.state.note_profiles(has as i64 - had as i64);
        self.save(app, user, us);
        out.take_effects(&mut self.fx);
        Ok(applied)
    }

    /// Bounds a stored profile's size (`processing.max_profile_bytes`; 0: no bound).
    pub fn set_max_profile_bytes(&mut self, max: usize) {
        self.max_profile_bytes = max;
    }

    /// Applies an entry decided elsewhere (routed from another partition). Timers due by its time
    /// fire first.
    pub fn on_intent(&mut self, intent: &EntryIntent, out: &mut Output) -> Result<(), StoreError> {
        self.fire_due(intent.time, out)?;
        let mut us = self.load(&intent.application, &intent.user_id)?;
        self.engine.apply_entry(intent, &mut us, &mut self.fx);
        self.save(&intent.application, &intent.user_id, us);
        out.take_effects(&mut self.fx);
        Ok(())
    }

    /// Writes everything staged in one atomic batch.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        self.state.commit()
    }

    /// Drops everything staged (an aborted batch) and re-reads the timer index.
    pub fn discard(&mut self) -> Result<(), StoreError> {
        self.state.discard()?;
        self.due.clear();
        self.reload_next_timer()
    }
}

#[cfg(test)]
mod tests;
