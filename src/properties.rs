//! Client properties passed through to librdkafka (`[kafka.properties]`,
//! `[kafka.consumer_properties]`, `[kafka.producer_properties]`): what lets waymark reach a
//! secured Kafka (SASL, TLS, managed services). Values are never logged: [`Properties`]' `Debug`
//! redacts every value, and a key ending in `_file` takes its value from that file (secrets stay
//! out of the config and the environment).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use toml::Value;

/// Keys waymark sets itself: its guarantees depend on them, so the config may not.
pub const OWNED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("metadata.broker.list", "set kafka.brokers instead"),
    ("group.id", "set kafka.group_id instead"),
    (
        "enable.auto.commit",
        "waymark commits offsets with the state they describe",
    ),
    (
        "enable.auto.offset.store",
        "waymark stores offsets after processing",
    ),
    (
        "auto.offset.reset",
        "a new group must read from the start of every input",
    ),
    ("isolation.level", "waymark reads committed records only"),
    ("enable.partition.eof", "the runtime relies on it"),
    (
        "partition.assignment.strategy",
        "the rebalance protocol is the runtime's",
    ),
    ("transactional.id", "set kafka.transactional_id instead"),
    (
        "transaction.timeout.ms",
        "set kafka.transaction_timeout_ms instead",
    ),
    (
        "enable.idempotence",
        "exactly-once and ordering need the idempotent producer",
    ),
    (
        "partitioner",
        "ownership follows Kafka's default murmur2 partitioner",
    ),
];

/// Properties as written: names to scalars. `Debug` shows names only.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Properties(pub BTreeMap<String, Value>);

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

impl Properties {
    /// The properties as librdkafka takes them: `_file` keys replaced by the file's content
    /// (trailing newline removed). Every problem is named with `section.key`; a message never
    /// contains a value.
    pub fn resolve(&self, section: &str) -> Result<Vec<(String, String)>, Vec<String>> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for (key, value) in &self.0 {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Integer(i) => i.to_string(),
                Value::Boolean(b) => b.to_string(),
                Value::Float(x) => x.to_string(),
                other => {
                    errors.push(format!(
                        "{section}.{key:?}: must be a string, number or boolean, found {}",
                        other.type_str()
                    ));
                    continue;
                }
            };
            let (name, text) = match key.strip_suffix("_file") {
                Some(name) => match std::fs::read_to_string(&text) {
                    Ok(content) => (
                        name.to_string(),
                        content.trim_end_matches(['\n', '\r']).to_string(),
                    ),
                    Err(e) => {
                        errors.push(format!(
                            "{section}.{key:?}: cannot read the file it names ({text}): {e}"
                        ));
                        continue;
                    }
                },
                None => (key.clone(), text),
            };
            if let Some((_, why)) = OWNED.iter().find(|(k, _)| *k == name) {
                errors.push(format!(
                    "{section}.{key:?}: waymark sets {name} itself ({why})"
                ));
                continue;
            }
            out.push((name, text));
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }
}

/// The librdkafka name of a property given in an environment variable's tail (lowercased):
/// `__` stands for a dot where the name has one (`sasl__mechanism`), or, when there is no `__`,
/// every `_` does (`sasl_mechanism`); a trailing `_file` stays (`sasl__password_file`).
pub fn env_property_name(tail: &str) -> String {
    let (base, file) = match tail.strip_suffix("_file") {
        Some(b) => (b, "_file"),
        None => (tail, ""),
    };
    let name = if base.contains("__") {
        base.replace("__", ".")
    } else {
        base.replace('_', ".")
    };
    format!("{name}{file}")
}

/// Resolved properties for every client.
#[derive(Clone, Default, PartialEq)]
pub struct ClientProperties {
    pub common: Vec<(String, String)>,
    pub consumer: Vec<(String, String)>,
    pub producer: Vec<(String, String)>,
}

impl fmt::Debug for ClientProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |v: &Vec<(String, String)>| v.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
        f.debug_struct("ClientProperties")
            .field("common", &names(&self.common))
            .field("consumer", &names(&self.consumer))
            .field("producer", &names(&self.producer))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Properties {
        Properties(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect(),
        )
    }

    #[test]
    fn file_indirection_reads_the_secret_and_debug_never_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cr3t-value\n").unwrap();
        let p = props(&[
            ("sasl.mechanism", "PLAIN"),
            ("sasl.password_file", f.to_str().unwrap()),
            ("sasl.username", "svc"),
        ]);
        let r = p.resolve("kafka.properties").unwrap();
        assert!(r.contains(&("sasl.password".into(), "s3cr3t-value".into())));
        assert!(r.contains(&("sasl.mechanism".into(), "PLAIN".into())));
        let shown = format!(
            "{p:?} {:?}",
            ClientProperties {
                common: r,
                ..Default::default()
            }
        );
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("svc"),
            "{shown}"
        );
    }

    #[test]
    fn owned_keys_and_unreadable_files_are_refused_without_their_values() {
        let p = props(&[
            ("enable.auto.commit", "true"),
            ("group.id", "other"),
            ("ssl.key.password_file", "/nonexistent/secret-path"),
        ]);
        let errors = p.resolve("kafka.properties").unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors
            .iter()
            .any(|e| e.contains("enable.auto.commit") && e.contains("itself")));
        assert!(errors
            .iter()
            .any(|e| e.contains("set kafka.group_id instead")));
        assert!(errors.iter().any(|e| e.contains("cannot read the file")));
        assert!(!errors.iter().any(|e| e.contains("\"other\"")));
    }

    #[test]
    fn environment_names_map_to_property_names() {
        assert_eq!(env_property_name("sasl__mechanism"), "sasl.mechanism");
        assert_eq!(env_property_name("sasl_mechanism"), "sasl.mechanism");
        assert_eq!(
            env_property_name("sasl__password_file"),
            "sasl.password_file"
        );
        assert_eq!(env_property_name("ssl_ca_location"), "ssl.ca.location");
    }
}
