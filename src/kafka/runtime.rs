//! `waymark run`: the consumer-group service.
//!
//! One processing thread polls a consumer subscribed to the input topics and the route topic
//! (range assignment, so partition `p` of every one of them lands on the same instance) and owns
//! one RocksDB store per assigned partition number. For each record it:
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
pub use super::producer::Delivery;
use super::producer::{Opaque, Out};
use super::restore::{Restored, Restorer};
use super::{changelog, owner_of, producer_config, router};
use crate::config::{Config, Guarantee};
use crate::engine::EntryIntent;
use crate::event::{EventError, RawEvent};
use crate::journey::JourneySet;
use crate::metrics::Metrics;
use crate::processor::{InputApplied, Output, Processor, ProfileApplied};
use crate::record::{Record, Stream};
use crate::store::rocks::RocksStore;
use crate::store::{State, Store, Table};
use crate::time::Millis;

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

/// One owned partition number: its store, and the next offset to apply per topic.
struct Part {
    proc: Processor<RocksStore>,
    /// This owner's epoch (one above the highest restored) and its name in the changelog.
    epoch: u64,
    writer: String,
    /// A marker is owed even with nothing staged: the claim that fences older owners.
    claim: bool,
    /// The changelog offset the local store has reached (never goes backwards).
    changelog_next: i64,
    /// Where this writer's next changelog record lands if nobody else writes the partition (the
    /// restore's end, then one past each acknowledged marker), and how many records each batch
    /// whose marker is in flight sent (oldest first). A marker acknowledged anywhere else means
    /// another writer's records are in between (a zombie's, or a newer owner's): the batch is not
    /// written locally and the partition is restored again (see [`Core::reopen`]).
    changelog_tail: i64,
    marks: VecDeque<(Gen, i64)>,
    /// Keys the restore dropped records of, to write again (with their current value) in the
    /// batch after the claim. Not in the claim itself: if another writer's records land between
    /// the restore's end and the claim (a zombie still writing), the claim is found out of place
    /// and the partition restored again; had the claim carried these values, read as of the
    /// first restore, every later restore would apply them over the other writer's newer ones.
    rewrite: Vec<(Table, Vec<u8>)>,
    /// `waymark_events_consumed_total` for each topic of this partition.
    consumed: HashMap<String, prometheus::IntCounter>,
    next: HashMap<String, i64>,
    dirty_offsets: bool,
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

impl Core {
    fn state_dir(&self, p: i32) -> PathBuf {
        self.cfg.state.dir.join(format!("partition-{p}"))
    }

    /// The changelog reader, when the changelog is on.
    fn restorer(&self) -> Option<Restorer<'_>> {
        let delay = match self.failpoint {
            Some(Failpoint::RestoreDelay(ms)) => Some(Duration::from_millis(ms)),
            _ => None,
        };
        self.restorer.as_ref().map(|consumer| Restorer {
            consumer,
            topic: &self.cfg.topics.changelog,
            group: &self.cfg.kafka.group_id,
            metrics: &self.metrics,
            delay,
        })
    }

    fn open_store(&self, p: i32) -> anyhow::Result<RocksStore> {
        RocksStore::open(&self.state_dir(p), self.cfg.state.sync)
            .with_context(|| format!("opening the state of partition {p}"))
    }

    /// Opens the stores of partitions `ps` and restores them from the changelog, all at once,
    /// rebuilding a store from scratch when the local copy is ahead of the changelog (a
    /// recreated topic).
    fn open_partitions(
        &self,
        ps: &[i32],
    ) -> anyhow::Result<Vec<(i32, RocksStore, changelog::Restore)>> {
        let stores: Vec<(i32, RocksStore)> = ps
            .iter()
            .map(|&p| Ok((p, self.open_store(p)?)))
            .collect::<anyhow::Result<_>>()?;
        let Some(restorer) = self.restorer() else {
            return Ok(stores
                .into_iter()
                .map(|(p, s)| (p, s, changelog::Restore::default()))
                .collect());
        };
        let refs: Vec<(i32, &RocksStore)> = stores.iter().map(|(p, s)| (*p, s)).collect();
        let results = restorer.restore(&refs)?;
        let mut opened = Vec::with_capacity(stores.len());
        for ((p, store), result) in stores.into_iter().zip(results) {
            match result {
                Restored::Done(stats) => opened.push((p, store, stats)),
                Restored::Ahead { local, end } => {
                    error!(
                        partition = p,
                        local,
                        changelog_end = end,
                        "the local state has restored further than the changelog holds (was the changelog topic recreated?): rebuilding it from the changelog"
                    );
                    drop(store);
                    let dir = self.state_dir(p);
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                    let store = self.open_store(p)?;
                    match restorer.restore(&[(p, &store)])?.pop() {
                        Some(Restored::Done(stats)) => opened.push((p, store, stats)),
                        _ => unreachable!("an empty store is at offset 0"),
                    }
                }
            }
        }
        Ok(opened)
    }

    /// Opens one partition (see [`Core::open_parts`]).
    fn open_part(&mut self, p: i32) -> anyhow::Result<()> {
        self.open_parts(&[p])
    }

    /// Opens partitions' stores, restores them from the changelog together, and makes this
    /// member their writer with the next epoch (the claims go out with the next commit).
    fn open_parts(&mut self, ps: &[i32]) -> anyhow::Result<()> {
        if ps.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let opened = self.open_partitions(ps)?;
        let restore_ms = started.elapsed().as_millis() as u64;
        for (p, store, restored) in opened {
            self.metrics
                .restore_seconds
                .with_label_values(&[&p.to_string()])
                .set(started.elapsed().as_secs_f64());
            self.install_part(p, store, restored, restore_ms)?;
        }
        Ok(())
    }

    /// Makes a restored partition's store this member's: its processor, the claim to send.
    fn install_part(
        &mut self,
        p: i32,
        store: RocksStore,
        restored: changelog::Restore,
        restore_ms: u64,
    ) -> anyhow::Result<()> {
        let changelog_next =
            changelog::meta_i64(store.get(Table::Meta, changelog::META_NEXT.as_bytes())?)
                .unwrap_or(0);
        let epoch = changelog::meta_i64(store.get(Table::Meta, changelog::META_EPOCH.as_bytes())?)
            .unwrap_or(0) as u64
            + 1;
        let mut state = State::new(store)?;
        state.set_cache_limits(
            self.cfg.state.cache_max_users,
            self.cfg.state.cache_max_bytes,
        );
        let mut proc = Processor::new(self.journeys.clone(), state)?;
        proc.set_limits(crate::engine::Limits {
            max_targets: self.cfg.processing.max_targets,
            max_sessions_per_user: self.cfg.processing.max_sessions_per_user,
        });
        proc.set_max_profile_bytes(self.cfg.processing.max_profile_bytes);
        // Keys whose newest changelog record was dropped (a dead writer's unfinished
        // batch, a zombie's) get their value written again once the claim is acknowledged
        // where it should be (see `Part::rewrite`), so that compaction keeps a committed value
        // for them.
        let rewrite: Vec<(Table, Vec<u8>)> = restored.dropped.iter().cloned().collect();
        let rewritten = rewrite.len();
        let changelog_tail = restored.end;
        let restored = restored.stats;
        let mut active: HashMap<String, i64> = HashMap::new();
        proc.state().all_sessions(&mut |_, s| {
            *active.entry(s.journey_id).or_default() += 1;
            true
        })?;
        for (j, n) in &active {
            self.metrics.active_sessions.with_label_values(&[j]).add(*n);
        }
        info!(
            partition = p,
            sessions = active.values().sum::<i64>(),
            restored_records = restored.records,
            restored_batches = restored.batches,
            dropped_stale_batches = restored.stale_batches,
            dropped_unfinished_records = restored.unfinished,
            rewritten_keys = rewritten,
            epoch,
            ms = restore_ms,
            "partition state opened"
        );
        self.parts.insert(
            p,
            Part {
                proc,
                epoch,
                writer: format!("{}-p{p}-e{epoch}", self.incarnation),
                claim: self.restorer.is_some(),
                changelog_next,
                changelog_tail,
                marks: VecDeque::new(),
                rewrite,
                next: HashMap::new(),
                consumed: HashMap::new(),
                dirty_offsets: false,
                active,
            },
        );
        // Sessions of journeys archived while this partition was elsewhere end now.
        let now = self.clock.now_ms();
        let part = self.parts.get_mut(&p).expect("opened above");
        part.proc.archive_sessions(now, &mut self.out)?;
        part.proc.collect_versions()?;
        self.publish(p, None, false);
        self.set_profile_gauge();
        Ok(())
    }

