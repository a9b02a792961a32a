//! The decoded-state cache of [`super::State`]: users' sessions and history by user prefix, so a
//! busy user's state is read and decoded once. Bounded twice: by users and by an estimate of the
//! bytes the decoded state holds ([`weight`]); when an insert would break either bound the cache
//! is cleared whole (cheap, and the next reads refill it with the users that are busy now).

use std::collections::HashMap;

use serde_json::Value;

use crate::engine::UserState;

/// Users whose state one partition's cache holds at most, by default.
pub const DEFAULT_MAX_USERS: usize = 200_000;
/// Estimated bytes one partition's cache holds at most, by default (64 MiB).
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

/// Fixed costs of the estimate, close to what the decoded structures take on a 64-bit machine
/// beside the bytes of their strings: a `Session` with its strings and map, a map entry, a JSON
/// value, a cache entry with its key.
const SESSION_COST: usize = 320;
const ENTRY_COST: usize = 64;
const VALUE_COST: usize = 32;
const USER_COST: usize = 160;

struct Entry {
    state: UserState,
    bytes: usize,
}

pub struct Cache {
    map: HashMap<Vec<u8>, Entry>,
    bytes: usize,
    max_users: usize,
    max_bytes: usize,
}

impl Default for Cache {
    fn default() -> Cache {
        Cache::new(DEFAULT_MAX_USERS, DEFAULT_MAX_BYTES)
    }
}

impl Cache {
    /// A cache of at most `max_users` users and `max_bytes` estimated bytes (0 turns it off).
    pub fn new(max_users: usize, max_bytes: usize) -> Cache {
        Cache {
            map: HashMap::new(),
            bytes: 0,
            max_users,
            max_bytes,
        }
    }

    pub fn get(&self, prefix: &[u8]) -> Option<&UserState> {
        self.map.get(prefix).map(|e| &e.state)
    }

    pub fn remove(&mut self, prefix: &[u8]) -> Option<UserState> {
        let e = self.map.remove(prefix)?;
        self.bytes -= e.bytes;
        Some(e.state)
    }

    /// Caches a user's state; a state bigger than the whole byte bound is not cached.
    pub fn insert(&mut self, prefix: Vec<u8>, mut state: UserState) {
        if self.max_users == 0 {
            return;
        }
        if let (Some(p), None) = (&state.profile, state.profile_weight) {
            state.profile_weight = Some(profile_weight(p));
        }
        let bytes = weight(prefix.len(), &state);
        if bytes > self.max_bytes {
            self.remove(&prefix);
            return;
        }
        if let Some(old) = self.map.remove(&prefix) {
            self.bytes -= old.bytes;
        }
        if self.map.len() >= self.max_users || self.bytes + bytes > self.max_bytes {
            self.clear();
        }
        self.bytes += bytes;
        self.map.insert(prefix, Entry { state, bytes });
    }

