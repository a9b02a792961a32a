//! Kafka plumbing: client settings, user ownership (murmur2, as Kafka's default partitioner),
//! topic creation, and the small `produce` / `tail` tools.
//!
//! - [`runtime`]: `waymark run`, the consumer-group service around the processor (a room a job:
//!   the worker loop, partitions, inputs, batches, transactions).
//! - [`commit`]: the at_least_once commit pipeline, a pure state machine: when a closed batch's
//!   changelog markers go out and when its state is written.
//! - [`lifecycle`]: one partition's life on this member, a pure state machine: its writer epoch
//!   and name, the claim, markers in flight and whether each landed in place, input offsets,
//!   giving a partition up or claiming it again after a restore.
//! - [`producer`]: the delivery context (outcomes by batch generation), the opaque, the send.
//! - `restore`: every assigned partition restored from the changelog at once.
//! - `failpoint`: test crash points (the `failpoints` feature only).
//! - [`router`]: the route topic's records: kinds, where a forwarded input was first read.
//! - [`changelog`]: the changelog's records and the pure restore state machine.

pub mod changelog;
pub mod commit;
mod failpoint;
pub mod lifecycle;
pub mod producer;
mod restore;
pub mod router;
pub mod runtime;
pub mod tools;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Config;

/// Kafka's murmur2 (as in `org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = len / 4;
    for i in 0..chunks {
        let b = &data[i * 4..i * 4 + 4];
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = &data[chunks * 4..];
    if tail.len() == 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition that owns `user`: murmur2 of the user id's text, as Kafka's default partitioner
/// places a record keyed by it.
pub fn owner_of(user: &str, partitions: i32) -> i32 {
    ((murmur2(user.as_bytes()) & 0x7fff_ffff) as i64 % partitions as i64) as i32
}

/// The configured client properties (`[kafka.properties]` and the role-specific tables), set
/// once by `waymark run` before it makes any client; empty for the other commands.
static PROPERTIES: std::sync::RwLock<Option<crate::properties::ClientProperties>> =
    std::sync::RwLock::new(None);

/// Sets the properties every client made from now on gets.
pub fn set_client_properties(props: crate::properties::ClientProperties) {
    *PROPERTIES.write().unwrap_or_else(|e| e.into_inner()) = Some(props);
}

fn apply(
    c: &mut ClientConfig,
    pick: fn(&crate::properties::ClientProperties) -> &Vec<(String, String)>,
) {
    if let Some(props) = PROPERTIES
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        for (k, v) in pick(props) {
            c.set(k, v);
        }
    }
}

/// Applies the consumer-only properties (call last, before `create`).
pub fn apply_consumer_properties(c: &mut ClientConfig) -> &mut ClientConfig {
    apply(c, |p| &p.consumer);
    c
}

/// Settings every waymark client shares, then the configured `[kafka.properties]`.
pub fn base_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "waymark")
        .set("log_level", "4")
        // Small requests (acks, commits) must not wait for Nagle's algorithm.
        .set("socket.nagle.disable", "true")
        .set("topic.metadata.refresh.interval.ms", "10000");
    apply(&mut c, |p| &p.common);
    c
}

/// Settings for a producer that places keyed records exactly as Kafka's default partitioner.
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = base_config(brokers);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "60000")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random");
    apply(&mut c, |p| &p.producer);
    c
}

/// Partition counts of the topics that exist, by name.
pub fn topic_partitions(brokers: &str, timeout: Duration) -> anyhow::Result<HashMap<String, i32>> {
    let consumer: BaseConsumer = apply_consumer_properties(&mut base_config(brokers))
        .create()
        .context("creating a metadata client")?;
    let md = consumer
        .fetch_metadata(None, timeout)
        .with_context(|| format!("fetching metadata from {brokers}"))?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// A compacted topic and the `min.compaction.lag.ms` it is created with.
pub struct Compacted<'a> {
    pub topic: &'a str,
    pub min_lag_ms: u64,
}

