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
//! Every `commit_interval_ms` (or `commit_max_records` inputs) the batch is made durable in this
//! order: wait until the broker has acknowledged every output, then write each partition's state
//! changes together with the input offsets they reach in one RocksDB batch, then commit the
//! offsets to the group (progress for lag tools). A crash at any point replays from the store's
//! offsets: outputs may repeat, with the same deterministic ids, and none is lost.
//!
//! Timers: while a partition works through a backlog they fire by event time, before the first
//! event at or past their due time; once it is caught up (no lag), every `timer_tick_ms` it fires
//! the timers due by the wall clock. The records' `at` is the due time either way.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use super::{owner_of, producer_config};
use crate::config::Config;
use crate::engine::EntryIntent;
use crate::event::{EventError, RawEvent};
use crate::journey::JourneySet;
use crate::metrics::Metrics;
use crate::processor::{Output, Processor};
use crate::record::{Record, Stream};
use crate::store::rocks::RocksStore;
use crate::store::State;
use crate::time::Millis;

pub const HEADER_KIND: &str = "waymark-kind";
pub const HEADER_EVENT_ID: &str = "waymark-event-id";
pub const HEADER_RECORD_TIME: &str = "waymark-record-time";
pub const HEADER_ERROR: &str = "waymark-error";
pub const HEADER_SOURCE_TOPIC: &str = "waymark-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "waymark-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "waymark-source-offset";

fn header(m: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    m.headers().and_then(|h| {
        h.iter()
            .find(|x| x.key == name)
            .and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned()))
    })
}

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

/// Counts delivery failures reported by the producer and, for output records, observes the
/// latency from the input record's timestamp to the broker's acknowledgement. A record's delivery
/// opaque is that timestamp in epoch milliseconds (0: not an output record).
#[derive(Default)]
pub struct Delivery {
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
    latency: Option<prometheus::Histogram>,
}

impl Delivery {
    /// `Err` with the count and the last error if any delivery failed since the last check.
    pub fn check(&self) -> Result<(), String> {
        let failed = self.failed.swap(0, Ordering::SeqCst);
        if failed == 0 {
            return Ok(());
        }
        let last = self.last_error.lock().expect("not poisoned").clone();
        Err(format!(
            "{failed} record(s) not delivered (last error: {})",
            last.unwrap_or_default()
        ))
    }
}

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, record_time: usize) {
        match result {
            Err((e, msg)) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                *self.last_error.lock().expect("not poisoned") =
                    Some(format!("{e} (topic {})", msg.topic()));
            }
            Ok(_) => {
                if let (Some(h), true) = (&self.latency, record_time > 0) {
                    let now = Clock::system().now_ms();
                    h.observe(((now - record_time as i64).max(0)) as f64 / 1000.0);
                }
            }
        }
    }
}

/// One owned partition number: its store, and the next offset to apply per topic.
struct Part {
    proc: Processor<RocksStore>,
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
    partitions: i32,
    parts: HashMap<i32, Part>,
    out: Output,
    batch_inputs: usize,
    batch_started: Instant,
    fatal: Option<anyhow::Error>,
    last_tick: Instant,
    clock: Clock,
}

impl Core {
    fn state_dir(&self, p: i32) -> PathBuf {
        self.cfg.state.dir.join(format!("partition-{p}"))
    }