    /// Opens stores for the assigned partitions (restored from the changelog) and points each at
    /// the offset its store reached.
    fn assign(&mut self, tpl: &mut TopicPartitionList) -> anyhow::Result<()> {
        let mut wanted: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        wanted.sort();
        let mut new: Vec<i32> = wanted
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| !self.parts.contains_key(p))
            .collect();
        new.sort();
        new.dedup();
        self.open_parts(&new)?;
        for (topic, p) in &wanted {
            let part = self.parts.get_mut(p).expect("opened above");
            let stored = changelog::meta_i64(part.proc.state().get_meta(&offset_key(topic))?);
            // With no offset in the store, the partition's state is rebuilt from the start of the
            // input (the group's committed offset is only progress, never ahead of the store).
            let next = stored.unwrap_or(0);
            part.next.insert(topic.clone(), next);
            let offset = Offset::Offset(next);
            tpl.set_partition_offset(topic, *p, offset)?;
        }
        self.metrics
            .partitions_assigned
            .set(self.parts.len() as i64);
        Ok(())
    }

    /// Closes every store. Unless the partitions were lost to another member, every batch is
    /// made durable first; lost batches are dropped (their new owner redoes them).
    fn revoke_all(&mut self, consumer: &BaseConsumer<Ctx>, lost: bool) -> anyhow::Result<()> {
        if lost {
            self.drop_batch()?;
        } else {
            self.make_durable(consumer)?;
        }
        self.close_all()
    }

    /// Makes everything processed so far durable before returning: exactly_once commits the
    /// transaction; at_least_once closes the open batch and waits until every batch is written.
    /// Group commits are synchronous meanwhile (this runs in the rebalance callback, or at the
    /// shutdown, where no poll serves their results).
    fn make_durable(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<()> {
        if self.eos {
            return self.commit_batch(consumer);
        }
        let was = std::mem::replace(&mut self.draining, true);
        let result = self.drain(consumer, false);
        self.draining = was;
        result
    }

    /// Drops every batch not yet written, in every partition: staged state (all generations), and
    /// (exactly_once) the open transaction. Under at_least_once, outputs already sent stay sent (the next owner sends the
    /// same records again).
    fn drop_batch(&mut self) -> anyhow::Result<()> {
        if self.eos {
            self.check_fatal()?;
            self.producer
                .abort_transaction(Duration::from_secs(30))
                .map_err(|e| anyhow!("aborting the transaction: {e}"))?;
            self.metrics
                .transactions
                .with_label_values(&["aborted"])
                .inc();
            self.producer
                .begin_transaction()
                .map_err(|e| anyhow!("beginning a transaction: {e}"))?;
        }
        self.producer.context().reset_failures();
        self.pipeline.get_mut().reset();
        self.closed.clear();
        for part in self.parts.values_mut() {
            part.proc.discard()?;
            part.marks.clear();
            part.dirty_offsets = false;
            for (topic, next) in part.next.iter_mut() {
                *next = changelog::meta_i64(part.proc.state().get_meta(&offset_key(topic))?)
                    .unwrap_or(0);
            }
        }
        self.batch_inputs = 0;
        self.batch_started = Instant::now();
        self.set_profile_gauge();
        Ok(())
    }

    fn offsets(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, part) in &self.parts {
            for (topic, next) in &part.next {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*next));
            }
        }
        tpl
    }

    /// Sends an output, routed record or dead letter of the open batch.
    fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        value: &[u8],
        headers: Option<OwnedHeaders>,
        record_time: Option<Millis>,
    ) {
        let gen = self.pipeline.borrow().open();
        self.send_raw(
            Out {
                topic,
                partition,
                key: key.as_bytes(),
                value: Some(value),
                headers,
                opaque: Opaque::record(gen, record_time),
            },
            gen,
        );
    }

    /// Sends one record of batch `gen`, waiting while the producer's queue is full, and counts
    /// it in the pipeline. A record the producer refuses fails its batch.
    fn send_raw(&self, out: Out<'_>, gen: Gen) {
        if super::producer::send(&self.producer, out) {
            self.pipeline.borrow_mut().sent(gen, 1);
        } else {
            self.pipeline.borrow_mut().refused(gen);
        }
    }

    fn dead_letter(&self, m: &BorrowedMessage<'_>, err: &EventError) {
        let reason = err.reason();
        self.metrics.dead_letters.with_label_values(&[reason]).inc();
        // A forwarded input names where it was first read.
        let own = router::Source::new(m.topic(), m.partition(), m.offset());
        let source = router::source(m.headers(), own);
        let headers = router::dead_letter_headers(&format!("{reason}: {err}"), &source);
        let key = m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let payload = m.payload().unwrap_or(&[]);
        self.send(
            &self.cfg.topics.dlq,
            None,
            &key,
            payload,
            Some(headers),
            None,
        );
    }

    fn handle(&mut self, m: &BorrowedMessage<'_>) {
        let (topic, p, offset) = (m.topic(), m.partition(), m.offset());
        let Some(part) = self.parts.get(&p) else {
            warn!(
                topic,
                partition = p,
                "record from a partition this instance does not own"
            );
            return;
        };
        if part.next.get(topic).is_some_and(|&next| offset < next) {
            return; // already applied
        }
        match self
            .parts
            .get_mut(&p)
            .expect("checked above")
            .consumed
            .get(topic)
        {
            Some(c) => c.inc(),
            None => {
                let c = self
                    .metrics
                    .events_consumed
                    .with_label_values(&[topic, &p.to_string()]);
                c.inc();
                let part = self.parts.get_mut(&p).expect("checked above");
                part.consumed.insert(topic.to_string(), c);
            }
        }
        let record_time = m.timestamp().to_millis();
        if let Some(why) = self.poisoned.remove(&(topic.to_string(), p, offset)) {
            // Its outputs cannot be published: it goes to the dead-letter topic unprocessed.
            self.dead_letter(m, &EventError::OutputTooLarge(why));
        } else {
            // Sizes are judged per input.
            if let Some(part) = self.parts.get_mut(&p) {
                part.proc.state_mut().take_largest_write();
            }
            let result = if topic == self.cfg.topics.route {
                self.handle_route(m, p, record_time)
            } else if self.cfg.kafka.profile_topics.iter().any(|t| t == topic) {
                self.handle_profile(m, p, record_time)
            } else {
                self.handle_input(m, p, record_time)
            };
            if let Err(e) = result {
                self.fatal = Some(e);
                return;
            }
            if self.rewind_requested {
                return; // the batch is dropped; this input is met again, poisoned
            }
        }
        let part = self.parts.get_mut(&p).expect("checked above");
        part.next.insert(topic.to_string(), offset + 1);
        part.dirty_offsets = true;
        self.batch_inputs += 1;
    }

    fn handle_input(
        &mut self,
        m: &BorrowedMessage<'_>,
        p: i32,
        record_time: Option<Millis>,
    ) -> anyhow::Result<()> {
        let payload = m.payload().unwrap_or(&[]);
        let raw = match RawEvent::decode(payload, self.cfg.processing.max_event_bytes) {
            Ok(r) => r,
            Err(e) => {
                self.dead_letter(m, &e);
                return Ok(());
            }
        };
        let owner = owner_of(raw.user_id(), self.partitions);
        if owner != p {
            self.forward(m, p, owner, router::Kind::Event, raw.user_id(), record_time);
            return Ok(());
        }
        let default_id = router::Source::new(m.topic(), p, m.offset()).default_id();
        self.process_raw(m, raw, p, record_time, default_id)
    }

    /// Sends an input read on partition `p` to the route topic's partition `owner`, which owns
    /// its user, with where it was read (for its default event id and dead letters).
    fn forward(
        &mut self,
        m: &BorrowedMessage<'_>,
        p: i32,
        owner: i32,
        kind: router::Kind,
        user_id: &str,
        record_time: Option<Millis>,
    ) {
        let payload = m.payload().unwrap_or(&[]);
        let source = router::Source::new(m.topic(), p, m.offset());
        let headers = router::forward_headers(kind, &source, record_time);
        let route = self.cfg.topics.route.clone();
        self.send(&route, Some(owner), user_id, payload, Some(headers), None);
        self.metrics.routed.inc();
    }

    /// A profile topic's record: decoded (a bad one is a dead letter), forwarded to the partition
    /// that owns its user if read elsewhere, else applied.
    fn handle_profile(
        &mut self,
        m: &BorrowedMessage<'_>,
        p: i32,
        record_time: Option<Millis>,
    ) -> anyhow::Result<()> {
        let payload = m.payload().unwrap_or(&[]);
        let record = match crate::profile::decode(payload, self.cfg.processing.max_event_bytes) {
            Ok(r) => r,
            Err(e) => {
                self.dead_letter(m, &e);
                return Ok(());
            }
        };
        let owner = owner_of(record.user_id(), self.partitions);
        if owner != p {
            self.forward(
                m,
                p,
                owner,
                router::Kind::Profile,
                record.user_id(),
                record_time,
            );
            return Ok(());
        }
        self.process_profile(m, &record, p, record_time)
    }

    /// Why an input stamped `time` is refused as too far ahead of the clock, if it is.
    fn in_future(&self, time: Millis) -> Option<EventError> {
        let horizon = self
            .clock
            .now_ms()
            .saturating_add(self.cfg.processing.max_future_ms.min(i64::MAX as u64) as i64);
        (time > horizon).then(|| {
            EventError::InFuture(format!(
                "{} is more than processing.max_future_ms ({} ms) ahead of the clock",
                crate::time::format_millis(time),
                self.cfg.processing.max_future_ms
            ))
        })
    }

    /// Applies a profile record on the partition that owns its user: timed like an event (its
    /// `timestamp`, else the record's); a refused update is a dead letter.
    fn process_profile(
        &mut self,
        m: &BorrowedMessage<'_>,
        record: &crate::profile::ProfileRecord,
        p: i32,
        record_time: Option<Millis>,
    ) -> anyhow::Result<()> {
        let Some(time) = record.time().or(record_time) else {
            self.dead_letter(m, &EventError::NoTime);
            return Ok(());
        };
        if let Some(e) = self.in_future(time) {
            self.dead_letter(m, &e);
            return Ok(());
        }
        let part = self.parts.get_mut(&p).expect("owned");
        let applied = part.proc.on_profile(record, time, &mut self.out)?;
        if self.poison_if_oversized(m, p) {
            return Ok(());
        }
        match applied {
            Ok(ProfileApplied::Updated) => self.metrics.profile_updates.inc(),
            Ok(ProfileApplied::Erased) => self.metrics.erasures.inc(),
            Err(e) => self.dead_letter(m, &e),
        }
        self.set_profile_gauge();
        self.publish(p, record_time, false);
        Ok(())
    }

    /// `waymark_profiles_stored`: the profiles of the partitions this member holds.
    fn set_profile_gauge(&self) {
        let n = self.parts.values().map(|p| p.proc.state().profiles()).sum();
        self.metrics.profiles_stored.set(n);
    }

    fn process_raw(
        &mut self,
        m: &BorrowedMessage<'_>,
        raw: RawEvent<'_>,
        p: i32,
        record_time: Option<Millis>,
        default_id: String,
    ) -> anyhow::Result<()> {
        let Some(time) = raw.timestamp().or(record_time) else {
            self.dead_letter(m, &EventError::NoTime);
            return Ok(());
        };
        if let Some(e) = self.in_future(time) {
            self.dead_letter(m, &e);
            return Ok(());
        }
        let parts = self.partitions;
        let part = self.parts.get_mut(&p).expect("owned");
        let owns = move |u: &str| owner_of(u, parts) == p;
        match part
            .proc
            .on_input(raw, time, || default_id, &owns, &mut self.out)?
        {
            Err(e) => {
                self.dead_letter(m, &e);
                return Ok(());
            }
            Ok(InputApplied::TimersOnly) => {}
            Ok(InputApplied::Event) => {
                if self.poison_if_oversized(m, p) {
                    return Ok(());
                }
                let bad: Vec<&str> = self
                    .out
                    .refused
                    .iter()
                    .filter(|(_, r)| *r == crate::engine::Refusal::BadTargets)
                    .map(|(j, _)| j.as_str())
                    .collect();
                if !bad.is_empty() {
                    // The event was processed for everything else, so it is no dead letter (a
                    // DLQ replay would apply it twice): counted (refusal bad_targets) and logged.
                    tracing::warn!(
                        journeys = %bad.join(", "),
                        topic = m.topic(),
                        partition = p,
                        offset = m.offset(),
                        "the who attribute holds something other than user ids: nobody entered"
                    );
                }
            }
        }
        self.publish(p, record_time, false);
        Ok(())
    }

    fn handle_route(
        &mut self,
        m: &BorrowedMessage<'_>,
        p: i32,
        record_time: Option<Millis>,
    ) -> anyhow::Result<()> {
        let routed = router::read(m.headers());
        let payload = m.payload().unwrap_or(&[]);
        let t = routed.record_time.or(record_time);
        match routed.kind {
            Some(Ok(router::Kind::Event)) => {
                let raw = match RawEvent::decode(payload, 0) {
                    Ok(r) => r,
                    Err(e) => {
                        self.dead_letter(m, &e);
                        return Ok(());
                    }
                };
                let default_id = routed
                    .event_id
                    .unwrap_or_else(|| router::Source::new(m.topic(), p, m.offset()).default_id());
                self.process_raw(m, raw, p, t, default_id)
            }
            Some(Ok(router::Kind::Profile)) => {
                let record = match crate::profile::decode(payload, 0) {
                    Ok(r) => r,
                    Err(e) => {
                        self.dead_letter(m, &e);
                        return Ok(());
                    }
                };
                self.process_profile(m, &record, p, t)
            }
            Some(Ok(router::Kind::Entry)) => {
                let intent: EntryIntent = match serde_json::from_slice(payload) {
                    Ok(i) => i,
                    Err(e) => {
                        self.dead_letter(m, &EventError::NotJson(format!("routed entry: {e}")));
                        return Ok(());
                    }
                };
                let part = self.parts.get_mut(&p).expect("owned");
                part.proc.on_intent(&intent, &mut self.out)?;
                if self.poison_if_oversized(m, p) {
                    return Ok(());
                }
                self.publish(p, record_time, false);
                Ok(())
            }
            other => {
                let other = other.and_then(Result::err);
                self.dead_letter(
                    m,
                    &EventError::WrongType(format!("route record of unknown kind {other:?}")),
                );
                Ok(())
            }
        }
    }

    /// When something the input `m` caused is too large to publish (an output or routed record,
    /// or a state change the changelog would carry), marks the input poisoned and asks for a
    /// rewind: the batch is dropped (its state changes with it) and, met again, the input goes to
    /// the dead-letter topic as `output_too_large` while everything else is processed anew.
    fn poison_if_oversized(&mut self, m: &BorrowedMessage<'_>, p: i32) -> bool {
        let limit = self.max_record_bytes.saturating_sub(RECORD_HEADROOM);
        let part = self.parts.get_mut(&p).expect("owned");
        let largest = part.proc.state_mut().take_largest_write();
        let payload = m.payload().map_or(0, <[u8]>::len);
        let mut why = None;
        if self.cfg.state.changelog && largest > limit {
            why = Some(format!(
                "a state change of {largest} bytes would not fit a changelog record (at most {limit})"
            ));
        }
        // Records carry ids and attributes that the state change or the input also holds, so
        // they are measured only when either is large.
        if why.is_none() && (largest > limit / 8 || payload > limit / 8) {
            for r in &self.out.records {
                let n = r.to_json().len() + r.user_id().len();
                if n > limit {
                    why = Some(format!(
                        "a {} record of {n} bytes (at most {limit})",
                        r.journey_id()
                    ));
                    break;
                }
            }
            for i in &self.out.routed {
                let n = serde_json::to_vec(i).map_or(0, |v| v.len()) + i.user_id.len();
                if why.is_none() && n > limit {
                    why = Some(format!("a routed entry of {n} bytes (at most {limit})"));
                }
            }
        }
        let Some(why) = why else {
            return false;
        };
        warn!(
            topic = m.topic(),
            partition = p,
            offset = m.offset(),
            reason = %why,
            "an input's outputs are too large to publish: dropping the batch, rewinding; the input goes to the dead-letter topic"
        );
        self.poisoned.insert(
            (m.topic().to_string(), p, m.offset()),
            format!("{why}; its outputs were not published and its state change was not applied"),
        );
        self.out.clear();
        self.rewind_requested = true;
        true
    }

    /// Produces what the last input caused and counts it.
    fn publish(&mut self, p: i32, record_time: Option<Millis>, by_wall_clock: bool) {
        let mut out = std::mem::take(&mut self.out);
        let part = self.parts.get_mut(&p).expect("owned");
        for j in &out.triggered {
            self.metrics
                .funnel_triggers
                .with_label_values(&[j.as_str()])
                .inc();
        }
        // The session whose action step without `next` was just left to nowhere: its exit
        // record follows and is not counted as a second way out.
        let mut left_to_nowhere: Option<&str> = None;
        for r in &out.records {
            let journey = r.journey_id();
            match r {
                Record::StepAdvance(m) | Record::JourneyExit(m) => {
                    let exit = matches!(r, Record::JourneyExit(_));
                    if !(exit && left_to_nowhere == Some(m.session_id.as_str())) {
                        self.metrics
                            .funnel_left
                            .with_label_values(&[journey, &m.from, &m.reason])
                            .inc();
                    }
                    if let Some(to) = &m.to {
                        self.metrics
                            .funnel_reached
                            .with_label_values(&[journey, to])
                            .inc();
                    }
                    left_to_nowhere = (!exit && m.to.is_none()).then_some(m.session_id.as_str());
                }
                Record::JourneyEntry(e) => {
                    self.metrics
                        .funnel_reached
                        .with_label_values(&[journey, &e.step])
                        .inc();
                    left_to_nowhere = None;
                }
                Record::Conversion(_) => {}
            }
            match r {
                Record::JourneyEntry(_) => {
                    self.metrics.entries.with_label_values(&[journey]).inc();
                    self.metrics
                        .active_sessions
                        .with_label_values(&[journey])
                        .inc();
                    *part.active.entry(journey.to_string()).or_default() += 1;
                }
                Record::StepAdvance(s) => {
                    self.metrics
                        .steps
                        .with_label_values(&[journey, &s.reason])
                        .inc();
                    if let Some(why) = &s.suppressed {
                        self.metrics
                            .suppressed
                            .with_label_values(&[journey, why])
                            .inc();
                    }
                }
                Record::JourneyExit(s) => {
                    self.metrics
                        .exits
                        .with_label_values(&[journey, &s.reason])
                        .inc();
                    self.metrics
                        .active_sessions
                        .with_label_values(&[journey])
                        .dec();
                    *part.active.entry(journey.to_string()).or_default() -= 1;
                }
                Record::Conversion(c) => self
                    .metrics
                    .conversions
                    .with_label_values(&[journey, &c.goal_id])
                    .inc(),
            }
        }
        for r in out.records.drain(..) {
            let topic = match r.stream() {
                Stream::Entries => &self.cfg.topics.entries,
                Stream::Steps => &self.cfg.topics.steps,
                Stream::Conversions => &self.cfg.topics.conversions,
            };
            self.send(
                topic,
                None,
                r.user_id(),
                r.to_json().as_bytes(),
                None,
                record_time,
            );
        }
        for intent in out.routed.drain(..) {
            let owner = owner_of(&intent.user_id, self.partitions);
            let headers = router::entry_headers();
            let value = serde_json::to_vec(&intent).expect("intents serialise");
            self.send(
                &self.cfg.topics.route,
                Some(owner),
                &intent.user_id,
                &value,
                Some(headers),
                None,
            );
            self.metrics.routed.inc();
        }
        for (journey, reason) in &out.refused {
            self.metrics
                .refused
                .with_label_values(&[journey, reason.as_str()])
                .inc();
            if matches!(
                reason,
                crate::engine::Refusal::TooManyTargets | crate::engine::Refusal::TooManySessions
            ) {
                tracing::warn!(journey = %journey, reason = reason.as_str(), "entry refused at a limit (processing.max_targets / processing.max_sessions_per_user)");
            }
        }
        for journey in &out.matched {
            self.metrics.matched.with_label_values(&[journey]).inc();
        }
        for journey in &out.held {
            self.metrics.quiet_holds.with_label_values(&[journey]).inc();
            self.metrics.quiet_held.with_label_values(&[journey]).inc();
        }
        for journey in &out.released {
            self.metrics
                .quiet_releases
                .with_label_values(&[journey])
                .inc();
            self.metrics.quiet_held.with_label_values(&[journey]).dec();
        }
        if !out.timers_fired.is_empty() {
            self.metrics
                .timers_fired
                .inc_by(out.timers_fired.len() as u64);
            if by_wall_clock {
                let now = self.clock.now_ms();
                for due in &out.timers_fired {
                    self.metrics
                        .timer_lateness
                        .observe(((now - due).max(0)) as f64 / 1000.0);
                }
            }
        }
        out.clear();
        self.out = out;
        if self.batch_inputs % 64 == 0 {
            self.producer.poll(Duration::ZERO);
        }
    }

    /// Whether the batch should be made durable now. The clock is read every 64 inputs only.
    fn batch_due(&self) -> bool {
        if self.batch_inputs >= self.cfg.processing.commit_max_records {
            return true;
        }
        if self.batch_inputs % 64 != 0 {
            return false;
        }
        let interval = Duration::from_millis(if self.eos {
            self.cfg.processing.transaction_interval_ms
        } else {
            self.cfg.processing.commit_interval_ms
        });
        (self.batch_inputs > 0
            || self
                .parts
                .values()
                .any(|p| p.claim || p.proc.state().staged() > 0))
            && self.batch_started.elapsed() >= interval
    }

    /// Stages each partition's input offsets (those that moved) with its open batch.
    fn stage_offsets(&mut self) -> Vec<(String, i32, i64)> {
        let mut moved = Vec::new();
        for (p, part) in self.parts.iter_mut() {
            if part.dirty_offsets {
                for (topic, next) in &part.next {
                    part.proc
                        .state_mut()
                        .stage_meta(&offset_key(topic), next.to_be_bytes().to_vec());
                    moved.push((topic.clone(), *p, *next));
                }
            }
            part.dirty_offsets = false;
        }
        moved
    }

    /// Whether the open batch holds anything to make durable: inputs, staged state, a claim.
    fn batch_open_work(&self) -> bool {
        self.batch_inputs > 0
            || self
                .parts
                .values()
                .any(|p| p.dirty_offsets || p.claim || p.proc.state().staged() > 0)
    }

    /// at_least_once: closes the open batch (its state sealed as a generation in each
    /// partition's `State`) and opens the next; the batch becomes durable later, as the
    /// [`commit`] pipeline says (see [`Core::pump`]). Processing goes on meanwhile.
    fn close_batch(&mut self) {
        self.batch_started = Instant::now();
        if !self.batch_open_work() {
            return;
        }
        let offsets = self.stage_offsets();
        let gen = self.pipeline.get_mut().close();
        for part in self.parts.values_mut() {
            part.proc.state_mut().seal(gen);
        }
        self.closed.push_back(Closed {
            gen,
            at: Instant::now(),
            offsets,
        });
        self.batch_inputs = 0;
        // The changes go out at once unless an older batch's markers are still to be sent.
        if self.pipeline.get_mut().markers_sent_before(gen) {
            self.send_batch_changes(gen);
        }
    }

    /// at_least_once: serves the producer's delivery reports (waiting up to `wait` for one) and
    /// does what the commit pipeline says: send a batch's changelog markers and commit its
    /// offsets, write a batch's state, or drop everything in flight and retry.
    fn pump(&mut self, consumer: &BaseConsumer<Ctx>, wait: Duration) -> anyhow::Result<()> {
        self.producer.poll(wait);
        self.producer.context().take_reports(&mut self.reports);
        {
            let pipeline = self.pipeline.get_mut();
            for (t, ok) in self.reports.drain(..) {
                pipeline.delivered(t, ok);
            }
        }
        loop {
            let action = self.pipeline.get_mut().next_action();
            match action {
                None => return Ok(()),
                Some(Action::SendMarkers(gen)) => self.send_markers(consumer, gen)?,
                Some(Action::Write(gen)) => self.write_batch(consumer, gen)?,
                Some(Action::Retry) => {
                    let ctx = self.producer.context();
                    let permanent = ctx.permanent.swap(false, Ordering::SeqCst);
                    let e = ctx
                        .check()
                        .err()
                        .unwrap_or_else(|| "a record was not delivered".into());
                    if permanent {
                        bail!("a permanent produce error: {e}; state not committed, a restart replays the batch");
                    }
                    self.retry_batch(consumer, anyhow!("{e}"))?;
                }
            }
        }
    }

    /// at_least_once: closes the open batch and waits until every batch in flight is written (or
    /// dropped by a retry). `sealed_only`: leaves the open batch open (it is about to be dropped).
    fn drain(&mut self, consumer: &BaseConsumer<Ctx>, sealed_only: bool) -> anyhow::Result<()> {
        if !sealed_only {
            self.close_batch();
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.pipeline.get_mut().sealed() > 0 {
            if Instant::now() > deadline {
                bail!("records not acknowledged by the broker within 90 s; state not committed, a restart replays them");
            }
            self.pump(consumer, Duration::from_millis(20))?;
        }
        Ok(())
    }

    /// at_least_once: every output, routed record and dead letter of batch `gen` is acknowledged.
    /// Sends the batch's changelog changes and markers (a marker makes its batch part of the
    /// partition's state for whoever restores it next, so it goes out only now: the producer
    /// orders records per partition only, and a marker acknowledged before an output on another
    /// partition would, after a crash, restore past inputs whose outputs never arrived), and
    /// commits its input offsets to the group (a member that has been replaced learns it there).
    fn send_markers(&mut self, consumer: &BaseConsumer<Ctx>, gen: Gen) -> anyhow::Result<()> {
        let n = self.marked + 1;
        if let Some(Failpoint::CrashBeforeChangelog(k)) = self.failpoint {
            if k == n {
                // Outputs acknowledged; neither the changelog nor the local store has the batch.
                error!(
                    commit = n,
                    "failpoint crash_before_changelog: aborting after the outputs were acknowledged, before the batch reaches the changelog or the state"
                );
                std::process::abort();
            }
        }
        if self.failpoint == Some(Failpoint::FailOutputs(n)) {
            self.failpoint = None;
            warn!("failpoint fail_outputs: treating this batch's delivery as failed");
            return self.retry_batch(
                consumer,
                anyhow!("failpoint fail_outputs: a transient delivery failure"),
            );
        }
        self.marked = n;
        let closed = self.closed.iter().find(|c| c.gen == gen);
        if let Some(c) = closed {
            self.metrics
                .commit_seconds
                .with_label_values(&["acks"])
                .observe(c.at.elapsed().as_secs_f64());
        }
        let offsets = closed.map(|c| c.offsets.clone()).unwrap_or_default();
        self.send_batch_changes(gen);
        let mut ps: Vec<i32> = self.parts.keys().copied().collect();
        ps.sort();
        for p in ps {
            self.send_marker(p, gen, Some(gen));
        }
        // The next batch's changes may follow now.
        if let Some(next) = self.pipeline.get_mut().next_sealed_after(gen) {
            self.send_batch_changes(next);
        }
        if offsets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, p, next) in &offsets {
            if self.parts.contains_key(p) {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*next));
            }
        }
        let t0 = Instant::now();
        let mode = if self.draining {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        match consumer.commit(&tpl, mode) {
            Ok(()) => {}
            Err(e) if is_fenced(&e) => return self.fenced(&e),
            Err(e) => {
                warn!(error = %e, "group offset commit failed (progress only; the state store holds the offsets)")
            }
        }
        if self.draining {
            self.metrics
                .commit_seconds
                .with_label_values(&["group"])
                .observe(t0.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// The group says another member owns these partitions now: what is in flight is theirs to
    /// redo. Drops it and closes everything; the group will assign afresh.
    fn fenced(&mut self, e: &dyn std::fmt::Display) -> anyhow::Result<()> {
        self.metrics.fenced.inc();
        warn!(error = %e, "this member was replaced in the group: dropping the uncommitted batches and closing its partitions");
        self.drop_batch()?;
        self.close_all()
    }

    /// at_least_once: batch `gen`'s outputs, changelog changes and markers are acknowledged: its
    /// state goes to each partition's store with the input offsets and changelog position it
    /// reached, in one local batch per partition.
    fn write_batch(&mut self, consumer: &BaseConsumer<Ctx>, gen: Gen) -> anyhow::Result<()> {
        let offsets = match self.closed.iter().position(|c| c.gen == gen) {
            Some(i) => self.closed.remove(i).map(|c| c.offsets).unwrap_or_default(),
            None => Vec::new(),
        };
        self.commits += 1;
        self.retries_in_row = 0;
        if self.failpoint == Some(Failpoint::CrashAfterAcks(self.commits)) {
            error!(
                commit = self.commits,
                "failpoint crash_after_acks: aborting after the outputs and the changelog were acknowledged, before the local state write"
            );
            std::process::abort();
        }
        self.write_parts(consumer, gen, Some(gen))?;
        self.note_committed(offsets.into_iter());
        Ok(())
    }

    /// `waymark_committed_offset`: where each owned partition's durable progress stands.
    fn note_committed(&self, offsets: impl Iterator<Item = (String, i32, i64)>) {
        for (topic, p, next) in offsets {
            if self.parts.contains_key(&p) {
                self.metrics
                    .committed_offset
                    .with_label_values(&[&topic, &p.to_string()])
                    .set(next);
            }
        }
    }

    /// Writes batch `gen` of every partition: `sealed` names the sealed generation to write
    /// (at_least_once), `None` writes what is staged (exactly_once, after the transaction).
    /// A partition whose marker landed where another writer's records are is restored again.
    fn write_parts(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        gen: Gen,
        sealed: Option<Gen>,
    ) -> anyhow::Result<()> {
        let t_state = Instant::now();
        let markers = self.producer.context().take_markers(commit::tag(gen));
        let mut interleaved = Vec::new();
        for (p, part) in self.parts.iter_mut() {
            let mut meta: Vec<(&str, Vec<u8>)> = Vec::new();
            // A marker of this writer was acknowledged where it should be (its first is the
            // claim).
            let mut checked = false;
            if part.marks.front().is_some_and(|m| m.0 == gen) {
                let (_, sent) = part.marks.pop_front().expect("checked");
                let Some(&offset) = markers.get(p) else {
                    bail!(
                        "the changelog marker of partition {p} was acknowledged without an offset"
                    );
                };
                // at_least_once: this writer's records since its last marker should sit right
                // after it. Anything else in between is another writer's: this member may be a
                // zombie whose partition has a newer owner, or a zombie wrote into this owner's
                // batch. Either way the local store cannot take the batch as if it were the
                // changelog's next records (a later restore would start past the other writer's
                // records and never see them): the partition is restored again instead.
                // (exactly_once: transaction markers take offsets too; there the producer fence
                // keeps zombies out.)
                let expected = part.changelog_tail + sent - 1;
                if !self.eos && offset != expected {
                    warn!(
                        partition = p,
                        marker_offset = offset,
                        expected_offset = expected,
                        "another writer's records are between this batch's changelog records: restoring the partition again from the changelog"
                    );
                    self.metrics.changelog_interleaved.inc();
                    part.proc.discard()?;
                    part.marks.clear();
                    part.dirty_offsets = false;
                    interleaved.push(*p);
                    continue;
                }
                part.changelog_tail = offset + 1;
                let next = offset + 1;
                if next < part.changelog_next {
                    error!(
                        partition = p,
                        next,
                        reached = part.changelog_next,
                        "changelog position would go backwards"
                    );
                    bail!(
                        "changelog position of partition {p} would go backwards ({} -> {next})",
                        part.changelog_next
                    );
                }
                part.changelog_next = next;
                checked = true;
                meta.push((changelog::META_NEXT, next.to_be_bytes().to_vec()));
                meta.push((changelog::META_EPOCH, part.epoch.to_be_bytes().to_vec()));
            }
            let state = part.proc.state_mut();
            match sealed {
                Some(g) => {
                    state.commit_sealed(g, &meta)?;
                }
                None => {
                    for (k, v) in meta {
                        state.stage_meta(k, v);
                    }
                    part.proc.commit()?;
                }
            }
            if checked && !part.rewrite.is_empty() {
                // The claim sits where it should: the restore's view is the changelog's, and
                // the dropped keys' values may be written again, with the next batch.
                let state = part.proc.state_mut();
                for (table, key) in std::mem::take(&mut part.rewrite) {
                    let value = state.get(table, &key)?;
                    state.stage(table, key, value);
                }
            }
        }
        self.metrics
            .commit_seconds
            .with_label_values(&["state"])
            .observe(t_state.elapsed().as_secs_f64());
        interleaved.sort();
        for p in interleaved {
            self.reopen(consumer, p)?;
        }
        Ok(())
    }

    /// exactly_once: commits outputs, changelog changes and markers, and input offsets in one
    /// transaction, then writes local state; an abortable error aborts, drops the batch and
    /// rewinds the consumer to the last committed offsets.
    fn commit_batch(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<()> {
        if !self.batch_open_work() {
            self.batch_started = Instant::now();
            return Ok(());
        }
        let t0 = Instant::now();
        self.stage_offsets();
        let gen = self.pipeline.get_mut().open();
        let mut ps: Vec<i32> = self.parts.keys().copied().collect();
        ps.sort();
        for p in ps {
            self.send_changes(p, gen, None);
            self.send_marker(p, gen, None);
        }
        if !self.commit_transaction(consumer)? {
            return Ok(()); // aborted and rewound
        }
        self.metrics
            .commit_seconds
            .with_label_values(&["transaction"])
            .observe(t0.elapsed().as_secs_f64());
        self.commits += 1;
        if self.failpoint == Some(Failpoint::CrashAfterAcks(self.commits)) {
            error!(
                commit = self.commits,
                "failpoint crash_after_acks: aborting after the transaction committed, before the local state write"
            );
            std::process::abort();
        }
        let offsets: Vec<(String, i32, i64)> = self
            .parts
            .iter()
            .flat_map(|(p, part)| part.next.iter().map(move |(t, n)| (t.clone(), *p, *n)))
            .collect();
        self.write_parts(consumer, gen, None)?;
        self.note_committed(offsets.into_iter());
        // The transaction holds every record it counted: the next batch counts afresh.
        self.pipeline.get_mut().reset();
        self.batch_inputs = 0;
        self.batch_started = Instant::now();
        Ok(())
    }

    /// Restores a partition again from the changelog, after another writer's records were found
    /// between this writer's (see `changelog_tail`). The restore applies what any later restore
    /// would: this member's batch if its epoch is still the highest, a zombie's never. If a newer
    /// owner has claimed the partition (an epoch above this writer's), this member is the zombie:
    /// it gives the partition up (the group takes it away at the next rebalance) and counts
    /// itself fenced. Otherwise it claims the partition again with the next epoch and goes on
    /// from the restored input offsets.
    fn reopen(&mut self, consumer: &BaseConsumer<Ctx>, p: i32) -> anyhow::Result<()> {
        let Some(old) = self.parts.remove(&p) else {
            return Ok(());
        };
        for (j, n) in &old.active {
            self.metrics.active_sessions.with_label_values(&[j]).sub(*n);
        }
        let old_epoch = old.epoch;
        let topics = old.next.clone();
        old.proc.state().flush()?;
        drop(old);
        self.open_part(p)?;
        let part = self.parts.get_mut(&p).expect("opened above");
        if part.epoch - 1 > old_epoch {
            warn!(
                partition = p,
                epoch = old_epoch,
                newer_epoch = part.epoch - 1,
                "a newer owner has claimed this partition: giving it up"
            );
            self.metrics.fenced.inc();
            let part = self.parts.remove(&p).expect("opened above");
            for (j, n) in &part.active {
                self.metrics.active_sessions.with_label_values(&[j]).sub(*n);
            }
            part.proc.state().flush()?;
            self.metrics
                .partitions_assigned
                .set(self.parts.len() as i64);
            // Its records are no longer this member's to read.
            let mut tpl = TopicPartitionList::new();
            for topic in topics.keys() {
                tpl.add_partition(topic, p);
            }
            if let Err(e) = consumer.pause(&tpl) {
                warn!(partition = p, error = %e, "pausing a partition given up");
            }
            return Ok(());
        }
        for (topic, consumed_to) in topics {
            let next =
                changelog::meta_i64(part.proc.state().get_meta(&offset_key(&topic))?).unwrap_or(0);
            part.next.insert(topic.clone(), next);
            // Inputs up to the restored offsets are in the restored state (later ones the
            // consumer meets are skipped as applied); a restore behind what was consumed has the
            // consumer read the rest again.
            if next < consumed_to {
                consumer
                    .seek(&topic, p, Offset::Offset(next), Duration::from_secs(10))
                    .map_err(|e| anyhow!("rewinding {topic}/{p} to {next}: {e}"))?;
            }
        }
        Ok(())
    }

    /// at_least_once: a batch whose records were not all delivered. A permanent error stops the
    /// service with it; anything else (a broker restart, a timeout) drops every batch not yet
    /// written, rewinds to the last written offsets and goes on after a backoff, under a new
    /// changelog writer name so that a restore never applies the dropped batches' records.
    /// Counted in `waymark_batch_retries_total`.
    fn retry_batch(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        e: anyhow::Error,
    ) -> anyhow::Result<()> {
        if self
            .producer
            .context()
            .permanent
            .swap(false, Ordering::SeqCst)
        {
            return Err(e.context("a permanent produce error"));
        }
        self.retries_in_row += 1;
        self.metrics.batch_retries.inc();
        let backoff = Duration::from_millis(200u64 << self.retries_in_row.min(7))
            .min(Duration::from_secs(20));
        warn!(error = %e, retry = self.retries_in_row, backoff_ms = backoff.as_millis() as u64, "batch not delivered: dropping it, rewinding to the last committed offsets and retrying");
        // Records of the dropped batches may be in the changelog without their marker: a new
        // writer name leaves them unfinished for good (a restore drops them).
        for (p, part) in self.parts.iter_mut() {
            part.writer = format!(
                "{}-p{p}-e{}-r{}",
                self.incarnation, part.epoch, self.retries_total
            );
            part.claim = self.restorer.is_some();
        }
        self.retries_total += 1;
        // Whether any of their records landed is unknown: counted as none (the marks are
        // dropped), so if some did, the next marker is found out of place and the partition
        // restored again (always safe).
        self.rewind(consumer)?;
        std::thread::sleep(backoff);
        Ok(())
    }

    fn writer_header(&self, part: &Part) -> OwnedHeaders {
        OwnedHeaders::new()
            .insert(Header {
                key: changelog::HEADER_WRITER,
                value: Some(&part.writer),
            })
            .insert(Header {
                key: changelog::HEADER_GROUP,
                value: Some(&self.cfg.kafka.group_id),
            })
    }

    /// Sends partition `p`'s changes of batch `gen` to the changelog (until its marker follows,
    /// a restore ignores them). `sealed`: the sealed generation's changes (at_least_once),
    /// `None`: the open batch's (exactly_once).
    fn send_changes(&mut self, p: i32, gen: Gen, sealed: Option<Gen>) {
        let Some(part) = self.parts.get(&p) else {
            return;
        };
        if self.restorer.is_none() {
            return;
        }
        let state = part.proc.state();
        let writes: Box<dyn Iterator<Item = _>> = match sealed {
            Some(g) => Box::new(state.sealed_writes(g)),
            None => Box::new(state.pending()),
        };
        let topic = &self.cfg.topics.changelog;
        let mut n = 0i64;
        for (table, key, value) in writes {
            if changelog::is_local_meta(table, key) {
                continue;
            }
            let k = changelog::record_key(table, key);
            self.send_raw(
                Out {
                    topic,
                    partition: Some(p),
                    key: &k,
                    value,
                    headers: Some(self.writer_header(part)),
                    opaque: Opaque::record(gen, None),
                },
                gen,
            );
            n += 1;
        }
        if n > 0 {
            self.metrics.changelog_records.inc_by(n as u64);
            let part = self.parts.get_mut(&p).expect("checked above");
            part.marks.push_back((gen, n));
        }
    }

    /// Sends partition `p`'s marker of batch `gen`, after its changes, if it owes one: changes,
    /// or a claim. A partition opened after the batch closed has no part in it (its claim goes
    /// with its own first batch).
    fn send_marker(&mut self, p: i32, gen: Gen, sealed: Option<Gen>) {
        let Some(part) = self.parts.get(&p) else {
            return;
        };
        let state = part.proc.state();
        let ops = match sealed {
            Some(g) => match state.sealed_ops(g) {
                Some(n) => n,
                None => return,
            },
            None => state.staged(),
        };
        if self.restorer.is_none() || !(part.claim || ops > 0) {
            return;
        }
        self.send_raw(
            Out {
                topic: &self.cfg.topics.changelog,
                partition: Some(p),
                key: &changelog::marker_key(&part.writer),
                value: Some(&changelog::marker_value(part.epoch)),
                headers: Some(self.writer_header(part)),
                opaque: Opaque::marker(gen, p),
            },
            gen,
        );
        self.metrics.changelog_records.inc();
        let part = self.parts.get_mut(&p).expect("checked above");
        match part.marks.back_mut() {
            Some((g, n)) if *g == gen => *n += 1,
            _ => part.marks.push_back((gen, 1)),
        }
        part.claim = false;
    }

    /// at_least_once: sends sealed batch `gen`'s changes to the changelog of every partition, if
    /// not sent yet. Each batch's changes go after the markers of every older batch (a restore
    /// applies all of a writer's records up to its marker: the next batch's changes must not
    /// come before this batch's marker).
    fn send_batch_changes(&mut self, gen: Gen) {
        if gen <= self.changes_sent {
            return;
        }
        self.changes_sent = gen;
        let mut ps: Vec<i32> = self.parts.keys().copied().collect();
        ps.sort();
        for p in ps {
            self.send_changes(p, gen, Some(gen));
        }
    }

    /// exactly_once: adds the input offsets to the open transaction and commits it. A timeout is
    /// retried (never aborted: the commit may have happened); an abortable error aborts and
    /// rewinds (returns false); anything else is fatal.
    fn commit_transaction(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<bool> {
        let timeout = Duration::from_millis(self.cfg.kafka.commit_timeout_ms);
        let offsets = self.offsets();
        // Delivery failures surface as an abortable transaction error; a record the producer
        // refused to queue never joined the transaction, so committing would lose it: abort too.
        let refused = self.producer.context().refused.swap(0, Ordering::SeqCst);
        self.check_fatal()?;
        let attempt: Result<(), (bool, String)> = (|| {
            if refused > 0 {
                return Err((true, format!("{refused} record(s) refused by the producer")));
            }
            let metrics = &self.metrics;
            let classify = |e: KafkaError| match &e {
                KafkaError::Transaction(t) => {
                    if is_producer_fenced(t.code()) {
                        metrics.fenced.inc();
                    }
                    (t.txn_requires_abort(), e.to_string())
                }
                _ => (false, e.to_string()),
            };
            if offsets.count() > 0 {
                let gm = consumer
                    .group_metadata()
                    .ok_or((false, "no consumer group metadata".to_string()))?;
                loop {
                    match self
                        .producer
                        .send_offsets_to_transaction(&offsets, &gm, timeout)
                    {
                        Ok(()) => break,
                        Err(KafkaError::Transaction(e))
                            if e.is_retriable() && !e.txn_requires_abort() =>
                        {
                            self.note_retry(&e, "adding the input offsets to the transaction");
                        }
                        Err(e) => return Err(classify(e)),
                    }
                }
            }
            loop {
                match self.producer.commit_transaction(timeout) {
                    Ok(()) => return Ok(()),
                    // The commit waits for every record's acknowledgement before it sends
                    // anything: when that wait times out, nothing was committed, and an abort is
                    // safe (records stuck behind an abortable error never arrive otherwise).
                    Err(KafkaError::Flush(e)) => {
                        return Err((
                            true,
                            format!("records not acknowledged within kafka.commit_timeout_ms ({e}); the commit was not sent"),
                        ))
                    }
                    Err(KafkaError::Transaction(e))
                        if e.is_retriable() && !e.txn_requires_abort() =>
                    {
                        // Never abort after a timeout: the commit may have happened.
                        self.note_retry(&e, "the transaction commit");
                    }
                    Err(e) => {
                        return Err(classify(e));
                    }
                }
            }
        })();
        match attempt {
            Ok(()) => {
                self.aborts_in_row = 0;
                self.metrics
                    .transactions
                    .with_label_values(&["committed"])
                    .inc();
                self.producer
                    .begin_transaction()
                    .map_err(|e| anyhow!("beginning a transaction: {e}"))?;
                Ok(true)
            }
            Err((true, e)) => {
                self.aborts_in_row += 1;
                if self.aborts_in_row > MAX_ABORTS_IN_ROW {
                    bail!("{MAX_ABORTS_IN_ROW} transactions in a row aborted, the last with: {e}");
                }
                let backoff = abort_backoff(self.aborts_in_row);
                warn!(error = %e, aborts_in_row = self.aborts_in_row, backoff_ms = backoff.as_millis() as u64, "transaction aborted: dropping the batch and rewinding to the last committed offsets");
                self.rewind(consumer)?;
                std::thread::sleep(backoff);
                Ok(false)
            }
            Err((false, e)) => {
                if self.metrics.fenced.get() == 0 {
                    self.check_fatal()?;
                }
                Err(anyhow!(
                    "transaction failed and cannot be recovered in this process: {e}"
                ))
            }
        }
    }

    /// Counts and logs a transaction step that timed out and is tried again.
    fn note_retry(&self, e: &rdkafka::error::RDKafkaError, what: &str) {
        self.metrics
            .transactions
            .with_label_values(&["commit_retried"])
            .inc();
        warn!(error = %e, "{what} not confirmed yet; retrying");
    }

    /// exactly_once: a producer in a fatal state (fenced by a newer instance with the same
    /// transactional.id, or another unrecoverable error) stops the service.
    fn check_fatal(&self) -> anyhow::Result<()> {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            if is_producer_fenced(code) {
                self.metrics.fenced.inc();
                bail!("this instance's transactional producer was fenced by a newer one ({code:?}: {reason}); stopping without committing");
            }
            bail!("the transactional producer failed ({code:?}: {reason}); stopping without committing");
        }
        Ok(())
    }

    /// Aborts the open transaction, drops the batch and points the consumer back at the offsets
    /// the stores hold (the last committed ones).
    fn rewind(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<()> {
        self.drop_batch()?;
        for (p, part) in self.parts.iter_mut() {
            for (topic, next) in &part.next {
                consumer
                    .seek(topic, *p, Offset::Offset(*next), Duration::from_secs(10))
                    .map_err(|e| anyhow!("rewinding {topic}/{p} to {next}: {e}"))?;
            }
            // Entries and exits of the dropped batch were counted: count again.
            for (j, n) in part.active.drain() {
                self.metrics.active_sessions.with_label_values(&[&j]).sub(n);
            }
            part.proc.state().all_sessions(&mut |_, s| {
                *part.active.entry(s.journey_id).or_default() += 1;
                true
            })?;
            for (j, n) in &part.active {
                self.metrics.active_sessions.with_label_values(&[j]).add(*n);
            }
        }
        Ok(())
    }

    /// Closes every partition's store without committing (after the batch was dropped).
    fn close_all(&mut self) -> anyhow::Result<()> {
        for (p, part) in self.parts.drain() {
            for (j, n) in &part.active {
                self.metrics.active_sessions.with_label_values(&[j]).sub(*n);
            }
            part.proc.state().flush()?;
            info!(partition = p, "partition state closed");
        }
        self.metrics.partitions_assigned.set(0);
        self.set_profile_gauge();
        Ok(())
    }

    /// Loads the journeys directory again: applies the new set whole, or refuses it whole and
    /// keeps the current one. Sessions stay on the version they entered with; sessions of
    /// journeys now archived end.
    fn reload(&mut self) -> anyhow::Result<()> {
        match crate::journey::load_dir(&self.cfg.journeys.dir) {
            Err(e) => {
                warn!(
                    problems = e.0.len(),
                    "journey reload refused, keeping the current set: {}",
                    e.to_string().replace('\n', " ")
                );
            }
            Ok(set) => {
                let set = Arc::new(set);
                self.journeys = set.clone();
                let now = self.clock.now_ms();
                let mut ps: Vec<i32> = self.parts.keys().copied().collect();
                ps.sort();
                for p in ps {
                    let part = self.parts.get_mut(&p).expect("listed");
                    part.proc.set_journeys(set.clone());
                    part.proc.archive_sessions(now, &mut self.out)?;
                    let dropped = part.proc.collect_versions()?;
                    if dropped > 0 {
                        info!(
                            partition = p,
                            versions = dropped,
                            "journey versions no session is on any more: forgotten"
                        );
                    }
                    self.publish(p, None, false);
                }
                info!(journeys = set.len(), "journeys reloaded");
            }
        }
        Ok(())
    }

    /// Fires wall-clock timers on caught-up partitions and refreshes the lag gauges.
    fn tick(&mut self, high: &HashMap<(String, i32), i64>, idle: bool) -> anyhow::Result<()> {
        self.last_tick = Instant::now();
        let now = self.clock.now_ms();
        let mut ps: Vec<i32> = self.parts.keys().copied().collect();
        ps.sort();
        for p in ps {
            let mut caught_up = true;
            let topics: Vec<String> = self
                .cfg
                .kafka
                .input_topics
                .iter()
                .chain(&self.cfg.kafka.profile_topics)
                .chain(std::iter::once(&self.cfg.topics.route))
                .cloned()
                .collect();
            for topic in &topics {
                let next = self.parts[&p].next.get(topic).copied();
                match high.get(&(topic.clone(), p)).copied() {
                    Some(high) if high >= 0 => {
                        let lag = (high - next.unwrap_or(high)).max(0);
                        self.metrics
                            .lag
                            .with_label_values(&[topic, &p.to_string()])
                            .set(lag);
                        if lag > 0 {
                            caught_up = false;
                        }
                    }
                    _ => {
                        if !idle {
                            caught_up = false;
                        }
                    }
                }
            }
            if caught_up {
                let part = self.parts.get_mut(&p).expect("listed");
                if part.proc.next_timer().is_some_and(|n| n <= now) {
                    part.proc.fire_due(now, &mut self.out)?;
                    self.publish(p, None, true);
                }
            }
        }
        Ok(())
    }
}

struct Ctx {
    core: Arc<Mutex<Core>>,
    metrics: Arc<Metrics>,
    /// High watermarks by (topic, partition), from the client's statistics.
    high: Mutex<HashMap<(String, i32), i64>>,
    /// An asynchronous offset commit found this member replaced in the group.
    fenced: AtomicBool,
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        let mut high = self.high.lock().expect("not poisoned");
        for (name, topic) in stats.topics {
            for (p, part) in topic.partitions {
                if p >= 0 && part.hi_offset >= 0 {
                    high.insert((name.clone(), p), part.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.metrics.rebalances.inc();
        let mut core = self.core.lock().expect("not poisoned");
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.metrics.set_ready(false);
                info!(
                    partitions = tpl.count(),
                    "rebalance: assignment received; opening and restoring its partitions"
                );
                match core.assign(tpl) {
                    Ok(()) => {
                        if let Err(e) = consumer.assign(tpl) {
                            core.fatal = Some(anyhow!("assigning partitions: {e}"));
                        } else if let Err(e) = consumer.resume(tpl) {
                            // librdkafka keeps an application pause across an unassign and a new
                            // assignment: a partition given up as a zombie's (paused) and assigned
                            // again would never be fetched.
                            core.fatal = Some(anyhow!("resuming assigned partitions: {e}"));
                        } else if let Err(e) = if core.eos {
                            Ok(())
                        } else {
                            core.make_durable(consumer)
                        } {
                            // The claim markers (and records of archived sessions) go out now.
                            core.fatal = Some(e);
                        } else {
                            let ps: Vec<String> = tpl
                                .elements()
                                .iter()
                                .map(|e| format!("{}/{}", e.topic(), e.partition()))
                                .collect();
                            info!(partitions = %ps.join(","), "rebalance: partitions assigned");
                            self.metrics.set_ready(true);
                        }
                    }
                    Err(e) => core.fatal = Some(e),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.metrics.set_ready(false);
                let lost = consumer.assignment_lost();
                match core.revoke_all(consumer, lost) {
                    Ok(()) => {
                        if lost {
                            self.metrics.fenced.inc();
                            warn!("rebalance: partitions lost to another member; uncommitted work dropped");
                        } else {
                            info!("rebalance: partitions revoked");
                        }
                    }
                    Err(e) => core.fatal = Some(e),
                }
                let _ = consumer.unassign();
            }
            other => {
                error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {}
            // The processing thread drops what is in flight and closes its partitions.
            Err(e) if is_fenced(&e) => self.fenced.store(true, Ordering::SeqCst),
            Err(e) => {
                warn!(error = %e, "group offset commit failed (progress only; the state store holds the offsets)")
            }
        }
    }
}

/// What the journeys directory holds: names, sizes and modification times of its files.
fn dir_signature(dir: &std::path::Path) -> Vec<(String, u64, Option<std::time::SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((
                        e.file_name().to_string_lossy().into_owned(),
                        m.len(),
                        m.modified().ok(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The instance's stable name, kept in the state directory (created on first start).
fn instance_id(state_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = state_dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let id = format!("{:016x}", rand::random::<u64>());
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// Runs the service until `shutdown` is set; returns after draining and committing.
pub fn run(
    cfg: Config,
    journeys: Arc<JourneySet>,
    metrics: Arc<Metrics>,
    partitions: i32,
    shutdown: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let eos = cfg.processing.guarantee == Guarantee::ExactlyOnce;
    let instance = instance_id(&cfg.state.dir)?;
    let mut pc = producer_config(&cfg.kafka.brokers);
    if eos {
        let id = if cfg.kafka.transactional_id.is_empty() {
            format!("waymark-{}-{instance}", cfg.kafka.group_id)
        } else {
            cfg.kafka.transactional_id.clone()
        };
        pc.set("transactional.id", &id).set(
            "transaction.timeout.ms",
            cfg.kafka.transaction_timeout_ms.to_string(),
        );
        info!(transactional_id = %id, "exactly_once: transactional producer");
    }
    let mut delivery = Delivery::tracking(metrics.latency.clone());
    // exactly_once: the transaction judges the deliveries; nobody reads the reports.
    delivery.track = !eos;
    let producer: BaseProducer<Delivery> = pc
        .create_with_context(delivery)
        .context("creating the producer")?;
    if eos {
        producer
            .init_transactions(Duration::from_secs(60))
            .context("initialising transactions (does the broker support them?)")?;
        producer
            .begin_transaction()
            .context("beginning a transaction")?;
    }
    let restorer: Option<BaseConsumer> = if cfg.state.changelog {
        Some(
            super::apply_consumer_properties(
                super::base_config(&cfg.kafka.brokers)
                    .set("group.id", format!("{}-restore", cfg.kafka.group_id))
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    .set("enable.partition.eof", "true")
                    .set("isolation.level", "read_committed")
                    .set("fetch.wait.max.ms", "50"),
            )
            .create()
            .context("creating the changelog reader")?,
        )
    } else {
        None
    };
    let core = Arc::new(Mutex::new(Core {
        cfg: cfg.clone(),
        journeys,
        metrics: metrics.clone(),
        producer,
        restorer,
        eos,
        incarnation: format!("{instance}.{:08x}", rand::random::<u32>()),
        partitions,
        parts: HashMap::new(),
        out: Output::default(),
        batch_inputs: 0,
        batch_started: Instant::now(),
        fatal: None,
        last_tick: Instant::now(),
        clock: Clock::shifted(cfg.processing.clock_offset_ms),
        commits: 0,
        failpoint: failpoint()?,
        aborts_in_row: 0,
        poisoned: HashMap::new(),
        rewind_requested: false,
        max_record_bytes: cfg.max_record_bytes(),
        retries_in_row: 0,
        retries_total: 0,
        pipeline: RefCell::new(Pipeline::new(cfg.processing.max_batches_in_flight)),
        closed: VecDeque::new(),
        marked: 0,
        draining: false,
        reports: Vec::new(),
        changes_sent: 0,
    }));
    let session_timeout = cfg.kafka.session_timeout_ms.max(1000);
    let mut consumer = super::base_config(&cfg.kafka.brokers);
    consumer
        .set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", session_timeout.to_string())
        .set(
            "heartbeat.interval.ms",
            (session_timeout / 4).max(250).to_string(),
        )
        .set("max.poll.interval.ms", "300000")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "100")
        .set("statistics.interval.ms", "1000");
    let consumer: BaseConsumer<Ctx> = super::apply_consumer_properties(&mut consumer)
        .create_with_context(Ctx {
            core: core.clone(),
            metrics: metrics.clone(),
            high: Mutex::new(HashMap::new()),
            fenced: AtomicBool::new(false),
        })
        .context("creating the consumer")?;
    let mut topics: Vec<&str> = cfg
        .kafka
        .input_topics
        .iter()
        .chain(&cfg.kafka.profile_topics)
        .map(String::as_str)
        .collect();
    topics.push(&cfg.topics.route);
    consumer.subscribe(&topics).context("subscribing")?;
    info!(topics = %topics.join(","), group = %cfg.kafka.group_id, partitions, "consuming");
    let tick = Duration::from_millis(cfg.processing.timer_tick_ms);
    let mut loops: u64 = 0;
    let mut journeys_seen = dir_signature(&cfg.journeys.dir);
    let mut last_look = Instant::now();
    while !shutdown.load(Ordering::SeqCst) {
        // Back-pressure: with as many batches waiting for acknowledgements as allowed, no input
        // is read until the oldest is written.
        let full = !eos
            && core
                .lock()
                .expect("not poisoned")
                .pipeline
                .get_mut()
                .is_full();
        let msg = if full {
            None
        } else {
            consumer.poll(Duration::from_millis(20))
        };
        let mut core = core.lock().expect("not poisoned");
        if let Some(e) = core.fatal.take() {
            return Err(e);
        }
        if consumer.context().fenced.swap(false, Ordering::SeqCst) {
            core.fenced(&"an offset commit was refused: unknown member or generation")?;
            continue;
        }
        let idle = match msg {
            Some(Ok(m)) => {
                core.handle(&m);
                false
            }
            Some(Err(e)) => {
                warn!(error = %e, "consumer error");
                true
            }
            None => true,
        };
        if let Some(e) = core.fatal.take() {
            return Err(e);
        }
        if std::mem::take(&mut core.rewind_requested) {
            // Batches closed before the poisoned input are made durable; the open one is dropped.
            if !eos {
                core.drain(&consumer, true)?;
            }
            core.rewind(&consumer)?;
            continue;
        }
        let due = core.batch_due() || (idle && core.batch_inputs > 0);
        if eos {
            if due {
                core.commit_batch(&consumer)?;
            }
        } else {
            if due {
                core.close_batch();
            }
            if full {
                core.pump(&consumer, Duration::from_millis(10))?;
            } else if due || idle || core.batch_inputs % 64 == 0 {
                core.pump(&consumer, Duration::ZERO)?;
            }
        }
        loops = loops.wrapping_add(1);
        // Journey changes: SIGHUP, or a file of the directory changed (looked at every 2 s).
        if (idle || loops % 64 == 0) && last_look.elapsed() >= Duration::from_secs(2) {
            last_look = Instant::now();
            let now_seen = dir_signature(&cfg.journeys.dir);
            if now_seen != journeys_seen {
                journeys_seen = now_seen;
                reload.store(true, Ordering::SeqCst);
            }
        }
        if reload.swap(false, Ordering::SeqCst) {
            core.reload()?;
        }
        if (idle || loops % 64 == 0) && core.last_tick.elapsed() >= tick {
            let high = consumer
                .context()
                .high
                .lock()
                .expect("not poisoned")
                .clone();
            core.tick(&high, idle)?;
        }
    }
    info!("shutting down: finishing in-flight records");
    {
        let mut core = core.lock().expect("not poisoned");
        if let Some(Failpoint::DrainDelay(ms)) = core.failpoint {
            warn!(ms, "failpoint drain_delay: waiting before the drain");
            std::thread::sleep(Duration::from_millis(ms));
        }
        core.draining = true;
        core.revoke_all(&consumer, false)?;
        core.producer.flush(Duration::from_secs(30)).ok();
    }
    metrics.set_ready(false);
    consumer.unsubscribe();
    drop(consumer);
    info!("stopped");
    Ok(())
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
