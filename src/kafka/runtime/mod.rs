//! `waymark run`: the consumer-group service.
//!
//! Each processing thread (`processing.threads`, one per core by default) is a member of the
//! consumer group of its own: it polls a consumer subscribed to the input topics and the route
//! topic (range assignment, so partition `p` of every one of them lands on the same member) and
//! owns one RocksDB store per assigned partition number, its producer and its commit pipeline;
//! threads share nothing but the metrics. For each record it:
//!
//! 1. skips it if the partition's store has already applied that offset (a redelivery);
//! 2. dead-letters it if it is not a valid event;
//! 3. forwards it through the route topic if its user's state lives on another partition
//!    (`murmur2(user) mod N`, Kafka's default partitioner);
//! 4. otherwise runs the [`Processor`] and produces the records (keyed by user) and any entries
//!    for users owned elsewhere (to the route topic).
//!
//! Every `commit_interval_ms` (or `commit_max_records` inputs) the batch is closed (at_least_once):
//! its state is sealed as a generation of each partition's `State`, its changelog changes go out,
//! and the next batch is processed at once. The [`commit`] pipeline then says, batch by batch and
//! oldest first, when the broker has acknowledged every output so that the markers may go out
//! (with the group offset commit), and when the markers are acknowledged so that the state, with
//! the input offsets it reaches, goes to RocksDB in one batch ([`Core::pump`]). At most
//! `processing.max_batches_in_flight` closed batches wait; then input reading pauses. A crash at
//! any point replays from the offsets of the last marker (or of the local store): outputs may
//! repeat, with the same deterministic ids, and none is lost. exactly_once commits each batch in
//! one transaction and writes its state after it ([`Core::commit_batch`]).
//!
//! Timers: while a partition works through a backlog they fire by event time, before the first
//! event at or past their due time; once it is caught up (no lag), every `timer_tick_ms` it fires
//! the timers due by the wall clock. The records' `at` is the due time either way.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use super::commit::{self, Action, Gen, Pipeline};
use super::failpoint::{failpoint, Failpoint};
use super::lifecycle::{self, Lifecycle, Reclaim, Written};
pub use super::producer::Delivery;
use super::producer::{serve_reports, Opaque, Out};
use super::restore::{Restored, Restorer};
use super::{changelog, owner_of, producer_config, router};
use crate::config::{Config, Guarantee};
use crate::engine::EntryIntent;
use crate::event::{EventError, RawEvent};
use crate::journey::JourneySet;
use crate::metrics::Metrics;
use crate::processor::{InputApplied, Output, Processor, ProfileApplied};
use crate::record::Stream;
use crate::store::rocks::RocksStore;
use crate::store::{State, Store, Table};
use crate::time::Millis;

mod batch;
mod consumer;
mod input;
mod partition;
mod transaction;

pub use consumer::run;
use consumer::Ctx;

/// The wall clock the runtime reads: system time shifted by `processing.clock_offset_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset_ms: Millis,
}

impl Clock {
    pub fn system() -> Clock {
        Clock { offset_ms: 0 }
    }

    pub fn shifted(offset_ms: Millis) -> Clock {
        Clock { offset_ms }
    }

    pub fn now_ms(&self) -> Millis {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
            + self.offset_ms
    }
}

/// One owned partition number: its store, and its life as this member's (writer epoch and
/// name, claim, markers in flight, input offsets: see [`Lifecycle`]).
struct Part {
    proc: Processor<RocksStore>,
    life: Lifecycle,
    /// `waymark_events_consumed_total` for each topic of this partition.
    consumed: HashMap<String, prometheus::IntCounter>,
    active: HashMap<String, i64>,
}

fn offset_key(topic: &str) -> String {
    format!("offset/{topic}")
}

/// Everything the processing thread owns; shared with the rebalance callback, which runs on the
/// same thread inside `poll`.
struct Core {
    cfg: Config,
    journeys: Arc<JourneySet>,
    metrics: Arc<Metrics>,
    producer: BaseProducer<Delivery>,
    /// Reads the changelog when a partition is restored (assigned by hand, no group).
    restorer: Option<BaseConsumer>,
    eos: bool,
    /// Names this process in changelog writer names.
    incarnation: String,
    partitions: i32,
    parts: HashMap<i32, Part>,
    out: Output,
    batch_inputs: usize,
    batch_started: Instant,
    fatal: Option<anyhow::Error>,
    last_tick: Instant,
    clock: Clock,
    /// Batches made durable so far, and the test failpoint (see [`Failpoint`]).
    commits: u64,
    failpoint: Option<Failpoint>,
    aborts_in_row: u32,
    /// Inputs whose outputs are too large to publish, by (topic, partition, offset), with why:
    /// met again after the rewind, each goes to the dead-letter topic unprocessed.
    poisoned: HashMap<(String, i32, i64), String>,
    /// Set when an input was poisoned: the batch is dropped and the consumer rewound.
    rewind_requested: bool,
    /// The largest record the producer may send (`message.max.bytes`).
    max_record_bytes: usize,
    /// at_least_once batches that failed delivery in a row (for the backoff), and in all (for
    /// changelog writer names).
    retries_in_row: u32,
    retries_total: u64,
    /// at_least_once: the batches in flight (see [`commit`]); every record sent is counted in it
    /// under its batch's generation.
    pipeline: RefCell<Pipeline>,
    /// Closed batches not yet written: when each closed and the input offsets it reached.
    closed: VecDeque<Closed>,
    /// Batches whose markers were sent so far (failpoints count batches by it).
    marked: u64,
    /// Inside the rebalance callback or the shutdown: group commits are synchronous there.
    draining: bool,
    /// Delivery reports taken from the producer's context, reused.
    reports: Vec<(u64, bool)>,
    /// The newest batch whose changelog changes were sent.
    changes_sent: Gen,
    /// What this member last added to the shared gauges: partitions held, profiles stored.
    reported: (i64, i64),
}

/// A closed batch waiting for its acknowledgements.
struct Closed {
    gen: Gen,
    at: Instant,
    /// The next offset of each (topic, partition) the batch moved, for the group commit.
    offsets: Vec<(String, i32, i64)>,
}

/// Room left in a record for its key, headers and framing when sizes are checked.
const RECORD_HEADROOM: usize = 64 * 1024;

/// exactly_once: transactions aborted in a row before the service gives up (a permanent error).
const MAX_ABORTS_IN_ROW: u32 = 10;

/// The pause after the n-th transaction aborted in a row (n >= 1): 200 ms doubling, at most 20 s,
/// so the aborts that stop the service span about 85 s of a broker outage, not a second.
fn abort_backoff(n: u32) -> Duration {
    Duration::from_millis(200u64 << n.saturating_sub(1).min(7)).min(Duration::from_secs(20))
}

/// Whether a group commit error means this member has been replaced.
fn is_fenced(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::UnknownMemberId | C::IllegalGeneration | C::FencedInstanceId)
    )
}

/// Whether a transactional producer error means a newer instance took its transactional.id.
fn is_producer_fenced(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        code,
        C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch | C::FencedInstanceId
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aborted_transactions_back_off_until_the_service_stops() {
        assert_eq!(abort_backoff(1), Duration::from_millis(200));
        assert_eq!(abort_backoff(2), Duration::from_millis(400));
        assert_eq!(abort_backoff(9), Duration::from_secs(20));
        let before_stop: Duration = (1..=MAX_ABORTS_IN_ROW).map(abort_backoff).sum();
        assert_eq!(before_stop, Duration::from_millis(85_400));
    }
}