    /// Opens stores for the assigned partitions and points each at the offset its store reached.
    fn assign(&mut self, tpl: &mut TopicPartitionList) -> anyhow::Result<()> {
        let mut wanted: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        wanted.sort();
        for (topic, p) in &wanted {
            if !self.parts.contains_key(p) {
                let started = Instant::now();
                let store = RocksStore::open(&self.state_dir(*p), self.cfg.state.sync)
                    .with_context(|| format!("opening the state of partition {p}"))?;
                let proc = Processor::new(self.journeys.clone(), State::new(store)?)?;
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
                    ms = started.elapsed().as_millis() as u64,
                    "partition state opened"
                );
                self.parts.insert(
                    *p,
                    Part {
                        proc,
                        next: HashMap::new(),
                        consumed: HashMap::new(),
                        dirty_offsets: false,
                        active,
                    },
                );
                // Sessions of journeys archived while this partition was elsewhere end now.
                let now = self.clock.now_ms();
                let part = self.parts.get_mut(p).expect("opened above");
                part.proc.archive_sessions(now, &mut self.out)?;
                self.publish(*p, None, false);
            }
            let part = self.parts.get_mut(p).expect("opened above");
            let stored = part
                .proc
                .state()
                .get_meta(&offset_key(topic))?
                .and_then(|v| v.try_into().ok())
                .map(i64::from_be_bytes);
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

    /// Makes the batch durable, then closes every store. Returns the offsets to commit.
    fn revoke_all(&mut self) -> anyhow::Result<TopicPartitionList> {
        self.commit_batch()?;
        let tpl = self.offsets();
        for (p, part) in self.parts.drain() {
            for (j, n) in &part.active {
                self.metrics.active_sessions.with_label_values(&[j]).sub(*n);
            }
            part.proc.state().flush()?;
            info!(partition = p, "partition state closed");
        }
        self.metrics.partitions_assigned.set(0);
        Ok(tpl)
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

    fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        value: &[u8],
        headers: Option<OwnedHeaders>,
        record_time: Option<Millis>,
    ) {
        let opaque = record_time.map_or(0, |t| t.max(0) as usize);
        let mut rec = BaseRecord::with_opaque_to(topic, opaque)
            .key(key)
            .payload(value);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => return,
                Err((e, r)) => {
                    if matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        )
                    ) {
                        self.producer.poll(Duration::from_millis(50));
                        rec = r;
                    } else {
                        // Counted like a failed delivery: the batch will not commit.
                        self.producer
                            .context()
                            .failed
                            .fetch_add(1, Ordering::SeqCst);
                        *self
                            .producer
                            .context()
                            .last_error
                            .lock()
                            .expect("not poisoned") = Some(e.to_string());
                        return;
                    }
                }
            }
        }
    }

    fn dead_letter(&self, m: &BorrowedMessage<'_>, err: &EventError) {
        let reason = err.reason();
        self.metrics.dead_letters.with_label_values(&[reason]).inc();
        // A forwarded event names where it was first read.
        let topic = header(m, HEADER_SOURCE_TOPIC).unwrap_or_else(|| m.topic().to_string());
        let partition =
            header(m, HEADER_SOURCE_PARTITION).unwrap_or_else(|| m.partition().to_string());
        let offset = header(m, HEADER_SOURCE_OFFSET).unwrap_or_else(|| m.offset().to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_ERROR,
                value: Some(&format!("{reason}: {err}")),
            })
            .insert(Header {
                key: HEADER_SOURCE_TOPIC,
                value: Some(&topic),
            })
            .insert(Header {
                key: HEADER_SOURCE_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: HEADER_SOURCE_OFFSET,
                value: Some(&offset),
            });
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
        let result = if topic == self.cfg.topics.route {
            self.handle_route(m, p, record_time)
        } else {
            self.handle_input(m, p, record_time)
        };
        if let Err(e) = result {
            self.fatal = Some(e);
            return;
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
        let default_id = format!("{}/{}/{}", m.topic(), p, m.offset());
        let owner = owner_of(raw.user_id(), self.partitions);
        if owner != p {
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_KIND,
                    value: Some("event"),
                })
                .insert(Header {
                    key: HEADER_EVENT_ID,
                    value: Some(&default_id),
                })
                .insert(Header {
                    key: HEADER_SOURCE_TOPIC,
                    value: Some(m.topic()),
                })
                .insert(Header {
                    key: HEADER_SOURCE_PARTITION,
                    value: Some(&p.to_string()),
                })
                .insert(Header {
                    key: HEADER_SOURCE_OFFSET,
                    value: Some(&m.offset().to_string()),
                });
            if let Some(t) = record_time {
                headers = headers.insert(Header {
                    key: HEADER_RECORD_TIME,
                    value: Some(&t.to_string()),
                });
            }
            let route = self.cfg.topics.route.clone();
            self.send(
                &route,
                Some(owner),
                raw.user_id(),
                payload,
                Some(headers),
                None,
            );
            self.metrics.routed.inc();
            return Ok(());
        }
        self.process_raw(m, raw, p, record_time, default_id)
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
        let parts = self.partitions;
        let part = self.parts.get_mut(&p).expect("owned");
        if part
            .proc
            .engine()
            .journeys()
            .interest(raw.application(), raw.name())
            .is_none()
        {
            part.proc.fire_due(time, &mut self.out)?;
        } else {
            let ev = match raw.into_event(Some(time), || default_id) {
                Ok(ev) => ev,
                Err(e) => {
                    self.dead_letter(m, &e);
                    return Ok(());
                }
            };
            let owns = move |u: &str| owner_of(u, parts) == p;
            part.proc.on_event(&ev, &owns, &mut self.out)?;
            let bad: Vec<&str> = self
                .out
                .refused
                .iter()
                .filter(|(_, r)| *r == crate::engine::Refusal::BadTargets)
                .map(|(j, _)| j.as_str())
                .collect();
            if !bad.is_empty() {
                // Still processed for everything else; the copy in the dead-letter topic says why
                // nobody entered.
                let err = EventError::BadTargets(format!(
                    "the who attribute of journey(s) {} holds something other than user ids",
                    bad.join(", ")
                ));
                self.dead_letter(m, &err);
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
        let header = |name: &str| header(m, name);
        let payload = m.payload().unwrap_or(&[]);
        match header(HEADER_KIND).as_deref() {
            Some("event") => {
                let raw = match RawEvent::decode(payload, 0) {
                    Ok(r) => r,
                    Err(e) => {
                        self.dead_letter(m, &e);
                        return Ok(());
                    }
                };
                let default_id = header(HEADER_EVENT_ID)
                    .unwrap_or_else(|| format!("{}/{}/{}", m.topic(), p, m.offset()));
                let t = header(HEADER_RECORD_TIME)
                    .and_then(|s| s.parse().ok())
                    .or(record_time);
                self.process_raw(m, raw, p, t, default_id)
            }
            Some("entry") => {
                let intent: EntryIntent = match serde_json::from_slice(payload) {
                    Ok(i) => i,
                    Err(e) => {
                        self.dead_letter(m, &EventError::NotJson(format!("routed entry: {e}")));
                        return Ok(());
                    }
                };
                let part = self.parts.get_mut(&p).expect("owned");
                part.proc.on_intent(&intent, &mut self.out)?;
                self.publish(p, record_time, false);
                Ok(())
            }
            other => {
                self.dead_letter(
                    m,
                    &EventError::WrongType(format!("route record of unknown kind {other:?}")),
                );
                Ok(())
            }
        }
    }

    /// Produces what the last input caused and counts it.
    fn publish(&mut self, p: i32, record_time: Option<Millis>, by_wall_clock: bool) {
        let mut out = std::mem::take(&mut self.out);
        let part = self.parts.get_mut(&p).expect("owned");
        for r in &out.records {
            let journey = r.journey_id();
            match r {
                Record::JourneyEntry(_) => {
                    self.metrics.entries.with_label_values(&[journey]).inc();
                    self.metrics
                        .active_sessions
                        .with_label_values(&[journey])
                        .inc();
                    *part.active.entry(journey.to_string()).or_default() += 1;
                }
                Record::StepAdvance(s) => self
                    .metrics
                    .steps
                    .with_label_values(&[journey, &s.reason])
                    .inc(),
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
            let headers = OwnedHeaders::new().insert(Header {
                key: HEADER_KIND,
                value: Some("entry"),
            });
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
        }
        for journey in &out.matched {
            self.metrics.matched.with_label_values(&[journey]).inc();
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
        let interval = Duration::from_millis(self.cfg.processing.commit_interval_ms);
        (self.batch_inputs > 0 || self.parts.values().any(|p| p.proc.state().staged() > 0))
            && self.batch_started.elapsed() >= interval
    }

    /// Waits for every output to be acknowledged, then writes state and offsets.
    fn commit_batch(&mut self) -> anyhow::Result<()> {
        let staged = self
            .parts
            .values()
            .any(|p| p.dirty_offsets || p.proc.state().staged() > 0);
        if self.batch_inputs == 0 && !staged {
            self.batch_started = Instant::now();
            return Ok(());
        }
        let t0 = Instant::now();
        self.producer
            .flush(Duration::from_secs(90))
            .map_err(|e| anyhow!("outputs not acknowledged by the broker: {e}; state not committed, a restart replays them"))?;
        let failed = self.producer.context().failed.swap(0, Ordering::SeqCst);
        if failed > 0 {
            let last = self
                .producer
                .context()
                .last_error
                .lock()
                .expect("not poisoned")
                .clone();
            return Err(anyhow!(
                "{failed} output record(s) could not be delivered (last error: {}); state not committed, a restart replays them",
                last.unwrap_or_default()
            ));
        }
        let acked = Instant::now();
        self.metrics
            .commit_seconds
            .with_label_values(&["acks"])
            .observe((acked - t0).as_secs_f64());
        for part in self.parts.values_mut() {
            if part.dirty_offsets {
                for (topic, next) in &part.next {
                    part.proc
                        .state_mut()
                        .stage_meta(&offset_key(topic), next.to_be_bytes().to_vec());
                }
                part.dirty_offsets = false;
            }
            part.proc.commit()?;
        }
        self.metrics
            .commit_seconds
            .with_label_values(&["state"])
            .observe(acked.elapsed().as_secs_f64());
        self.batch_inputs = 0;
        self.batch_started = Instant::now();
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
                match core.assign(tpl) {
                    Ok(()) => {
                        if let Err(e) = consumer.assign(tpl) {
                            core.fatal = Some(anyhow!("assigning partitions: {e}"));
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
                match core.revoke_all() {
                    Ok(offsets) => {
                        if offsets.count() > 0 {
                            if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                                warn!(error = %e, "committing offsets on revocation (state already holds them)");
                            }
                        }
                        info!("rebalance: partitions revoked");
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
        if let Err(e) = result {
            warn!(error = %e, "group offset commit failed (progress only; the state store holds the offsets)");
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

/// Runs the service until `shutdown` is set; returns after draining and committing.
pub fn run(
    cfg: Config,
    journeys: Arc<JourneySet>,
    metrics: Arc<Metrics>,
    partitions: i32,
    shutdown: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let producer: BaseProducer<Delivery> = producer_config(&cfg.kafka.brokers)
        .create_with_context(Delivery {
            latency: Some(metrics.latency.clone()),
            ..Delivery::default()
        })
        .context("creating the producer")?;
    let core = Arc::new(Mutex::new(Core {
        cfg: cfg.clone(),
        journeys,
        metrics: metrics.clone(),
        producer,
        partitions,
        parts: HashMap::new(),
        out: Output::default(),
        batch_inputs: 0,
        batch_started: Instant::now(),
        fatal: None,
        last_tick: Instant::now(),
        clock: Clock::shifted(cfg.processing.clock_offset_ms),
    }));
    let session_timeout = cfg.kafka.session_timeout_ms.max(1000);
    let consumer: BaseConsumer<Ctx> = super::base_config(&cfg.kafka.brokers)
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
        .set("statistics.interval.ms", "1000")
        .create_with_context(Ctx {
            core: core.clone(),
            metrics: metrics.clone(),
            high: Mutex::new(HashMap::new()),
        })
        .context("creating the consumer")?;
    let mut topics: Vec<&str> = cfg.kafka.input_topics.iter().map(String::as_str).collect();
    topics.push(&cfg.topics.route);
    consumer.subscribe(&topics).context("subscribing")?;
    info!(topics = %topics.join(","), group = %cfg.kafka.group_id, partitions, "consuming");
    let tick = Duration::from_millis(cfg.processing.timer_tick_ms);
    let mut loops: u64 = 0;
    let mut journeys_seen = dir_signature(&cfg.journeys.dir);
    let mut last_look = Instant::now();
    while !shutdown.load(Ordering::SeqCst) {
        let msg = consumer.poll(Duration::from_millis(20));
        let mut core = core.lock().expect("not poisoned");
        if let Some(e) = core.fatal.take() {
            return Err(e);
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
        if core.batch_due() || (idle && core.batch_inputs > 0) {
            core.commit_batch()?;
            let offsets = core.offsets();
            if offsets.count() > 0 {
                let _ = consumer.commit(&offsets, CommitMode::Async);
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
    let offsets = {
        let mut core = core.lock().expect("not poisoned");
        let offsets = core.revoke_all()?;
        core.producer.flush(Duration::from_secs(30)).ok();
        offsets
    };
    if offsets.count() > 0 {
        if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
            warn!(error = %e, "final group commit failed (the state store holds the offsets)");
        }
    }
    metrics.set_ready(false);
    consumer.unsubscribe();
    drop(consumer);
    info!("stopped");
    Ok(())
}
