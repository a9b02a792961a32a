//! Journey state storage.
//!
//! [`Store`] is an ordered key-value store with three tables and atomic write batches; it never
//! names RocksDB ([`rocks::RocksStore`] is the implementation the service uses). [`State`] is the
//! typed layer on top: sessions keyed by (application, user, journey, session key) so that a user's
//! sessions are one prefix scan, timers indexed by due time, and metadata such as input offsets.
//! Every change caused by one input is written in one [`Batch`].

pub mod cache;
mod keys;
pub mod memory;
pub mod rocks;
mod staged;

pub use keys::{
    decode_timer_key, history_key, profile_key, session_key, timer_key, user_hash, user_prefix,
};
use keys::{due_bytes, due_from, is_history_key, user_record, Reader};

use std::collections::BTreeSet;

use crate::engine::{Change, ChangeRef, History, Profile, Session, UserState};
use crate::time::Millis;

/// The tables of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Sessions by (application, user, journey, key), prefixed by a hash of (application, user).
    /// A session holds its pending timer's due time; the timer index is derived from them.
    Sessions,
    /// Metadata: input offsets, replay clock, journey versions.
    Meta,
    /// Users' profiles by user prefix (hash, application, user). A table of its own so that the
    /// sessions table stays as small as the live sessions (its prefix scans and compactions do not
    /// wade through every user's profile) and a user without one costs a bloom-filter probe.
    Profiles,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Sessions, Table::Meta, Table::Profiles];

    pub fn name(self) -> &'static str {
        match self {
            Table::Sessions => "sessions",
            Table::Meta => "meta",
            Table::Profiles => "profiles",
        }
    }

    pub fn from_name(s: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Backend(String),
    #[error("state store holds an unreadable value at {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One write: `None` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub table: Table,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Changes applied atomically, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub ops: Vec<Put>,
}

