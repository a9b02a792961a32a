//! Input events (contract section 1): decoding, validation and normalisation.
//!
//! Decoding is two-staged for speed. [`RawEvent`] borrows from the input bytes and validates every
//! rule of the contract (required fields, their types, `attributes` being an object) without
//! building the attribute map; the caller asks [`RawEvent::application`] and [`RawEvent::name`]
//! whether any journey cares, and only then calls [`RawEvent::into_event`].

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::time::{parse_rfc3339, Millis};

/// Event attributes: a JSON object.
pub type Attributes = Map<String, Value>;

/// A validated, normalised input event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub application: String,
    /// The event name (`event` in the input).
    pub name: String,
    /// `userId` normalised to a string: `123` and `"123"` are the same user.
    pub user_id: String,
    pub attributes: Attributes,
    /// Event time: `timestamp`, or the record timestamp the caller supplied when absent.
    pub time: Millis,
    /// `eventId`, or the caller's default (`topic/partition/offset`).
    pub event_id: String,
}

/// Why an input value is not an event. The variant is the dead-letter reason label; the text says
/// what is wrong in terms a producer can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not UTF-8: {0}")]
    NotUtf8(String),
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("missing field: {0}")]
    MissingField(String),
    #[error("wrong type: {0}")]
    WrongType(String),
    #[error("oversize: {0} bytes, the limit is {1}")]
    Oversize(usize, usize),
    #[error("no event time: the event has no timestamp and the record carries none")]
    NoTime,
    /// The attribute a journey's `who` names holds no usable user ids.
    #[error("bad target list: {0}")]
    BadTargets(String),
    /// What the input caused is too large to publish (an output, routed or changelog record).
    #[error("outputs too large: {0}")]
    OutputTooLarge(String),
    /// The event time is further ahead of the clock than `processing.max_future_ms`.
    #[error("timestamp in the future: {0}")]
    InFuture(String),
}

impl EventError {
    /// The metric label of this kind of bad input.
    pub fn reason(&self) -> &'static str {
        match self {
            EventError::NotUtf8(_) => "not_utf8",
            EventError::NotJson(_) => "not_json",
            EventError::MissingField(_) => "missing_field",
            EventError::WrongType(_) => "wrong_type",
            EventError::Oversize(..) => "oversize",
            EventError::NoTime => "missing_field",
            EventError::BadTargets(_) => "bad_targets",
            EventError::InFuture(_) => "timestamp_in_future",
            EventError::OutputTooLarge(_) => "output_too_large",
        }
    }
}

/// An event as read, borrowing from the input; every contract rule already checked.
#[derive(Debug, Deserialize)]
pub struct RawEvent<'a> {
    #[serde(borrow)]
    application: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(rename = "userId")]
    user_id: UserId<'a>,
    #[serde(default, borrow)]
    attributes: Option<&'a RawValue>,
    #[serde(default)]
    timestamp: Option<Timestamp>,
    #[serde(default, rename = "eventId", borrow)]
    event_id: Option<Cow<'a, str>>,
}

