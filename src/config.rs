//! Service configuration: embedded defaults, then the TOML file, then `WAYMARK_*` environment
//! variables, then command-line flags. Unknown keys are refused and every problem is reported at
//! once, naming the key and what to fix.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Table, Value};

use crate::properties::{env_property_name, ClientProperties, Properties};

/// The defaults, as shipped in `config/waymark.toml`.
pub const DEFAULTS: &str = include_str!("../config/waymark.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub state: StateConfig,
    pub journeys: JourneysConfig,
    pub metrics: MetricsConfig,
    pub processing: ProcessingConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub input_topics: Vec<String>,
    pub profile_topics: Vec<String>,
    pub partitions: i32,
    pub replication_factor: i32,
    pub session_timeout_ms: u64,
    pub transactional_id: String,
    pub transaction_timeout_ms: u64,
    pub commit_timeout_ms: u64,
    /// librdkafka properties for every client, and for consumers and producers only.
    #[serde(default)]
    pub properties: Properties,
    #[serde(default)]
    pub consumer_properties: Properties,
    #[serde(default)]
    pub producer_properties: Properties,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TopicsConfig {
    pub entries: String,
    pub steps: String,
    pub conversions: String,
    pub dlq: String,
    pub route: String,
    pub changelog: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StateConfig {
    pub dir: PathBuf,
    pub sync: bool,
    pub changelog: bool,
    pub changelog_min_compaction_lag_ms: u64,
    /// Users whose decoded state one partition keeps in memory (0: no cache).
    pub cache_max_users: usize,
    /// Estimated bytes of decoded state one partition keeps in memory.
    pub cache_max_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JourneysConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetricsConfig {
    pub addr: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProcessingConfig {
    pub guarantee: Guarantee,
    pub commit_interval_ms: u64,
    pub transaction_interval_ms: u64,
    pub commit_max_records: usize,
    pub max_batches_in_flight: usize,
    pub threads: usize,
    pub max_event_bytes: usize,
    pub max_future_ms: u64,
    pub max_targets: usize,
    pub max_sessions_per_user: usize,
    pub max_profile_bytes: usize,
    pub timer_tick_ms: u64,
    pub clock_offset_ms: i64,
}

/// What `waymark run` promises about each input's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    AtLeastOnce,
    ExactlyOnce,
}

/// Every problem found in the configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

/// Environment variables that are not configuration keys.
const NOT_CONFIG: &[&str] = &[
    "WAYMARK_LOG",
    "WAYMARK_BLESS",
    "WAYMARK_LOG_FORMAT",
    "WAYMARK_FAILPOINT",
];

/// Loads the configuration. `file`: an explicit path must exist; `overrides`: `(section.key,
/// value)` pairs from flags; `env`: the environment (pass `std::env::vars()`).
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(&str, Value)],
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    // `section.key` of every value a layer (file, environment, flags) set.
    let mut set = std::collections::BTreeSet::new();
    let defaults: Table = DEFAULTS.parse().expect("embedded defaults parse");
    let mut merged = defaults.clone();
    if let Some(path) = file {
        match std::fs::read_to_string(path) {
            Ok(text) => match text.parse::<Table>() {
                Ok(t) => merge(
                    &defaults,
                    &mut merged,
                    t,
                    (&path.display().to_string(), &mut set),
                    &mut errors,
                ),
                Err(e) => errors.push(format!("{}: not valid TOML: {e}", path.display())),
            },
            Err(e) => errors.push(format!(
                "{}: cannot read the config file: {e}",
                path.display()
            )),
        }
    }
    // Environment: WAYMARK_<SECTION>_<KEY>.
    let mut env_table: BTreeMap<String, Table> = BTreeMap::new();
    let mut env_props: BTreeMap<&str, Table> = BTreeMap::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("WAYMARK_") else {
            continue;
        };
        if NOT_CONFIG.contains(&name.as_str()) {
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        // Client properties: WAYMARK_KAFKA_[CONSUMER_|PRODUCER_]PROPERTIES_<NAME>.
        let table = ["consumer_properties", "producer_properties", "properties"]
            .into_iter()
            .find_map(|t| Some((t, lower.strip_prefix(&format!("kafka_{t}_"))?)));
        if let Some((table, tail)) = table {
            env_props
                .entry(table)
                .or_default()
                .insert(env_property_name(tail), Value::String(value));
            continue;
        }
        let section = defaults
            .keys()
            .find(|s| lower.starts_with(&format!("{s}_")))
            .cloned();
        let Some(section) = section else {
            errors.push(format!(
                "environment variable {name}: no such setting (use WAYMARK_<SECTION>_<KEY> with a section of {})",
                defaults.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
            continue;
        };
        let key = lower[section.len() + 1..].to_string();
        let expected = defaults[&section].get(&key);
        let v = match expected {
            Some(Value::Array(_)) if value.trim().is_empty() => Value::Array(Vec::new()),
            Some(Value::Array(_)) => Value::Array(
                value
                    .split(',')
                    .map(|s| Value::String(s.trim().to_string()))
                    .collect(),
            ),
            Some(Value::Integer(_)) => match value.trim().parse::<i64>() {
                Ok(i) => Value::Integer(i),
                Err(_) => Value::String(value),
            },
            Some(Value::Boolean(_)) => match value.trim() {
                "true" | "1" => Value::Boolean(true),
                "false" | "0" => Value::Boolean(false),
                _ => Value::String(value),
            },
            _ => Value::String(value),
        };
        env_table.entry(section).or_default().insert(key, v);
    }
    let env_table: Table = env_table
        .into_iter()
        .map(|(k, v)| (k, Value::Table(v)))
        .collect();
    merge(
        &defaults,
        &mut merged,
        env_table,
        ("environment", &mut set),
        &mut errors,
    );
    // Environment properties add to (and override) the file's, key by key.
    for (table, props) in env_props {
        if let Some(Value::Table(t)) = merged
            .get_mut("kafka")
            .and_then(Value::as_table_mut)
            .and_then(|k| k.get_mut(table))
        {
            t.extend(props);
        }
    }
    let mut flags = Table::new();
    for (path, value) in overrides {
        let (section, key) = path
            .split_once('.')
            .expect("flag overrides name section.key");
        flags
            .entry(section.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .expect("sections are tables")
            .insert(key.to_string(), value.clone());
    }
    merge(
        &defaults,
        &mut merged,
        flags,
        ("flags", &mut set),
        &mut errors,
    );
    // Types: each value must have the default's type.
    for (section, keys) in &merged {
        let Some(keys) = keys.as_table() else {
            continue;
        };
        for (key, value) in keys {
            let want = &defaults[section][key];
            if std::mem::discriminant(want) != std::mem::discriminant(value) {
                errors.push(format!(
                    "{section}.{key}: expected {}, found {} ({value})",
                    want.type_str(),
                    value.type_str()
                ));
            }
        }
    }
    if let Some(Value::String(g)) = merged.get("processing").and_then(|p| p.get("guarantee")) {
        if g != "at_least_once" && g != "exactly_once" {
            errors.push(format!(
                "processing.guarantee: {g:?} is not a guarantee; use \"at_least_once\" or \"exactly_once\""
            ));
        }
    }
    // Unknown keys were not merged, so the values can be checked even when some were refused;
    // only a value of the wrong type stops that.
    let mut cfg: Config = match Value::Table(merged).try_into() {
        Ok(c) => c,
        Err(e) => {
            if errors.is_empty() {
                errors.push(e.to_string());
            }
            return Err(ConfigErrors(errors));
        }
    };
    // Internal topics belong to one deployment: unless set, they are named after the group
    // (`<group_id>.route`, `<group_id>.changelog`; "waymark.route" for the default group), so two
    // deployments with different groups on one cluster never share state or routed entries.
    if !set.contains("topics.route") {
        cfg.topics.route = format!("{}.route", cfg.kafka.group_id);
    }
    if !set.contains("topics.changelog") {
        cfg.topics.changelog = format!("{}.changelog", cfg.kafka.group_id);
    }
    if let Err(ConfigErrors(mut more)) = cfg.check() {
        errors.append(&mut more);
    }
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn merge(
    defaults: &Table,
    into: &mut Table,
    layer: Table,
    (source, set): (&str, &mut std::collections::BTreeSet<String>),
    errors: &mut Vec<String>,
) {
    for (section, value) in layer {
        let Some(known) = defaults.get(&section).and_then(Value::as_table) else {
            errors.push(format!(
                "{source}: unknown section [{section}]; sections are {}",
                defaults.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
            continue;
        };
        let Value::Table(keys) = value else {
            errors.push(format!("{source}: {section} must be a table"));
            continue;
        };
        for (key, v) in keys {
            if !known.contains_key(&key) {
                errors.push(format!(
                    "{source}: unknown key {section}.{key}; keys of [{section}] are {}",
                    known.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
                continue;
            }
            let table = into
                .get_mut(&section)
                .and_then(Value::as_table_mut)
                .expect("defaults have every section");
            set.insert(format!("{section}.{key}"));
            table.insert(key, v);
        }
    }
}

impl Config {
    /// The largest record the producer sends: `message.max.bytes` of the producer or common
    /// client properties, else librdkafka's default (1,000,000).
    pub fn max_record_bytes(&self) -> usize {
        let k = &self.kafka;
        [&k.producer_properties, &k.properties]
            .iter()
            .find_map(|p| match p.0.get("message.max.bytes")? {
                Value::Integer(i) => usize::try_from(*i).ok(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            })
            .unwrap_or(1_000_000)
    }

    /// The client properties with `_file` values read (checked by [`load`] already).
    pub fn client_properties(&self) -> Result<ClientProperties, ConfigErrors> {
        let k = &self.kafka;
        let mut errors = Vec::new();
        let mut resolve = |p: &Properties, section: &str| match p.resolve(section) {
            Ok(v) => v,
            Err(mut e) => {
                errors.append(&mut e);
                Vec::new()
            }
        };
        let props = ClientProperties {
            common: resolve(&k.properties, "kafka.properties"),
            consumer: resolve(&k.consumer_properties, "kafka.consumer_properties"),
            producer: resolve(&k.producer_properties, "kafka.producer_properties"),
        };
        if errors.is_empty() {
            Ok(props)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Checks values beyond their types.
    fn check(&self) -> Result<(), ConfigErrors> {
        let mut e = Vec::new();
        if let Err(ConfigErrors(mut more)) = self.client_properties() {
            e.append(&mut more);
        }
        if self.processing.guarantee == Guarantee::ExactlyOnce && !self.state.changelog {
            e.push("processing.guarantee: exactly_once needs state.changelog = true (without the changelog, a crash between the transaction and the local write republishes in a new transaction); set state.changelog = true or use at_least_once".into());
        }
        if self.kafka.brokers.trim().is_empty() {
            e.push("kafka.brokers: empty; set host:port[,host:port]".to_string());
        }
        if self.kafka.group_id.trim().is_empty() {
            e.push("kafka.group_id: empty".to_string());
        }
        if self.kafka.input_topics.is_empty()
            || self.kafka.input_topics.iter().any(|t| t.trim().is_empty())
        {
            e.push("kafka.input_topics: needs at least one non-empty topic name".to_string());
        }
        if self.kafka.partitions < 1 {
            e.push(format!(
                "kafka.partitions: {} must be at least 1",
                self.kafka.partitions
            ));
        }
        if self.kafka.replication_factor < 1 {
            e.push(format!(
                "kafka.replication_factor: {} must be at least 1",
                self.kafka.replication_factor
            ));
        }
        for t in &self.kafka.profile_topics {
            if t.trim().is_empty() {
                e.push("kafka.profile_topics: a topic name is empty".to_string());
            } else if self.kafka.input_topics.contains(t) {
                e.push(format!(
                    "kafka.profile_topics: {t} is also an input topic; a topic holds events or profiles, not both"
                ));
            }
        }
        let t = &self.topics;
        let outputs = [
            &t.entries,
            &t.steps,
            &t.conversions,
            &t.dlq,
            &t.route,
            &t.changelog,
        ];
        for (i, a) in outputs.iter().enumerate() {
            if a.trim().is_empty() {
                e.push(format!("topics: topic name #{} is empty", i + 1));
            }
            if self.kafka.input_topics.contains(a) {
                e.push(format!(
                    "topics: {a} is also an input topic; outputs and inputs must differ"
                ));
            }
            if self.kafka.profile_topics.contains(a) {
                e.push(format!(
                    "topics: {a} is also a profile topic; outputs and inputs must differ"
                ));
            }
        }
        for (name, topic) in [("route", &t.route), ("changelog", &t.changelog)] {
            let others = [&t.entries, &t.steps, &t.conversions, &t.dlq];
            if others.contains(&topic) {
                e.push(format!(
                    "topics.{name}: {topic} must not be an output topic"
                ));
            }
        }
        if t.route == t.changelog {
            e.push(format!(
                "topics.changelog: {} is also the route topic; they must differ",
                t.changelog
            ));
        }
        if self.metrics.addr.parse::<std::net::SocketAddr>().is_err() {
            e.push(format!(
                "metrics.addr: {:?} is not host:port such as 127.0.0.1:9464",
                self.metrics.addr
            ));
        }
        if self.kafka.commit_timeout_ms == 0 {
            e.push("kafka.commit_timeout_ms: must be at least 1".into());
        }
        if self.kafka.transaction_timeout_ms < 1000 {
            e.push("kafka.transaction_timeout_ms: must be at least 1000".into());
        }
        if self.processing.transaction_interval_ms == 0 {
            e.push("processing.transaction_interval_ms: must be at least 1".into());
        }
        if self.processing.commit_interval_ms == 0 {
            e.push("processing.commit_interval_ms: must be at least 1".into());
        }
        if self.processing.threads > 64 {
            e.push(format!(
                "processing.threads: at most 64 (0: one per core), not {}",
                self.processing.threads
            ));
        }
        if !(1..=64).contains(&self.processing.max_batches_in_flight) {
            e.push(format!(
                "processing.max_batches_in_flight: must be between 1 and 64, not {}",
                self.processing.max_batches_in_flight
            ));
        }
        if self.processing.commit_max_records == 0 {
            e.push("processing.commit_max_records: must be at least 1".into());
        }
        let room = self.max_record_bytes().saturating_sub(64 * 1024);
        if self.processing.max_event_bytes > room {
            e.push(format!(
                "processing.max_event_bytes: {} leaves no room in a record of message.max.bytes = {} (an event must fit a routed or dead-letter record with its headers); set it to at most {room}",
                self.processing.max_event_bytes,
                self.max_record_bytes()
            ));
        }
        if self.processing.max_targets == 0 {
            e.push("processing.max_targets: must be at least 1".into());
        }
        if self.processing.max_profile_bytes == 0 {
            e.push("processing.max_profile_bytes: must be at least 1".into());
        }
        if self.processing.max_sessions_per_user == 0 {
            e.push("processing.max_sessions_per_user: must be at least 1".into());
        }
        if self.processing.timer_tick_ms == 0 || self.processing.timer_tick_ms > 1000 {
            e.push("processing.timer_tick_ms: must be between 1 and 1000".into());
        }
        if e.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_contract_defaults() {
        let c = load(None, env(&[]), &[]).unwrap();
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.group_id, "waymark");
        assert_eq!(c.kafka.input_topics, ["events"]);
        assert_eq!(c.topics.entries, "waymark.entries");
        assert_eq!(c.topics.steps, "waymark.steps");
        assert_eq!(c.topics.conversions, "waymark.conversions");
        assert_eq!(c.topics.dlq, "waymark.dlq");
        assert_eq!(c.topics.route, "waymark.route");
        assert_eq!(c.state.dir, PathBuf::from("state"));
        assert_eq!(c.journeys.dir, PathBuf::from("config/journeys"));
        assert_eq!(c.metrics.addr, "127.0.0.1:9464");
    }

    #[test]
    fn internal_topics_are_named_after_the_group_unless_set() {
        let c = load(None, env(&[("WAYMARK_KAFKA_GROUP_ID", "staging")]), &[]).unwrap();
        assert_eq!(c.topics.route, "staging.route");
        assert_eq!(c.topics.changelog, "staging.changelog");
        assert_eq!(
            c.topics.entries, "waymark.entries",
            "output topics are shared names"
        );
        let c = load(
            None,
            env(&[
                ("WAYMARK_KAFKA_GROUP_ID", "staging"),
                ("WAYMARK_TOPICS_ROUTE", "my.route"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.topics.route, "my.route");
        assert_eq!(c.topics.changelog, "staging.changelog");
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.toml");
        std::fs::write(
            &f,
            "[kafka]\nbrokers = \"file:1\"\ngroup_id = \"g-file\"\n[state]\ndir = \"/s\"\n",
        )
        .unwrap();
        let c = load(
            Some(&f),
            env(&[
                ("WAYMARK_KAFKA_GROUP_ID", "g-env"),
                ("WAYMARK_KAFKA_INPUT_TOPICS", "a, b"),
                ("PATH", "/bin"),
            ]),
            &[("state.dir", Value::String("/flag".into()))],
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "file:1");
        assert_eq!(c.kafka.group_id, "g-env");
        assert_eq!(c.kafka.input_topics, ["a", "b"]);
        assert_eq!(c.state.dir, PathBuf::from("/flag"));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.toml");
        std::fs::write(
            &f,
            "[kafka]\nbrokerz = \"x\"\npartitions = \"eight\"\n[metrics]\naddr = \"nowhere\"\n[extra]\na = 1\n",
        )
        .unwrap();
        let e = load(
            Some(&f),
            env(&[("WAYMARK_STATE_DIRR", "x"), ("WAYMARK_NOPE", "1")]),
            &[],
        )
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "kafka.brokerz",
            "kafka.partitions",
            "[extra]",
            "state.dirr",
            "WAYMARK_NOPE",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert_eq!(e.0.len(), 5, "{text}");
        // Value checks run once types are right.
        let e = load(
            None,
            env(&[
                ("WAYMARK_METRICS_ADDR", "nowhere"),
                ("WAYMARK_TOPICS_DLQ", "events"),
            ]),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
    }

    #[test]
    fn the_guarantee_is_one_of_two() {
        let c = load(None, env(&[]), &[]).unwrap();
        assert_eq!(c.processing.guarantee, Guarantee::AtLeastOnce);
        assert!(c.state.changelog);
        assert_eq!(c.topics.changelog, "waymark.changelog");
        assert_eq!(c.state.changelog_min_compaction_lag_ms, 86_400_000);
        let c = load(
            None,
            env(&[("WAYMARK_PROCESSING_GUARANTEE", "exactly_once")]),
            &[],
        )
        .unwrap();
        assert_eq!(c.processing.guarantee, Guarantee::ExactlyOnce);
        let e = load(None, env(&[("WAYMARK_PROCESSING_GUARANTEE", "twice")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("processing.guarantee") && e.contains("exactly_once"),
            "{e}"
        );
        let e = load(
            None,
            env(&[("WAYMARK_TOPICS_CHANGELOG", "waymark.route")]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("topics.changelog"), "{e}");
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let e = load(Some(Path::new("/no/such/waymark.toml")), env(&[]), &[]).unwrap_err();
        assert!(e.to_string().contains("cannot read the config file"));
    }
}
