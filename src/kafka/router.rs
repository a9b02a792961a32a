//! The route topic's records, built and read in one place: what kind each is (an input read on a
//! partition that does not own its user, forwarded to the owner; or an entry for a user of another
//! partition), and where a forwarded input was first read, which its default event id and its dead
//! letter name. Which partition owns a user is [`super::owner_of`].

use rdkafka::message::{Header, Headers, OwnedHeaders};

use crate::time::Millis;

pub const HEADER_KIND: &str = "waymark-kind";
pub const HEADER_EVENT_ID: &str = "waymark-event-id";
pub const HEADER_RECORD_TIME: &str = "waymark-record-time";
pub const HEADER_ERROR: &str = "waymark-error";
pub const HEADER_SOURCE_TOPIC: &str = "waymark-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "waymark-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "waymark-source-offset";

/// What a route record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An input event, as read from its topic.
    Event,
    /// A profile record, as read from its topic.
    Profile,
    /// An entry intent (JSON) for a user this partition owns.
    Entry,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Profile => "profile",
            Kind::Entry => "entry",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [Kind::Event, Kind::Profile, Kind::Entry]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Where a record was first read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: String,
    pub partition: String,
    pub offset: String,
}

impl Source {
    pub fn new(topic: &str, partition: i32, offset: i64) -> Source {
        Source {
            topic: topic.to_string(),
            partition: partition.to_string(),
            offset: offset.to_string(),
        }
    }

    /// The default event id of an input without `eventId`: `topic/partition/offset`.
    pub fn default_id(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// The headers of an input forwarded to its owner: its kind, default id, where it was read and
/// the Kafka timestamp it had there.
pub fn forward_headers(kind: Kind, source: &Source, record_time: Option<Millis>) -> OwnedHeaders {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: HEADER_KIND,
            value: Some(kind.as_str()),
        })
        .insert(Header {
            key: HEADER_EVENT_ID,
            value: Some(&source.default_id()),
        });
    let headers = with_source(headers, source);
    match record_time {
        Some(t) => headers.insert(Header {
            key: HEADER_RECORD_TIME,
            value: Some(&t.to_string()),
        }),
        None => headers,
    }
}

/// The headers of a routed entry intent.
pub fn entry_headers() -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: HEADER_KIND,
        value: Some(Kind::Entry.as_str()),
    })
}

/// The headers of a dead letter: why (`reason: message`) and where its input was first read.
pub fn dead_letter_headers(why: &str, source: &Source) -> OwnedHeaders {
    let headers = OwnedHeaders::new().insert(Header {
        key: HEADER_ERROR,
        value: Some(why),
    });
    with_source(headers, source)
}

fn with_source(headers: OwnedHeaders, source: &Source) -> OwnedHeaders {
    headers
        .insert(Header {
            key: HEADER_SOURCE_TOPIC,
            value: Some(&source.topic),
        })
        .insert(Header {
            key: HEADER_SOURCE_PARTITION,
            value: Some(&source.partition),
        })
        .insert(Header {
            key: HEADER_SOURCE_OFFSET,
            value: Some(&source.offset),
        })
}

/// A header's value as text.
pub fn header(headers: Option<&impl Headers>, name: &str) -> Option<String> {
    headers.and_then(|h| {
        h.iter()
            .find(|x| x.key == name)
            .and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned()))
    })
}

/// What the headers of a record read from the route topic say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// `None`: no kind header; `Some(Err(text))`: a kind this version does not know.
    pub kind: Option<Result<Kind, String>>,
    pub event_id: Option<String>,
    pub record_time: Option<Millis>,
}

/// Reads a route record's headers.
pub fn read(headers: Option<&impl Headers>) -> Routed {
    Routed {
        kind: header(headers, HEADER_KIND).map(|k| Kind::parse(&k).ok_or(k)),
        event_id: header(headers, HEADER_EVENT_ID),
        record_time: header(headers, HEADER_RECORD_TIME).and_then(|s| s.parse().ok()),
    }
}

/// Where a record was first read: its source headers if it was forwarded, else `own`.
pub fn source(headers: Option<&impl Headers>, own: Source) -> Source {
    Source {
        topic: header(headers, HEADER_SOURCE_TOPIC).unwrap_or(own.topic),
        partition: header(headers, HEADER_SOURCE_PARTITION).unwrap_or(own.partition),
        offset: header(headers, HEADER_SOURCE_OFFSET).unwrap_or(own.offset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_input_reads_back_with_its_kind_id_time_and_source() {
        let src = Source::new("events", 3, 42);
        for kind in [Kind::Event, Kind::Profile] {
            let h = forward_headers(kind, &src, Some(1_700_000_000_123));
            let r = read(Some(&h));
            assert_eq!(r.kind, Some(Ok(kind)));
            assert_eq!(r.event_id.as_deref(), Some("events/3/42"));
            assert_eq!(r.record_time, Some(1_700_000_000_123));
            // Its dead letter, met on the route topic, names where it was first read.
            assert_eq!(source(Some(&h), Source::new("route", 5, 7)), src);
        }
        let h = forward_headers(Kind::Event, &src, None);
        assert_eq!(read(Some(&h)).record_time, None);
    }

    #[test]
    fn entries_unknown_kinds_and_records_without_headers() {
        assert_eq!(read(Some(&entry_headers())).kind, Some(Ok(Kind::Entry)));
        let odd = OwnedHeaders::new().insert(Header {
            key: HEADER_KIND,
            value: Some("gossip"),
        });
        assert_eq!(read(Some(&odd)).kind, Some(Err("gossip".to_string())));
        let none: Option<&OwnedHeaders> = None;
        assert_eq!(read(none).kind, None);
        // A record read where it was produced names itself.
        assert_eq!(
            source(none, Source::new("events", 1, 9)),
            Source::new("events", 1, 9)
        );
        let dl = dead_letter_headers("not_json: expected value", &Source::new("events", 1, 9));
        assert_eq!(
            header(Some(&dl), HEADER_ERROR).as_deref(),
            Some("not_json: expected value")
        );
        assert_eq!(
            header(Some(&dl), HEADER_SOURCE_OFFSET).as_deref(),
            Some("9")
        );
    }
}
