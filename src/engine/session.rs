//! Sessions and the in-memory view of one user's sessions that the engine works on.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::time::Millis;

/// One active session of a user in a journey.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub journey_id: String,
    /// The journey version the session entered with; it continues on that version.
    #[serde(default)]
    pub version: String,
    pub user_id: String,
    /// The session identifier's value in `multiple` mode; `None` in `single` mode.
    pub key: Option<String>,
    pub session_id: String,
    pub source_user_id: String,
    /// The step the session is at.
    pub step: String,
    pub entered_at: Millis,
    /// The entry event's attributes, overwritten by attributes of matched wait events.
    pub context: Map<String, Value>,
    /// Goals already converted.
    #[serde(default)]
    pub converted: Vec<String>,
    /// When the step's timer (wait timeout, delay, or a quiet-hours release) is due.
    #[serde(default)]
    pub timer: Option<Millis>,
    /// Branched waits: which branch events have matched at this step (see
    /// [`crate::journey::progress_bit`]); forgotten when the session leaves the step.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub progress: u32,
    /// The user is in the journey's holdout: every record of the session says so.
    #[serde(default, skip_serializing_if = "is_false")]
    pub holdout: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a user's state holds besides sessions, per application (contract 5.1 and 5.5): past
/// entries of journeys with re-entry rules, and delivered actions that frequency caps count.
/// Pruned as soon as an item can no longer change a decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// By journey id, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub journeys: Vec<JourneyHistory>,
    /// Delivered actions of capped names, in processing order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deliveries: Vec<Delivery>,
}

impl History {
    pub fn is_empty(&self) -> bool {
        self.journeys.is_empty() && self.deliveries.is_empty()
    }

    pub fn journey(&self, id: &str) -> Option<&JourneyHistory> {
        self.journeys
            .binary_search_by(|j| j.journey_id.as_str().cmp(id))
            .ok()
            .map(|i| &self.journeys[i])
    }

    /// The journey's history, created empty if need be.
    pub fn journey_mut(&mut self, id: &str) -> &mut JourneyHistory {
        let i = match self
            .journeys
            .binary_search_by(|j| j.journey_id.as_str().cmp(id))
        {
            Ok(i) => i,
            Err(i) => {
                self.journeys.insert(
                    i,
                    JourneyHistory {
                        journey_id: id.to_string(),
                        entries: 0,
                        keys: Vec::new(),
                    },
                );
                i
            }
        };
        &mut self.journeys[i]
    }

