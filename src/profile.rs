//! User profiles (issue 11): the records of a profile topic, decoded and checked, and the merge
//! rule. Pure: no store, no Kafka. The profile store, `profile.` conditions, erasure in the engine
//! and the profile topics of `waymark run` build on this.
//!
//! A profile record's value (its key is the user id as text):
//! - an update, `{"application": A, "userId": U, "attributes": {...}, "timestamp": T}`, merges
//!   into the stored profile: each attribute present replaces the stored one, an attribute set to
//!   `null` removes it (`timestamp` optional, as in events);
//! - an erasure, `{"application": A, "userId": U, "erase": true}`, removes everything waymark
//!   keeps about that user of that application.
//!
//! Other fields are ignored (a `replay` file marks its profile lines with `"type": "profile"`).
//! A record that is neither is refused with an [`EventError`], whose `reason()` is the
//! dead-letter label, as for events.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::event::{classify, EventError, Timestamp, UserId};
use crate::time::Millis;

/// The default bound on a stored profile: its attributes as JSON, in bytes. An update whose merge
/// would pass it is refused whole (`oversize`), so a profile cannot grow without bound.
pub const DEFAULT_MAX_PROFILE_BYTES: usize = 64 * 1024;

/// What a profile record asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileRecord {
    Update {
        application: String,
        user_id: String,
        /// The attributes to merge; `null` values remove.
        attributes: Map<String, Value>,
        time: Option<Millis>,
    },
    Erase {
        application: String,
        user_id: String,
        time: Option<Millis>,
    },
}

impl ProfileRecord {
    pub fn application(&self) -> &str {
        match self {
            ProfileRecord::Update { application, .. }
            | ProfileRecord::Erase { application, .. } => application,
        }
    }

    /// The record's `timestamp`, if it has one.
    pub fn time(&self) -> Option<Millis> {
        match self {
            ProfileRecord::Update { time, .. } | ProfileRecord::Erase { time, .. } => *time,
        }
    }

    pub fn user_id(&self) -> &str {
        match self {
            ProfileRecord::Update { user_id, .. } | ProfileRecord::Erase { user_id, .. } => user_id,
        }
    }
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow)]
    application: Cow<'a, str>,
    #[serde(rename = "userId", borrow)]
    user_id: UserId<'a>,
    #[serde(default, borrow)]
    attributes: Option<&'a RawValue>,
    #[serde(default)]
    erase: Option<bool>,
    #[serde(default)]
    timestamp: Option<Timestamp>,
}

/// Decodes one profile record's value. `max_bytes` bounds the value's size (0: no bound).
pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<ProfileRecord, EventError> {
    if max_bytes > 0 && bytes.len() > max_bytes {
        return Err(EventError::Oversize(bytes.len(), max_bytes));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| EventError::NotUtf8(e.to_string()))?;
    let raw: Raw<'_> = serde_json::from_str(text).map_err(classify)?;
    if raw.user_id.as_str().is_empty() {
        return Err(EventError::WrongType("userId must not be empty".into()));
    }
    match (raw.erase, raw.attributes) {
        (Some(true), None) => Ok(ProfileRecord::Erase {
            application: raw.application.into_owned(),
            user_id: raw.user_id.into_string(),
            time: raw.timestamp.map(|t| t.0),
        }),
        (Some(true), Some(_)) => Err(EventError::WrongType(
            "an erasure (erase: true) carries no attributes".into(),
        )),
        (Some(false), _) => Err(EventError::WrongType(
            "erase is either true or absent".into(),
        )),
        (None, None) => Err(EventError::MissingField(
            "missing field `attributes` (or `erase: true`)".into(),
        )),
        (None, Some(attrs)) => {
            let attributes = match serde_json::from_str::<Value>(attrs.get()) {
                Ok(Value::Object(map)) => map,
                Ok(_) => return Err(EventError::WrongType("attributes must be an object".into())),
                Err(e) => return Err(EventError::NotJson(e.to_string())),
            };
            Ok(ProfileRecord::Update {
                application: raw.application.into_owned(),
                user_id: raw.user_id.into_string(),
                attributes,
                time: raw.timestamp.map(|t| t.0),
            })
        }
    }
}

/// Merges `update` into `stored`: each attribute present replaces the stored one, `null` removes
/// it. Refused whole (`oversize`) when the result as JSON would pass `max_bytes` (0: no bound);
/// `None` when nothing is left (the stored profile is then removed).
pub fn merge(
    stored: Option<Map<String, Value>>,
    update: &Map<String, Value>,
    max_bytes: usize,
) -> Result<Option<Map<String, Value>>, EventError> {
    merge_in_place(stored, update, max_bytes).map_err(|(_, e)| e)
}

