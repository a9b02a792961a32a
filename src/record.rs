//! Output records (contract section 3). Each is a JSON value keyed by the user id; `type` names
//! the kind and the topic it goes to.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which output topic a record belongs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Entries,
    Steps,
    Conversions,
}

/// One output record. Times are RFC 3339 UTC with milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    JourneyEntry(EntryRecord),
    StepAdvance(MoveRecord),
    JourneyExit(MoveRecord),
    Conversion(ConversionRecord),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryRecord {
    pub journey_id: String,
    pub application: String,
    pub user_id: String,
    pub source_user_id: String,
    pub session_id: String,
    pub session_key: Option<String>,
    pub event: String,
    pub event_id: String,
    /// The step the session starts at.
    pub step: String,
    pub at: String,
    /// `true` for a session of a held-out user (contract 5.4); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<bool>,
}

/// A move between steps (`step_advance`) or the end of a session (`journey_exit`).
///
/// For an exit, `from` and `step` name the step the session ended at, `to` is null, and `reason`
/// is `completed`, `goal`, `timeout` or `archived`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub journey_id: String,
    pub application: String,
    pub user_id: String,
    pub session_id: String,
    pub session_key: Option<String>,
    pub from: String,
    pub to: Option<String>,
    /// Exits only: the step the session ended at (same as `from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub reason: String,
    pub event: Option<String>,
    pub event_id: Option<String>,
    pub action: Option<String>,
    pub params: Option<Value>,
    pub at: String,
    /// The wait branch taken (contract 5.3); absent for single-event waits and other moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The experiment variant taken (contract 5.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Why an action was not delivered: `holdout` or `frequency_cap` (contract 5.4, 5.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<String>,
    /// `true` for a session of a held-out user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversionRecord {
    pub journey_id: String,
    pub application: String,
    pub user_id: String,
    pub session_id: String,
    pub session_key: Option<String>,
    pub goal_id: String,
    pub event: String,
    pub event_id: String,
    pub at: String,
    /// `true` for a session of a held-out user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<bool>,
}

impl Record {
    pub fn stream(&self) -> Stream {
        match self {
            Record::JourneyEntry(_) => Stream::Entries,
            Record::StepAdvance(_) | Record::JourneyExit(_) => Stream::Steps,
            Record::Conversion(_) => Stream::Conversions,
        }
    }

    /// The Kafka key: the user id.
    pub fn user_id(&self) -> &str {
        match self {
            Record::JourneyEntry(r) => &r.user_id,
            Record::StepAdvance(r) | Record::JourneyExit(r) => &r.user_id,
            Record::Conversion(r) => &r.user_id,
        }
    }

    pub fn journey_id(&self) -> &str {
        match self {
            Record::JourneyEntry(r) => &r.journey_id,
            Record::StepAdvance(r) | Record::JourneyExit(r) => &r.journey_id,
            Record::Conversion(r) => &r.journey_id,
        }
    }

    pub fn session_id(&self) -> &str {
        match self {
            Record::JourneyEntry(r) => &r.session_id,
            Record::StepAdvance(r) | Record::JourneyExit(r) => &r.session_id,
            Record::Conversion(r) => &r.session_id,
        }
    }

    pub fn at(&self) -> &str {
        match self {
            Record::JourneyEntry(r) => &r.at,
            Record::StepAdvance(r) | Record::JourneyExit(r) => &r.at,
            Record::Conversion(r) => &r.at,
        }
    }

    /// The record as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("records always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_comes_first_and_nulls_are_kept() {
        let r = Record::Conversion(ConversionRecord {
            journey_id: "j".into(),
            application: "a".into(),
            user_id: "1".into(),
            session_id: "s".into(),
            session_key: None,
            goal_id: "g".into(),
            event: "E".into(),
            event_id: "e1".into(),
            at: "2026-11-28T10:00:00.000Z".into(),
            holdout: None,
        });
        let text = r.to_json();
        assert!(
            text.starts_with(r#"{"type":"conversion","journey_id":"j""#),
            "{text}"
        );
        assert!(text.contains(r#""session_key":null"#), "{text}");
        let back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }
}