impl Batch {
    pub fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Put {
            table,
            key,
            value: Some(value),
        });
    }

    pub fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.ops.push(Put {
            table,
            key,
            value: None,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn clear(&mut self) {
        self.ops.clear();
    }
}

/// An ordered key-value store with atomic batches.
pub trait Store: Send + Sync {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Visits keys starting with `prefix` in order until `f` returns false.
    fn scan_prefix(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()>;
    /// Visits keys at or after `start` in order until `f` returns false.
    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()>;
    /// Applies every op of the batch, or none.
    fn write(&self, batch: &Batch) -> Result<()>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()>;
}

/// A due timer, as found in the index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimerRef {
    pub due: Millis,
    pub application: String,
    pub user_id: String,
    pub journey_id: String,
    pub key: Option<String>,
}

/// The metadata key holding how many profiles the state stores.
const META_PROFILES: &str = "profiles/count";

/// Journey state over a [`Store`]: the typed operations the processor needs.
///
/// Writes are staged in memory and visible to every read through this `State` at once; they reach
/// the store only in [`State::commit`], as one atomic batch. The runtime commits after the outputs
/// of the staged inputs are acknowledged, together with the input offsets they reached, so a crash
/// never leaves state ahead of what was published; [`State::discard`] drops staged work (an aborted
/// transaction).
pub struct State<S: Store> {
    store: S,
    /// Writes not yet in the store, in generations (see [`staged`]).
    staged: staged::Staged,
    /// Decoded sessions by user prefix, kept in step with every staged change, so a busy user's
    /// sessions are read from the store once. Bounded by users and bytes (see [`cache`]).
    cache: cache::Cache,
    /// Pending timers by (due, application, user, journey, key): derived from the sessions (each
    /// holds its timer's due time), kept in memory and in step with every staged change.
    timers: BTreeSet<Vec<u8>>,
    /// The largest key + value staged since [`State::take_largest_write`] (what a changelog
    /// record of it would weigh).
    largest_write: usize,
    /// Profiles stored (staged writes included): read from the metadata when the state opens or
    /// drops staged work, kept by [`State::note_profiles`] between.
    profiles: i64,
    /// The vector [`State::commit`] fills, empty between commits.
    batch_buf: Vec<Put>,
}

impl<S: Store> State<S> {
    /// Wraps a store, building the timer index from its sessions (one scan).
    pub fn new(store: S) -> Result<State<S>> {
        let mut state = State {
            store,
            staged: staged::Staged::default(),
            cache: cache::Cache::default(),
            timers: BTreeSet::new(),
            largest_write: 0,
            profiles: 0,
            batch_buf: Vec::new(),
        };
        state.rebuild_timers()?;
        Ok(state)
    }

    /// Rebuilds the timer index from the sessions (store and staged writes), and reads the count
    /// of stored profiles.
    fn rebuild_timers(&mut self) -> Result<()> {
        let mut timers = BTreeSet::new();
        self.all_sessions(&mut |app, s| {
            if let Some(due) = s.timer {
                timers.insert(timer_key(
                    due,
                    app,
                    &s.user_id,
                    &s.journey_id,
                    s.key.as_deref(),
                ));
            }
            true
        })?;
        self.profiles = match self.get(Table::Meta, META_PROFILES.as_bytes())? {
            Some(v) => v.try_into().map(i64::from_be_bytes).unwrap_or(0),
            None => 0,
        };
        self.timers = timers;
        Ok(())
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// How many writes are staged in the open generation.
    pub fn staged(&self) -> usize {
        self.staged.open_ops()
    }

    /// Stages a raw write. A session written this way (not through [`State::stage_changes`])
    /// empties the session cache.
    pub fn stage(&mut self, table: Table, key: Vec<u8>, value: Option<Vec<u8>>) {
        if table == Table::Sessions {
            self.cache.clear();
        }
        self.stage_raw(table, key, value);
    }

    /// The largest key + value staged since the last call, and resets it.
    pub fn take_largest_write(&mut self) -> usize {
        std::mem::take(&mut self.largest_write)
    }

    fn stage_raw(&mut self, table: Table, key: Vec<u8>, value: Option<Vec<u8>>) {
        let size = key.len() + value.as_ref().map_or(0, Vec::len);
        self.largest_write = self.largest_write.max(size);
        self.staged.put(table, key, value);
    }

    /// Bounds the session cache: at most `users` users and `bytes` estimated bytes (0 users
    /// turns it off).
    pub fn set_cache_limits(&mut self, users: usize, bytes: usize) {
        self.cache = cache::Cache::new(users, bytes);
    }

    /// Users and estimated bytes in the session cache now.
    pub fn cache_size(&self) -> (usize, usize) {
        (self.cache.len(), self.cache.bytes())
    }

    pub fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.staged.get(table, key) {
            Some(v) => Ok(v.map(<[u8]>::to_vec)),
            None => self.store.get(table, key),
        }
    }

    /// Visits `table` in key order from `start` (and only keys with `prefix`, if given), staged
    /// writes merged over the store, until `f` returns false.
    fn scan(
        &self,
        table: Table,
        start: &[u8],
        prefix: Option<&[u8]>,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let mut overlay = self.staged.overlay(table, start, prefix).peekable();
        let mut stopped = false;
        let mut visit = |k: &[u8], v: &[u8]| -> bool {
            // Staged keys before this one come first.
            while let Some((ok, ov)) = overlay.peek() {
                if *ok >= k {
                    break;
                }
                if let Some(ov) = ov {
                    if !f(ok, ov) {
                        stopped = true;
                        return false;
                    }
                }
                overlay.next();
            }
            if let Some((ok, ov)) = overlay.peek() {
                if *ok == k {
                    let keep_going = match ov {
                        Some(ov) => f(ok, ov),
                        None => true,
                    };
                    overlay.next();
                    if !keep_going {
                        stopped = true;
                    }
                    return keep_going;
                }
            }
            if !f(k, v) {
                stopped = true;
                return false;
            }
            true
        };
        match prefix {
            Some(p) => self.store.scan_prefix(table, p, &mut visit)?,
            None => self.store.scan_from(table, start, &mut visit)?,
        }
        if !stopped {
            for (k, v) in overlay {
                if let Some(v) = v {
                    if !f(k, v) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// A user's state in `application` (sessions and history): from the cache, or one prefix
    /// scan.
    pub fn user_state(&mut self, application: &str, user: &str) -> Result<UserState> {
        let prefix = user_prefix(application, user);
        if let Some(hit) = self.cache.get(&prefix) {
            return Ok(hit.clone());
        }
        let out = self.read_user_state(&prefix)?;
        self.cache.insert(prefix, out.clone());
        Ok(out)
    }

    /// All sessions of (application, user).
    pub fn user_sessions(&mut self, application: &str, user: &str) -> Result<Vec<Session>> {
        Ok(self.user_state(application, user)?.sessions)
    }

    /// Like [`State::user_state`], but moves the cached state out instead of copying it; give
    /// it back with [`State::return_user_state`] once its changes are staged.
    pub fn take_user_state(&mut self, application: &str, user: &str) -> Result<UserState> {
        let prefix = user_prefix(application, user);
        match self.cache.remove(&prefix) {
            Some(state) => Ok(state),
            None => self.read_user_state(&prefix),
        }
    }

    /// The sessions and history under a user prefix, staged writes merged over the store.
    fn read_user_state(&self, prefix: &[u8]) -> Result<UserState> {
        let mut out = UserState::default();
        let mut err = None;
        self.scan(Table::Sessions, prefix, Some(prefix), &mut |k, v| {
            let decoded = if is_history_key(prefix.len(), k) {
                serde_json::from_slice::<History>(v).map(|h| out.history = h)
            } else {
                serde_json::from_slice::<Session>(v).map(|s| out.sessions.push(s))
            };
            if let Err(e) = decoded {
                err = Some(StoreError::Corrupt {
                    key: String::from_utf8_lossy(k).into_owned(),
                    reason: e.to_string(),
                });
                return false;
            }
            true
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        // The profile's key is the user prefix itself (a point read; a bloom-filter probe for
        // a user without one).
        if let Some(v) = self.get(Table::Profiles, prefix)? {
            let p = serde_json::from_slice::<Profile>(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(prefix).into_owned(),
                reason: format!("profile: {e}"),
            })?;
            out.profile = Some(p);
        }
        Ok(out)
    }

    /// Puts a user's state (as it is after the staged changes) back in the cache.
    pub fn return_user_state(&mut self, application: &str, user: &str, state: UserState) {
        self.cache.insert(user_prefix(application, user), state);
    }

    /// Keeps a cached user's sessions in step with a staged change.
    fn cache_apply(&mut self, application: &str, session: &Session, deleted: bool) {
        let prefix = user_prefix(application, &session.user_id);
        self.cache.update(&prefix, |state| {
            let list = &mut state.sessions;
            let pos = list
                .iter()
                .position(|s| s.journey_id == session.journey_id && s.key == session.key);
            match (pos, deleted) {
                (Some(i), true) => {
                    list.remove(i);
                }
                (Some(i), false) => list[i] = session.clone(),
                (None, false) => list.push(session.clone()),
                (None, true) => {}
            }
        });
    }

    /// Every session, in key order, with its application (for inspection and gauges).
    pub fn all_sessions(&self, f: &mut dyn FnMut(&str, Session) -> bool) -> Result<()> {
        self.scan(Table::Sessions, &[], None, &mut |k, v| {
            let Some(rest) = k.get(8..) else {
                return true;
            };
            let mut r = Reader(rest);
            let app = r.str().unwrap_or_default();
            let _user = r.str();
            if r.str().is_none_or(|journey| journey.is_empty()) {
                return true; // a history record
            }
            match serde_json::from_slice::<Session>(v) {
                Ok(s) => f(&app, s),
                Err(_) => true,
            }
        })
    }

    /// Every user's history (entries and deliveries), with application and user.
    pub fn all_histories(&self, f: &mut dyn FnMut(&str, &str, History) -> bool) -> Result<()> {
        self.scan(Table::Sessions, &[], None, &mut |k, v| {
            let Some((app, user)) = user_record(k, is_history_key) else {
                return true;
            };
            match serde_json::from_slice::<History>(v) {
                Ok(h) => f(&app, &user, h),
                Err(_) => true,
            }
        })
    }

    /// Every user's profile, with application and user.
    pub fn all_profiles(&self, f: &mut dyn FnMut(&str, &str, Profile) -> bool) -> Result<()> {
        self.scan(Table::Profiles, &[], None, &mut |k, v| {
            let mut r = Reader(k.get(8..).unwrap_or_default());
            let (Some(app), Some(user)) = (r.str(), r.str()) else {
                return true;
            };
            match serde_json::from_slice::<Profile>(v) {
                Ok(p) => f(&app, &user, p),
                Err(_) => true,
            }
        })
    }

    /// A user's profile in `application`, staged writes included.
    pub fn profile(&self, application: &str, user: &str) -> Result<Option<Profile>> {
        match self.get(Table::Profiles, &profile_key(application, user))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    key: format!("profile of {application}/{user}"),
                    reason: e.to_string(),
                }),
        }
    }

    /// How many profiles are stored (staged writes included).
    pub fn profiles(&self) -> i64 {
        self.profiles
    }

    /// Notes profiles stored (`+1`) or removed (`-1`) by staged changes. The count is kept in
    /// the metadata (`profiles/count`, staged with the changes, carried by the changelog), so
    /// opening a state with millions of profiles does not count them.
    pub fn note_profiles(&mut self, delta: i64) {
        if delta == 0 {
            return;
        }
        self.profiles += delta;
        self.stage_meta(META_PROFILES, self.profiles.to_be_bytes().to_vec());
    }

    /// The earliest timer's due time.
    pub fn next_timer(&self) -> Option<Millis> {
        self.timers.first().and_then(|k| due_from(&k[..8]))
    }

    /// How many timers are pending.
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.get(Table::Meta, key.as_bytes())
    }

    /// Metadata entries whose key starts with `prefix`.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        self.scan(Table::Meta, prefix.as_bytes(), None, &mut |k, v| {
            if !k.starts_with(prefix.as_bytes()) {
                return false;
            }
            out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
            true
        })?;
        Ok(out)
    }

    pub fn stage_meta(&mut self, key: &str, value: Vec<u8>) {
        self.stage(Table::Meta, key.as_bytes().to_vec(), Some(value));
    }

    /// Drops a fired timer from the index.
    pub fn remove_timer(&mut self, t: &TimerRef) {
        let key = timer_key(
            t.due,
            &t.application,
            &t.user_id,
            &t.journey_id,
            t.key.as_deref(),
        );
        self.timers.remove(&key);
    }

    /// Stages the engine's changes for `application`; returns the earliest timer they set.
    pub fn stage_changes(&mut self, application: &str, changes: Vec<Change>) -> Option<Millis> {
        let mut earliest: Option<Millis> = None;
        for c in &changes {
            if let Some(due) = self.stage_change(application, ChangeRef::from(c)) {
                earliest = Some(earliest.map_or(due, |e: Millis| e.min(due)));
            }
        }
        earliest
    }

    /// Stages one change; returns the session's timer, if it has one.
    pub fn stage_change(&mut self, application: &str, change: ChangeRef<'_>) -> Option<Millis> {
        match change {
            ChangeRef::Put { session, old_timer } => {
                let key = session.key.as_deref();
                let (user, journey) = (&session.user_id, &session.journey_id);
                if let Some(old) = old_timer.filter(|&o| Some(o) != session.timer) {
                    self.timers
                        .remove(&timer_key(old, application, user, journey, key));
                }
                if let Some(due) = session.timer {
                    if Some(due) != old_timer {
                        self.timers
                            .insert(timer_key(due, application, user, journey, key));
                    }
                }
                let sk = session_key(application, user, journey, key);
                let value = serde_json::to_vec(session).expect("sessions always serialise");
                self.stage_raw(Table::Sessions, sk, Some(value));
                self.cache_apply(application, session, false);
                session.timer
            }
            ChangeRef::Delete { session, old_timer } => {
                let key = session.key.as_deref();
                let (user, journey) = (&session.user_id, &session.journey_id);
                if let Some(old) = old_timer {
                    self.timers
                        .remove(&timer_key(old, application, user, journey, key));
                }
                let sk = session_key(application, user, journey, key);
                self.stage_raw(Table::Sessions, sk, None);
                self.cache_apply(application, session, true);
                None
            }
            ChangeRef::Profile { user_id, profile } => {
                let k = profile_key(application, user_id);
                let value =
                    profile.map(|p| serde_json::to_vec(p).expect("profiles always serialise"));
                self.stage_raw(Table::Profiles, k, value);
                self.cache
                    .update(&user_prefix(application, user_id), |state| {
                        state.profile = profile.cloned();
                        state.profile_weight = None;
                    });
                None
            }
            ChangeRef::History { user_id, history } => {
                let k = history_key(application, user_id);
                let value = (!history.is_empty())
                    .then(|| serde_json::to_vec(history).expect("history always serialises"));
                self.stage_raw(Table::Sessions, k, value);
                self.cache
                    .update(&user_prefix(application, user_id), |state| {
                        state.history = history.clone()
                    });
                None
            }
        }
    }

    /// The timers due at or after `from`, earliest first, at most `limit`.
    pub fn timers_from(&self, from: Millis, limit: usize) -> Vec<TimerRef> {
        self.timers
            .range(due_bytes(from).to_vec()..)
            .take(limit)
            .filter_map(|k| decode_timer_key(k))
            .collect()
    }

    /// The open generation's writes, table by table in key order.
    pub fn pending(&self) -> impl Iterator<Item = (Table, &[u8], Option<&[u8]>)> {
        self.staged.open_writes()
    }

    /// Seals the open generation as `id` (ids grow): its writes stay visible and wait for
    /// [`State::commit_sealed`] or [`State::discard`]; later writes go to a new generation.
    pub fn seal(&mut self, id: u64) {
        self.staged.seal(id);
    }

    /// Sealed generations not yet written.
    pub fn sealed(&self) -> usize {
        self.staged.sealed_count()
    }

    /// How many writes sealed generation `id` holds (`None`: none sealed as `id`).
    pub fn sealed_ops(&self, id: u64) -> Option<usize> {
        self.staged.sealed_ops(id)
    }

    /// Sealed generation `id`'s writes, table by table in key order.
    pub fn sealed_writes(&self, id: u64) -> impl Iterator<Item = (Table, &[u8], Option<&[u8]>)> {
        self.staged.sealed_writes(id)
    }

    /// Writes sealed generation `id` to the store in one atomic batch, with `meta` (metadata
    /// known only now, such as the changelog position). Generations are written oldest first:
    /// an older one still sealed is an error. `Ok(false)`: no generation was sealed as `id` (the
    /// state was reopened or discarded since), and nothing is written.
    pub fn commit_sealed(&mut self, id: u64, meta: &[(&str, Vec<u8>)]) -> Result<bool> {
        let mut g = match self.staged.take_oldest(id) {
            Ok(Some(g)) => g,
            Ok(None) => return Ok(false),
            Err(oldest) => {
                return Err(StoreError::Backend(format!(
                    "generation {id} written before generation {oldest}"
                )))
            }
        };
        let mut batch = Batch {
            ops: std::mem::take(&mut self.batch_buf),
        };
        g.drain_into(&mut batch.ops);
        for (k, v) in meta {
            batch.put(Table::Meta, k.as_bytes().to_vec(), v.clone());
        }
        let written = self.store.write(&batch);
        batch.ops.clear();
        self.batch_buf = batch.ops;
        written.map(|()| true)
    }

    /// Writes everything staged (sealed generations and the open one) to the store in one
    /// atomic batch.
    pub fn commit(&mut self) -> Result<()> {
        if self.staged.open_ops() == 0 && self.staged.sealed_count() == 0 {
            return Ok(());
        }
        // The batch's vector is kept between commits: grown afresh each time, its megabytes came
        // back from the allocator as new pages to fault in (7% of a replay's time with 1M
        // profiles stored).
        let mut batch = Batch {
            ops: std::mem::take(&mut self.batch_buf),
        };
        for mut g in self.staged.take_all() {
            g.drain_into(&mut batch.ops);
        }
        let written = self.store.write(&batch);
        batch.ops.clear();
        self.batch_buf = batch.ops;
        written
    }

    /// Drops everything staged, sealed generations too (and the session cache, which may hold
    /// staged changes), and rebuilds the timer index from what the store holds.
    pub fn discard(&mut self) -> Result<()> {
        self.cache.clear();
        self.staged.clear();
        self.rebuild_timers()
    }

    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }
}

#[cfg(test)]
mod tests;
