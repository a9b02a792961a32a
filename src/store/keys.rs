//! The store's key encoding: a user's keys share an 8-byte hash prefix (the bloom-filtered
//! prefix of the sessions table) followed by application and user, so a user's state is one prefix
//! scan; timer keys order by due time.

use super::TimerRef;
use crate::time::Millis;

pub(super) fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

pub(super) fn put_opt(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => buf.push(0),
        Some(s) => {
            buf.push(1);
            put_str(buf, s);
        }
    }
}

pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub(super) fn str(&mut self) -> Option<String> {
        let n = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    pub(super) fn opt(&mut self) -> Option<Option<String>> {
        match self.take(1)?[0] {
            0 => Some(None),
            _ => Some(Some(self.str()?)),
        }
    }
}

/// Order-preserving encoding of a signed time.
pub(super) fn due_bytes(due: Millis) -> [u8; 8] {
    ((due as u64) ^ (1 << 63)).to_be_bytes()
}

pub(super) fn due_from(b: &[u8]) -> Option<Millis> {
    Some((u64::from_be_bytes(b.try_into().ok()?) ^ (1 << 63)) as i64)
}

/// The 8-byte prefix shared by all of a user's sessions (the store's bloom-filtered prefix).
pub fn user_hash(application: &str, user: &str) -> [u8; 8] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(application.as_bytes());
    h.update(&[0]);
    h.update(user.as_bytes());
    h.digest().to_be_bytes()
}

/// The key prefix of all of a user's sessions.
pub fn user_prefix(application: &str, user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + application.len() + user.len() + 16);
    k.extend_from_slice(&user_hash(application, user));
    put_str(&mut k, application);
    put_str(&mut k, user);
    k
}

pub fn session_key(application: &str, user: &str, journey: &str, key: Option<&str>) -> Vec<u8> {
    let mut k = user_prefix(application, user);
    put_str(&mut k, journey);
    put_opt(&mut k, key);
    k
}

/// The key of a user's history (entries and deliveries): the user prefix and an empty journey
/// id, which no session has (journey ids are non-empty).
pub fn history_key(application: &str, user: &str) -> Vec<u8> {
    session_key(application, user, "", None)
}

pub(super) fn is_history_key(prefix_len: usize, k: &[u8]) -> bool {
    k.len() == prefix_len + 5 && k[prefix_len..] == [0, 0, 0, 0, 0]
}

/// The key of a user's profile in [`Table::Profiles`]: the user prefix.
pub fn profile_key(application: &str, user: &str) -> Vec<u8> {
    user_prefix(application, user)
}

pub fn timer_key(
    due: Millis,
    application: &str,
    user: &str,
    journey: &str,
    key: Option<&str>,
) -> Vec<u8> {
    let mut k = Vec::with_capacity(48 + user.len() + journey.len());
    k.extend_from_slice(&due_bytes(due));
    put_str(&mut k, application);
    put_str(&mut k, user);
    put_str(&mut k, journey);
    put_opt(&mut k, key);
    k
}

pub fn decode_timer_key(k: &[u8]) -> Option<TimerRef> {
    let due = due_from(k.get(..8)?)?;
    let mut r = Reader(&k[8..]);
    Some(TimerRef {
        due,
        application: r.str()?,
        user_id: r.str()?,
        journey_id: r.str()?,
        key: r.opt()?,
    })
}

/// The application and user of a per-user record (history or profile) whose key `is_kind`
/// recognises after its user prefix.
pub(super) fn user_record(k: &[u8], is_kind: fn(usize, &[u8]) -> bool) -> Option<(String, String)> {
    let mut r = Reader(k.get(8..)?);
    let (app, user) = (r.str()?, r.str()?);
    let prefix_len = k.len() - r.0.len();
    is_kind(prefix_len, k).then_some((app, user))
}