impl<'a> RawEvent<'a> {
    /// Decodes and validates one input value. `max_bytes` bounds the value's size (0: no bound).
    pub fn decode(bytes: &'a [u8], max_bytes: usize) -> Result<RawEvent<'a>, EventError> {
        if max_bytes > 0 && bytes.len() > max_bytes {
            return Err(EventError::Oversize(bytes.len(), max_bytes));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| EventError::NotUtf8(e.to_string()))?;
        Self::decode_str(text)
    }

    /// Decodes and validates one input value given as text.
    pub fn decode_str(text: &'a str) -> Result<RawEvent<'a>, EventError> {
        let raw: RawEvent<'a> = serde_json::from_str(text).map_err(classify)?;
        if let Some(attrs) = raw.attributes {
            if !attrs.get().trim_start().starts_with('{') {
                return Err(EventError::WrongType(
                    "attributes must be an object".to_string(),
                ));
            }
        }
        if raw.user_id.as_str().is_empty() {
            return Err(EventError::WrongType(
                "userId must not be empty".to_string(),
            ));
        }
        Ok(raw)
    }

    pub fn application(&self) -> &str {
        &self.application
    }

    pub fn name(&self) -> &str {
        &self.event
    }

    pub fn user_id(&self) -> &str {
        self.user_id.as_str()
    }

    /// The event's own time, if it carries one.
    pub fn timestamp(&self) -> Option<Millis> {
        self.timestamp.map(|t| t.0)
    }

    /// Whether the event carries an `eventId`.
    pub fn has_event_id(&self) -> bool {
        self.event_id.is_some()
    }

    /// Builds the owned event. `record_time` is the Kafka record timestamp (or replay's stand-in),
    /// used when the event has no `timestamp`; `default_id` is called only when it has no `eventId`.
    pub fn into_event(
        self,
        record_time: Option<Millis>,
        default_id: impl FnOnce() -> String,
    ) -> Result<Event, EventError> {
        let time = match self.timestamp {
            Some(t) => t.0,
            None => record_time.ok_or(EventError::NoTime)?,
        };
        let attributes = match self.attributes {
            Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
                Ok(Value::Object(map)) => map,
                Ok(_) => return Err(EventError::WrongType("attributes must be an object".into())),
                Err(e) => return Err(EventError::NotJson(e.to_string())),
            },
            None => Map::new(),
        };
        Ok(Event {
            application: self.application.into_owned(),
            name: self.event.into_owned(),
            user_id: self.user_id.into_string(),
            attributes,
            time,
            event_id: match self.event_id {
                Some(id) => id.into_owned(),
                None => default_id(),
            },
        })
    }
}

impl Event {
    /// Parses a complete event (tests and tools); `record_time` and `default_id` as in
    /// [`RawEvent::into_event`].
    pub fn parse(
        text: &str,
        record_time: Option<Millis>,
        default_id: impl FnOnce() -> String,
    ) -> Result<Event, EventError> {
        RawEvent::decode_str(text)?.into_event(record_time, default_id)
    }
}

pub(crate) fn classify(e: serde_json::Error) -> EventError {
    use serde_json::error::Category;
    let msg = e.to_string();
    match e.classify() {
        Category::Data => {
            if msg.starts_with("missing field") {
                EventError::MissingField(msg)
            } else {
                EventError::WrongType(msg)
            }
        }
        _ => EventError::NotJson(msg),
    }
}

/// `userId`: a string or an integer, normalised to its decimal text.
#[derive(Debug)]
pub(crate) enum UserId<'a> {
    Borrowed(&'a str),
    Owned(String),
}

impl UserId<'_> {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            UserId::Borrowed(s) => s,
            UserId::Owned(s) => s,
        }
    }
    pub(crate) fn into_string(self) -> String {
        match self {
            UserId::Borrowed(s) => s.to_string(),
            UserId::Owned(s) => s,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for UserId<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UserId<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("userId as a string or an integer")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(UserId::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(UserId::Owned(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(UserId::Owned(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(UserId::Owned(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(UserId::Owned(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The earliest and latest event times accepted: 0001-01-01T00:00:00.000Z and
/// 9999-12-31T23:59:59.999Z, so every time prints as RFC 3339.
pub const MIN_TIME: Millis = -62_135_596_800_000;
pub const MAX_TIME: Millis = 253_402_300_799_999;

/// `timestamp`: RFC 3339 text or integer epoch milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timestamp(pub(crate) Millis);

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("timestamp as RFC 3339 text or integer epoch milliseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_rfc3339(v)
                    .map(Timestamp)
                    .ok_or_else(|| E::custom(format!("timestamp {v:?} is not RFC 3339")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                if (MIN_TIME..=MAX_TIME).contains(&v) {
                    Ok(Timestamp(v))
                } else {
                    Err(E::custom(format!(
                        "timestamp {v} is out of range (epoch milliseconds of years 0001 to 9999)"
                    )))
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                match i64::try_from(v) {
                    Ok(v) => self.visit_i64(v),
                    Err(_) => Err(E::custom(format!(
                        "timestamp {v} is out of range (epoch milliseconds of years 0001 to 9999)"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Normalises a user id or session identifier value: a string as it is, an integer as its decimal
/// text. Anything else (bool, fraction, null, array, object) and the empty string give `None`.
pub fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Event, EventError> {
        Event::parse(s, Some(7), || "t/0/1".to_string())
    }

    #[test]
    fn seed_payload_normalises() {
        let e = parse(r#"{ "application": "XXXXX-XXXXX", "event": "invitation", "attributes": { "targetId": 321 }, "userId": 123}"#).unwrap();
        assert_eq!(e.user_id, "123");
        assert_eq!(e.name, "invitation");
        assert_eq!(e.attributes["targetId"], 321);
        assert_eq!(e.time, 7, "record time used when timestamp is absent");
        assert_eq!(
            e.event_id, "t/0/1",
            "default id used when eventId is absent"
        );
    }

    #[test]
    fn string_and_integer_user_ids_are_the_same() {
        let a = parse(r#"{"application":"a","event":"e","userId":123}"#).unwrap();
        let b = parse(r#"{"application":"a","event":"e","userId":"123"}"#).unwrap();
        assert_eq!(a.user_id, b.user_id);
    }

    #[test]
    fn timestamps_rfc3339_and_epoch_millis() {
        let a = parse(r#"{"application":"a","event":"e","userId":1,"timestamp":"2026-11-28T10:00:00Z","eventId":"x"}"#).unwrap();
        let b = parse(r#"{"application":"a","event":"e","userId":1,"timestamp":1795860000000}"#)
            .unwrap();
        assert_eq!(a.time, 1_795_860_000_000);
        assert_eq!(a.time, b.time);
        assert_eq!(a.event_id, "x");
    }

    #[test]
    fn epoch_millis_outside_years_1_to_9999_are_refused() {
        for t in [
            "253402300800000",
            "-62135596800001",
            "9007199254740993000",
            "18446744073709551615",
        ] {
            let text = format!(r#"{{"application":"a","event":"e","userId":1,"timestamp":{t}}}"#);
            let e = parse(&text).unwrap_err();
            assert_eq!(e.reason(), "wrong_type", "{t}: {e}");
            assert!(e.to_string().contains("out of range"), "{e}");
        }
        let max =
            parse(r#"{"application":"a","event":"e","userId":1,"timestamp":253402300799999}"#)
                .unwrap();
        assert_eq!(
            crate::time::format_millis(max.time),
            "9999-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn bad_inputs_are_classified() {
        let cases = [
            ("not json", "not_json"),
            (r#"{"application":"a","event":"e"}"#, "missing_field"),
            (r#"{"event":"e","userId":1}"#, "missing_field"),
            (r#"{"application":"a","userId":1}"#, "missing_field"),
            (r#"{"application":1,"event":"e","userId":1}"#, "wrong_type"),
            (
                r#"{"application":"a","event":"e","userId":1.5}"#,
                "wrong_type",
            ),
            (
                r#"{"application":"a","event":"e","userId":true}"#,
                "wrong_type",
            ),
            (
                r#"{"application":"a","event":"e","userId":""}"#,
                "wrong_type",
            ),
            (
                r#"{"application":"a","event":"e","userId":1,"attributes":[1]}"#,
                "wrong_type",
            ),
            (
                r#"{"application":"a","event":"e","userId":1,"timestamp":"noon"}"#,
                "wrong_type",
            ),
            (
                r#"{"application":"a","event":"e","userId":1,"timestamp":1.5}"#,
                "wrong_type",
            ),
            (
                r#"{"application":"a","event":"e","userId":1,"eventId":5}"#,
                "wrong_type",
            ),
            ("[1,2]", "wrong_type"),
        ];
        for (text, reason) in cases {
            let err = parse(text).expect_err(text);
            assert_eq!(err.reason(), reason, "{text}: {err}");
        }
        assert_eq!(
            RawEvent::decode(&[0xff, 0xfe], 0).unwrap_err().reason(),
            "not_utf8"
        );
        assert_eq!(RawEvent::decode(b"{}", 1).unwrap_err().reason(), "oversize");
    }

    #[test]
    fn null_optional_fields_count_as_absent() {
        let e = parse(r#"{"application":"a","event":"e","userId":1,"attributes":null,"timestamp":null,"eventId":null}"#).unwrap();
        assert!(e.attributes.is_empty());
        assert_eq!(e.time, 7);
        assert_eq!(e.event_id, "t/0/1");
    }

    #[test]
    fn escaped_strings_decode() {
        let e = parse(r#"{"application":"a\u0041","event":"e\"q","userId":"u\n1"}"#).unwrap();
        assert_eq!(e.application, "aA");
        assert_eq!(e.name, "e\"q");
        assert_eq!(e.user_id, "u\n1");
    }

    #[test]
    fn no_time_anywhere_is_an_error() {
        let err = Event::parse(
            r#"{"application":"a","event":"e","userId":1}"#,
            None,
            String::new,
        )
        .unwrap_err();
        assert_eq!(err, EventError::NoTime);
    }

    #[test]
    fn id_text_rules() {
        assert_eq!(id_text(&serde_json::json!(1001)).as_deref(), Some("1001"));
        assert_eq!(id_text(&serde_json::json!("1001")).as_deref(), Some("1001"));
        assert_eq!(id_text(&serde_json::json!(10.5)), None);
        assert_eq!(id_text(&serde_json::json!(true)), None);
        assert_eq!(id_text(&serde_json::json!(null)), None);
        assert_eq!(id_text(&serde_json::json!("")), None);
    }
}