    /// Changes a cached user's state in place (if cached), keeping the byte count in step.
    pub fn update(&mut self, prefix: &[u8], f: impl FnOnce(&mut UserState)) {
        let Some(e) = self.map.get_mut(prefix) else {
            return;
        };
        f(&mut e.state);
        let bytes = weight(prefix.len(), &e.state);
        self.bytes = self.bytes - e.bytes + bytes;
        e.bytes = bytes;
        if self.bytes > self.max_bytes {
            self.clear();
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The estimated bytes cached now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// An estimate of the memory a user's decoded state takes: the bytes of every string and
/// attribute value plus fixed costs per session, map entry and value. It errs high for small
/// states and counts what grows without a fixed bound (contexts, history) byte for byte.
pub fn weight(prefix_len: usize, state: &UserState) -> usize {
    let sessions: usize = state
        .sessions
        .iter()
        .map(|s| {
            SESSION_COST
                + s.journey_id.len()
                + s.version.len()
                + s.user_id.len()
                + s.key.as_ref().map_or(0, String::len)
                + s.session_id.len()
                + s.source_user_id.len()
                + s.step.len()
                + s.converted
                    .iter()
                    .map(|g| VALUE_COST + g.len())
                    .sum::<usize>()
                + s.context
                    .iter()
                    .map(|(k, v)| ENTRY_COST + k.len() + value_weight(v))
                    .sum::<usize>()
        })
        .sum();
    let h = &state.history;
    let history: usize = h
        .journeys
        .iter()
        .map(|j| {
            ENTRY_COST
                + j.journey_id.len()
                + j.keys
                    .iter()
                    .map(|k| VALUE_COST + k.key.as_ref().map_or(0, String::len))
                    .sum::<usize>()
        })
        .sum::<usize>()
        + h.deliveries
            .iter()
            .map(|d| VALUE_COST + d.action.len())
            .sum::<usize>();
    // A profile is measured once (its weight memo travels with it while it is unchanged): it
    // can be the biggest part of a state and is read far more often than it changes.
    let profile = match (&state.profile, state.profile_weight) {
        (None, _) => 0,
        (Some(_), Some(w)) => w,
        (Some(p), None) => profile_weight(p),
    };
    USER_COST + 2 * prefix_len + sessions + history + profile
}

fn profile_weight(p: &crate::engine::Profile) -> usize {
    p.iter()
        .map(|(k, v)| ENTRY_COST + k.len() + value_weight(v))
        .sum()
}

fn value_weight(v: &Value) -> usize {
    VALUE_COST
        + match v {
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(value_weight).sum(),
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| ENTRY_COST + k.len() + value_weight(v))
                .sum(),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Session;
    use serde_json::json;

    fn state(context_bytes: usize) -> UserState {
        let context = json!({"pad": "x".repeat(context_bytes)});
        UserState {
            sessions: vec![Session {
                journey_id: "j".into(),
                version: "v".into(),
                user_id: "u".into(),
                key: None,
                session_id: "s".into(),
                source_user_id: "u".into(),
                step: "w".into(),
                entered_at: 0,
                context: context.as_object().unwrap().clone(),
                converted: vec![],
                timer: None,
                progress: 0,
                holdout: false,
            }],
            history: Default::default(),
            profile: None,
            profile_weight: None,
        }
    }

    #[test]
    fn a_profile_is_weighed_once_and_again_when_it_changes() {
        let mut c = Cache::new(10, 1 << 20);
        let mut s = state(10);
        s.profile = Some(
            json!({"plan": "x".repeat(1000)})
                .as_object()
                .unwrap()
                .clone(),
        );
        let before = weight(8, &state(10));
        c.insert(b"user0001".to_vec(), s);
        let cached = c.remove(b"user0001").unwrap();
        let w = cached.profile_weight.expect("measured on insert");
        assert!(w >= 1000, "{w}");
        assert_eq!(weight(8, &cached), before + w);
        // A memo is trusted while it is set; whoever changes the profile clears it.
        let mut changed = cached.clone();
        changed.profile = Some(json!({"plan": "pro"}).as_object().unwrap().clone());
        changed.profile_weight = None;
        assert!(weight(8, &changed) < before + 200);
        c.insert(b"user0001".to_vec(), changed);
        c.update(b"user0001", |s| {
            s.profile = None;
            s.profile_weight = None;
        });
        assert_eq!(c.bytes(), before);
    }

    #[test]
    fn the_weight_counts_context_bytes() {
        let small = weight(8, &state(10));
        let big = weight(8, &state(100_010));
        assert_eq!(big - small, 100_000);
    }

    #[test]
    fn bounded_by_bytes_cleared_whole_when_full() {
        let one = weight(2, &state(1_000));
        let mut c = Cache::new(1_000, one * 3);
        for u in 0..3u8 {
            c.insert(vec![b'u', u], state(1_000));
        }
        assert_eq!((c.len(), c.bytes()), (3, one * 3));
        // A fourth would exceed the bound: the cache starts again with it alone.
        c.insert(b"u9".to_vec(), state(1_000));
        assert_eq!((c.len(), c.bytes()), (1, one));
        // A state bigger than the whole bound is never cached.
        c.insert(b"uX".to_vec(), state(one * 4));
        assert!(c.get(b"uX").is_none());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn bounded_by_users() {
        let mut c = Cache::new(2, usize::MAX);
        c.insert(b"a".to_vec(), state(1));
        c.insert(b"b".to_vec(), state(1));
        c.insert(b"a".to_vec(), state(5));
        assert_eq!(c.len(), 2, "replacing an entry does not count twice");
        c.insert(b"c".to_vec(), state(1));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn updates_and_removals_keep_the_count() {
        let mut c = Cache::new(10, usize::MAX);
        c.insert(b"a".to_vec(), state(10));
        c.insert(b"b".to_vec(), state(10));
        let before = c.bytes();
        c.update(b"a", |s| {
            s.sessions[0]
                .context
                .insert("more".into(), json!("y".repeat(500)));
        });
        assert_eq!(c.bytes(), before + ENTRY_COST + 4 + VALUE_COST + 500);
        let a = c.remove(b"a").unwrap();
        assert_eq!(c.bytes(), weight(1, &state(10)));
        assert_eq!(a.sessions[0].context.len(), 2);
        c.remove(b"b");
        assert_eq!((c.len(), c.bytes()), (0, 0));
        // Off.
        let mut off = Cache::new(0, usize::MAX);
        off.insert(b"a".to_vec(), state(1));
        assert!(off.is_empty());
    }
}