    pub fn forget_journey(&mut self, id: &str) -> bool {
        match self
            .journeys
            .binary_search_by(|j| j.journey_id.as_str().cmp(id))
        {
            Ok(i) => {
                self.journeys.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// One journey's entries by a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JourneyHistory {
    pub journey_id: String,
    /// Entries in all (for `max_entries`).
    pub entries: u64,
    /// The last entry time per entry key (`None`: the user, in `single` mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyEntry>,
}

impl JourneyHistory {
    pub fn last_entry(&self, key: Option<&str>) -> Option<Millis> {
        self.keys
            .iter()
            .find(|k| k.key.as_deref() == key)
            .map(|k| k.last)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub key: Option<String>,
    pub last: Millis,
}

/// A delivered action, counted by frequency caps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub action: String,
    pub at: Millis,
}

/// A user's profile in one application: attributes that `profile.` conditions read.
pub type Profile = Map<String, Value>;

/// A user's state in one application: sessions, history and profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserState {
    pub sessions: Vec<Session>,
    pub history: History,
    pub profile: Option<Profile>,
    /// The profile's estimated size in memory, measured once by the state's cache and carried
    /// while the profile is unchanged (`None`: not measured yet). Not part of the state.
    pub profile_weight: Option<usize>,
}

/// What identifies a session in the store: (journey, session key) under a user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionRef {
    pub journey_id: String,
    pub key: Option<String>,
}

impl Session {
    pub fn reference(&self) -> SessionRef {
        SessionRef {
            journey_id: self.journey_id.clone(),
            key: self.key.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Clean,
    Dirty,
    New,
    Removed,
}

#[derive(Debug, Clone)]
struct Slot {
    session: Session,
    /// The timer stored for this session before the input, to be replaced.
    stored_timer: Option<Millis>,
    /// Whether the session exists in the store.
    stored: bool,
    state: SlotState,
}

/// A store change the caller must write for the input just processed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Write the session; `old_timer` is the timer index entry to drop (if any and if it differs
    /// from the session's new timer).
    Put {
        session: Session,
        old_timer: Option<Millis>,
    },
    /// Delete the session and its timer index entry.
    Delete {
        session: Session,
        old_timer: Option<Millis>,
    },
    /// Write the user's history (delete it when empty).
    History { user_id: String, history: History },
    /// Write the user's profile (delete it when `None`).
    Profile {
        user_id: String,
        profile: Option<Profile>,
    },
}

/// A store change, borrowed from the sessions it describes (see [`UserSessions::finish`]).
#[derive(Debug, Clone, Copy)]
pub enum ChangeRef<'a> {
    Put {
        session: &'a Session,
        old_timer: Option<Millis>,
    },
    Delete {
        session: &'a Session,
        old_timer: Option<Millis>,
    },
    /// The user's history, for the user's key prefix (deleted when empty).
    History {
        user_id: &'a str,
        history: &'a History,
    },
    /// The user's profile (deleted when `None`).
    Profile {
        user_id: &'a str,
        profile: Option<&'a Profile>,
    },
}

impl<'a> From<&'a Change> for ChangeRef<'a> {
    fn from(c: &'a Change) -> ChangeRef<'a> {
        match c {
            Change::Put { session, old_timer } => ChangeRef::Put {
                session,
                old_timer: *old_timer,
            },
            Change::Delete { session, old_timer } => ChangeRef::Delete {
                session,
                old_timer: *old_timer,
            },
            Change::History { user_id, history } => ChangeRef::History { user_id, history },
            Change::Profile { user_id, profile } => ChangeRef::Profile {
                user_id,
                profile: profile.as_ref(),
            },
        }
    }
}

/// One user's sessions in one application, as loaded from the store, with change tracking.
///
/// Sessions keep the order they were loaded in (the caller sorts them by journey id, then entry
/// time, then key); new sessions are appended. Indexes stay valid: a removed session keeps its
/// slot until [`UserSessions::changes`].
#[derive(Debug, Clone, Default)]
pub struct UserSessions {
    slots: Vec<Slot>,
    /// The user whose state this is (for history changes); empty when unknown.
    user_id: String,
    history: History,
    history_dirty: bool,
    profile: Option<Profile>,
    profile_dirty: bool,
    profile_weight: Option<usize>,
}

impl UserSessions {
    /// A user's state as loaded: sessions and history.
    pub fn load(user_id: &str, state: UserState) -> UserSessions {
        let mut us = UserSessions::new(state.sessions);
        us.user_id = user_id.to_string();
        us.history = state.history;
        us.profile = state.profile;
        us.profile_weight = state.profile_weight;
        us
    }

    /// The user's profile, if one is stored.
    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_ref()
    }

    /// Replaces the profile (`None` removes it), marked changed.
    pub fn set_profile(&mut self, profile: Option<Profile>) {
        self.profile = profile;
        self.profile_dirty = true;
        self.profile_weight = None;
    }

    /// The profile, taken out (to merge into); put it back with [`UserSessions::set_profile`]
    /// when it changed, [`UserSessions::return_profile`] when not.
    pub fn take_profile(&mut self) -> Option<Profile> {
        self.profile.take()
    }

    /// Puts back a profile taken out unchanged.
    pub fn return_profile(&mut self, profile: Option<Profile>) {
        self.profile = profile;
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// The history, marked changed.
    pub fn history_mut(&mut self) -> &mut History {
        self.history_dirty = true;
        &mut self.history
    }

    pub fn new(mut sessions: Vec<Session>) -> UserSessions {
        sessions.sort_by(|a, b| {
            (&a.journey_id, a.entered_at, &a.key).cmp(&(&b.journey_id, b.entered_at, &b.key))
        });
        UserSessions {
            slots: sessions
                .into_iter()
                .map(|s| Slot {
                    stored_timer: s.timer,
                    stored: true,
                    session: s,
                    state: SlotState::Clean,
                })
                .collect(),
            ..UserSessions::default()
        }
    }

    /// Number of slots, removed ones included.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn is_active(&self, ix: usize) -> bool {
        self.slots[ix].state != SlotState::Removed
    }