/// [`merge`] without copying the stored profile: a refused update hands it back unchanged.
#[allow(clippy::type_complexity)]
pub fn merge_in_place(
    stored: Option<Map<String, Value>>,
    update: &Map<String, Value>,
    max_bytes: usize,
) -> Result<Option<Map<String, Value>>, (Option<Map<String, Value>>, EventError)> {
    let was_stored = stored.is_some();
    let mut profile = stored.unwrap_or_default();
    // What the update replaced, to undo a refused merge.
    let mut undo: Vec<(&String, Option<Value>)> = Vec::with_capacity(update.len());
    for (k, v) in update {
        let old = if v.is_null() {
            profile.remove(k)
        } else {
            profile.insert(k.clone(), v.clone())
        };
        undo.push((k, old));
    }
    if max_bytes > 0 {
        let size = serde_json::to_vec(&profile).map(|v| v.len()).unwrap_or(0);
        if size > max_bytes {
            for (k, old) in undo.into_iter().rev() {
                match old {
                    Some(v) => profile.insert(k.clone(), v),
                    None => profile.remove(k),
                };
            }
            let back = (was_stored || !profile.is_empty()).then_some(profile);
            return Err((back, EventError::Oversize(size, max_bytes)));
        }
    }
    Ok((!profile.is_empty()).then_some(profile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn an_update_and_an_erasure_decode() {
        let u = decode(
            br#"{"type": "profile", "application": "a", "userId": 7, "attributes": {"plan": "pro"}, "timestamp": "2026-12-01T00:00:00Z"}"#,
            0,
        )
        .unwrap();
        assert_eq!(
            u,
            ProfileRecord::Update {
                application: "a".into(),
                user_id: "7".into(),
                attributes: obj(json!({"plan": "pro"})),
                time: crate::time::parse_rfc3339("2026-12-01T00:00:00Z"),
            }
        );
        let e = decode(br#"{"application": "a", "userId": "u", "erase": true}"#, 0).unwrap();
        assert_eq!(
            e,
            ProfileRecord::Erase {
                application: "a".into(),
                user_id: "u".into(),
                time: None,
            }
        );
        assert_eq!((e.application(), e.user_id()), ("a", "u"));
    }

    #[test]
    fn bad_records_are_refused_with_a_dead_letter_reason() {
        let cases: [(&[u8], &str); 9] = [
            (b"not json", "not_json"),
            (b"\xff", "not_utf8"),
            (br#"{"userId": "u", "attributes": {}}"#, "missing_field"),
            (
                br#"{"application": "a", "attributes": {}}"#,
                "missing_field",
            ),
            (br#"{"application": "a", "userId": "u"}"#, "missing_field"),
            (
                br#"{"application": "a", "userId": "", "attributes": {}}"#,
                "wrong_type",
            ),
            (
                br#"{"application": "a", "userId": "u", "attributes": [1]}"#,
                "wrong_type",
            ),
            (
                br#"{"application": "a", "userId": "u", "erase": true, "attributes": {}}"#,
                "wrong_type",
            ),
            (
                br#"{"application": "a", "userId": "u", "erase": false}"#,
                "wrong_type",
            ),
        ];
        for (bytes, reason) in cases {
            let e = decode(bytes, 0).unwrap_err();
            assert_eq!(
                e.reason(),
                reason,
                "{}: {e}",
                String::from_utf8_lossy(bytes)
            );
        }
        let big = format!(
            r#"{{"application": "a", "userId": "u", "attributes": {{"x": "{}"}}}}"#,
            "y".repeat(100)
        );
        assert_eq!(decode(big.as_bytes(), 50).unwrap_err().reason(), "oversize");
    }

    #[test]
    fn a_merge_replaces_present_attributes_and_removes_nulls() {
        let stored = obj(json!({"plan": "free", "city": "Oslo", "age": 30}));
        let merged = merge(
            Some(stored),
            &obj(json!({"plan": "pro", "city": null, "tz": "Europe/Oslo"})),
            0,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            Value::Object(merged),
            json!({"plan": "pro", "age": 30, "tz": "Europe/Oslo"})
        );
        assert_eq!(merge(None, &obj(json!({"x": null})), 0).unwrap(), None);
        assert_eq!(
            merge(Some(obj(json!({"x": 1}))), &obj(json!({"x": null})), 0).unwrap(),
            None,
            "nothing left: the profile goes"
        );
    }

    #[test]
    fn a_merge_past_the_bound_is_refused_whole() {
        let stored = obj(json!({"a": "x".repeat(40)}));
        let e = merge(Some(stored), &obj(json!({"b": "y".repeat(40)})), 64).unwrap_err();
        assert_eq!(e.reason(), "oversize");
        // Removing makes room again.
        let stored = obj(json!({"a": "x".repeat(40)}));
        assert!(merge(Some(stored), &obj(json!({"a": null, "b": "y"})), 64).is_ok());
    }
}