/// Creates the missing topics (`(name, partitions)`; those named in `compacted` with
/// `cleanup.policy=compact`), then waits until every one is visible with a leader for each
/// partition: a broker may answer UnknownTopicOrPartition for a moment after creation.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[(String, i32)],
    replication: i32,
    compacted: &[Compacted<'_>],
) -> anyhow::Result<HashMap<String, i32>> {
    let timeout = Duration::from_secs(10);
    let existing = patient_metadata(brokers).await?;
    let missing: Vec<&(String, i32)> = topics
        .iter()
        .filter(|(t, _)| !existing.contains_key(t))
        .collect();
    if !missing.is_empty() {
        let admin: AdminClient<DefaultClientContext> = base_config(brokers)
            .create()
            .context("creating an admin client")?;
        let lags: Vec<String> = compacted.iter().map(|c| c.min_lag_ms.to_string()).collect();
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|(t, n)| {
                let topic = NewTopic::new(t, *n, TopicReplication::Fixed(replication));
                match compacted.iter().position(|c| c.topic == t.as_str()) {
                    Some(i) => topic
                        .set("cleanup.policy", "compact")
                        .set("min.compaction.lag.ms", &lags[i]),
                    None => topic,
                }
            })
            .collect();
        let results = admin
            .create_topics(
                new.iter(),
                &AdminOptions::new().operation_timeout(Some(timeout)),
            )
            .await
            .context("creating topics")?;
        for r in results {
            if let Err((topic, code)) = r {
                if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                    bail!("cannot create topic {topic}: {code}");
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = patient_metadata(brokers).await?;
        if topics.iter().all(|(t, _)| now.contains_key(t)) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            let absent: Vec<&str> = topics
                .iter()
                .filter(|(t, _)| !now.contains_key(t))
                .map(|(t, _)| t.as_str())
                .collect();
            bail!("topics still not visible after 60 s: {}", absent.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Attempts of each metadata request at start, 10 s each: a broker that is still starting (or too
/// busy to answer at once) gets a minute before `waymark run` gives up.
const METADATA_ATTEMPTS: u32 = 6;

/// A metadata request of `waymark run`'s start, retried: a broker that does not answer within
/// 10 s is asked again (with a warning) up to [`METADATA_ATTEMPTS`] times.
async fn patient_metadata(brokers: &str) -> anyhow::Result<HashMap<String, i32>> {
    let mut attempt = 1;
    loop {
        match topic_partitions(brokers, Duration::from_secs(10)) {
            Ok(t) => return Ok(t),
            Err(e) if attempt < METADATA_ATTEMPTS => {
                tracing::warn!(attempt, error = %format!("{e:#}"), "the brokers did not answer; asking again");
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "no answer from the brokers in {METADATA_ATTEMPTS} attempts of 10 s: is kafka.brokers right and reachable?"
                )))
            }
        }
    }
}

/// Creates what `waymark run` needs and checks co-partitioning: every input topic, the route
/// topic and the changelog must have the same number of partitions. Returns that number.
pub async fn prepare_topics(cfg: &Config) -> anyhow::Result<i32> {
    let brokers = &cfg.kafka.brokers;
    let existing = patient_metadata(brokers).await?;
    // New input/route topics take the partition count of an existing input topic, if any.
    let n = cfg
        .kafka
        .input_topics
        .iter()
        .find_map(|t| existing.get(t).copied())
        .unwrap_or(cfg.kafka.partitions);
    let mut wanted: Vec<(String, i32)> = cfg
        .kafka
        .input_topics
        .iter()
        .map(|t| (t.clone(), n))
        .collect();
    wanted.push((cfg.topics.route.clone(), n));
    let mut co_partitioned = vec![&cfg.topics.route];
    // Profile topics are joined like a table: a user's profile lives in the user's partition.
    for t in &cfg.kafka.profile_topics {
        wanted.push((t.clone(), n));
        co_partitioned.push(t);
    }
    // A profile topic waymark creates is compacted: only each user's latest record matters.
    let mut compacted: Vec<Compacted<'_>> = cfg
        .kafka
        .profile_topics
        .iter()
        .map(|t| Compacted {
            topic: t,
            min_lag_ms: 0,
        })
        .collect();
    compacted.push(Compacted {
        topic: &cfg.topics.changelog,
        min_lag_ms: cfg.state.changelog_min_compaction_lag_ms,
    });
    if cfg.state.changelog {
        wanted.push((cfg.topics.changelog.clone(), n));
        co_partitioned.push(&cfg.topics.changelog);
    }
    for t in [
        &cfg.topics.entries,
        &cfg.topics.steps,
        &cfg.topics.conversions,
        &cfg.topics.dlq,
    ] {
        wanted.push((t.clone(), cfg.kafka.partitions));
    }
    let now = ensure_topics(brokers, &wanted, cfg.kafka.replication_factor, &compacted).await?;
    let mut problems = Vec::new();
    for t in cfg.kafka.input_topics.iter().chain(co_partitioned) {
        let have = now[t];
        if have != n {
            problems.push(format!("{t} has {have} partitions"));
        }
    }
    if !problems.is_empty() {
        bail!(
            "input, profile, route and changelog topics must have the same number of partitions \
             ({n}, as {} has), so that every user's state lives in one partition; but {}. Recreate \
             the route and changelog topics with {n} partitions or use input and profile topics \
             of equal size.",
            cfg.kafka.input_topics[0],
            problems.join(", ")
        );
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Vectors from Kafka's UtilsTest.
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(murmur2(b"abc"), 479470107);
    }

    #[test]
    fn owner_is_in_range() {
        for u in ["1", "123", "user-42", ""] {
            let p = owner_of(u, 8);
            assert!((0..8).contains(&p));
        }
        assert_eq!(owner_of("anything", 1), 0);
    }
}