    pub fn session(&self, ix: usize) -> &Session {
        &self.slots[ix].session
    }

    pub fn session_mut(&mut self, ix: usize) -> &mut Session {
        let slot = &mut self.slots[ix];
        if slot.state == SlotState::Clean {
            slot.state = SlotState::Dirty;
        }
        &mut slot.session
    }

    pub fn insert(&mut self, session: Session) -> usize {
        self.slots.push(Slot {
            session,
            stored_timer: None,
            stored: false,
            state: SlotState::New,
        });
        self.slots.len() - 1
    }

    pub fn remove(&mut self, ix: usize) {
        let slot = &mut self.slots[ix];
        slot.state = SlotState::Removed;
        slot.session.timer = None;
    }

    /// Active sessions, in order.
    pub fn active(&self) -> impl Iterator<Item = &Session> {
        self.slots
            .iter()
            .filter(|s| s.state != SlotState::Removed)
            .map(|s| &s.session)
    }

    /// Index of the active session of `journey` with `key`.
    pub fn find(&self, journey: &str, key: Option<&str>) -> Option<usize> {
        self.slots.iter().position(|s| {
            s.state != SlotState::Removed
                && s.session.journey_id == journey
                && s.session.key.as_deref() == key
        })
    }

    /// Hands every store change to `stage` without copying a session, and returns the active
    /// sessions.
    pub fn finish(self, mut stage: impl FnMut(ChangeRef<'_>)) -> UserState {
        if self.history_dirty {
            stage(ChangeRef::History {
                user_id: &self.user_id,
                history: &self.history,
            });
        }
        if self.profile_dirty {
            stage(ChangeRef::Profile {
                user_id: &self.user_id,
                profile: self.profile.as_ref(),
            });
        }
        let mut kept = Vec::with_capacity(self.slots.len());
        for slot in self.slots {
            match slot.state {
                SlotState::Clean => kept.push(slot.session),
                SlotState::Dirty | SlotState::New => {
                    stage(ChangeRef::Put {
                        session: &slot.session,
                        old_timer: slot.stored_timer,
                    });
                    kept.push(slot.session);
                }
                SlotState::Removed => {
                    if slot.stored {
                        stage(ChangeRef::Delete {
                            session: &slot.session,
                            old_timer: slot.stored_timer,
                        });
                    }
                }
            }
        }
        UserState {
            sessions: kept,
            history: self.history,
            profile: self.profile,
            profile_weight: self.profile_weight,
        }
    }

    /// The active sessions, consuming the view; call after [`UserSessions::changes`].
    pub fn into_active(self) -> Vec<Session> {
        self.slots
            .into_iter()
            .filter(|s| s.state != SlotState::Removed)
            .map(|s| s.session)
            .collect()
    }

    /// The store changes since loading (or since the last call), and marks everything clean.
    pub fn changes(&mut self) -> Vec<Change> {
        let mut out = Vec::new();
        if std::mem::take(&mut self.history_dirty) {
            out.push(Change::History {
                user_id: self.user_id.clone(),
                history: self.history.clone(),
            });
        }
        if std::mem::take(&mut self.profile_dirty) {
            out.push(Change::Profile {
                user_id: self.user_id.clone(),
                profile: self.profile.clone(),
            });
        }
        let mut kept = Vec::with_capacity(self.slots.len());
        for mut slot in self.slots.drain(..) {
            match slot.state {
                SlotState::Clean => kept.push(slot),
                SlotState::Dirty | SlotState::New => {
                    let old_timer = slot.stored_timer;
                    out.push(Change::Put {
                        session: slot.session.clone(),
                        old_timer,
                    });
                    slot.stored_timer = slot.session.timer;
                    slot.stored = true;
                    slot.state = SlotState::Clean;
                    kept.push(slot);
                }
                SlotState::Removed => {
                    if slot.stored {
                        out.push(Change::Delete {
                            session: slot.session,
                            old_timer: slot.stored_timer,
                        });
                    }
                }
            }
        }
        self.slots = kept;
        out
    }
}
