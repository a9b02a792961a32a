//! The producer side of `waymark run`: the delivery context (what the broker acknowledged, by
//! batch generation), what a record's delivery opaque carries, and a send that waits out a full
//! queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::{Statistics, Window};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::commit::{tag, TAG_BITS};
use crate::time::Millis;

/// What a record's delivery opaque (a `usize`) carries: bit 62 marks a changelog marker; bits
/// 48.. hold the [`tag`] of the batch generation the record belongs to; bits 0..48 hold the
/// input record's time in epoch milliseconds for an output (0: not an output), or the partition
/// for a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opaque(pub usize);

const MARKER: usize = 1 << 62;
const TAG_SHIFT: u32 = 48;
const LOW: usize = (1 << TAG_SHIFT) - 1;

impl Opaque {
    /// An output, dead letter, routed or changelog record of generation `gen`; `record_time`
    /// (outputs only) is what the delivery latency is measured from.
    pub fn record(gen: u64, record_time: Option<Millis>) -> Opaque {
        let t = record_time.map_or(0, |t| t.clamp(0, LOW as i64) as usize);
        Opaque(((tag(gen) as usize) << TAG_SHIFT) | t)
    }

    /// The changelog marker of partition `p` for generation `gen`.
    pub fn marker(gen: u64, p: i32) -> Opaque {
        Opaque(MARKER | ((tag(gen) as usize) << TAG_SHIFT) | (p.max(0) as usize & LOW))
    }

    pub fn tag(self) -> u64 {
        ((self.0 & !MARKER) >> TAG_SHIFT) as u64 & ((1 << TAG_BITS) - 1)
    }

    /// The partition, for a marker.
    pub fn marker_partition(self) -> Option<i32> {
        (self.0 & MARKER != 0).then_some((self.0 & LOW) as i32)
    }

    /// The input record's time, for an output.
    pub fn record_time(self) -> Option<Millis> {
        (self.0 & MARKER == 0 && self.0 & LOW != 0).then_some((self.0 & LOW) as i64)
    }
}

/// Counts delivery failures reported by the producer, reports each record's outcome by batch
/// generation (when `track` is on: the runtime's commit pipeline reads them), keeps the offsets
/// of acknowledged changelog markers, and, for output records, observes the latency from the
/// input record's timestamp to the broker's acknowledgement.
#[derive(Default)]
pub struct Delivery {
    pub(super) failed: AtomicU64,
    /// Records the producer refused to queue (also counted in `failed`).
    pub(super) refused: AtomicU64,
    pub(super) last_error: Mutex<Option<String>>,
    /// A failure that no retry can mend (authorization, a record too large, an invalid record)
    /// happened since the last check.
    pub(super) permanent: AtomicBool,
    pub(super) latency: Option<prometheus::Histogram>,
    /// `waymark_client_latency_seconds`, set from the producer's statistics.
    pub(super) client_latency: Option<prometheus::GaugeVec>,
    /// Offset of each acknowledged changelog marker, by (generation tag, partition).
    pub(super) markers: Mutex<HashMap<(u64, i32), i64>>,
    /// Delivery reports served so far (see [`serve_reports`]).
    served: AtomicU64,
    /// Whether to keep each record's outcome in `reports`.
    pub(super) track: bool,
    /// (generation tag, delivered) of each record reported since the last [`Delivery::take_reports`].
    reports: Mutex<Vec<(u64, bool)>>,
}

/// Whether a produce error is one no retry can mend: the service stops and says which. Every
/// other failure (broker unreachable, timeouts, leader changes, unknown errors during a broker
/// restart) is retried in-process.
pub fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::MessageBatchTooLarge
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::InvalidTopic
            | C::UnsupportedForMessageFormat
            | C::UnsupportedVersion
    )
    // Not among them: `MessageTimedOut` (not acknowledged within message.timeout.ms, 60 s). A
    // broker that stalls that long under load (tansu does, with a 200k-event backlog) is not a
    // reason to stop; the batches are dropped and redone after a backoff. If the member lost its
    // partitions meanwhile, the group tells it at the next poll or commit, and a batch it still
    // wrote to the changelog is a zombie's, found out of place by the marker check.
}

impl Delivery {
    /// A context for the runtime: outcomes tracked by generation, latency observed.
    pub fn tracking(
        latency: prometheus::Histogram,
        client_latency: prometheus::GaugeVec,
    ) -> Delivery {
        Delivery {
            latency: Some(latency),
            client_latency: Some(client_latency),
            track: true,
            ..Delivery::default()
        }
    }

    /// `Err` with the count and the last error if any delivery failed since the last check.
    pub fn check(&self) -> Result<(), String> {
        let failed = self.failed.swap(0, Ordering::SeqCst);
        self.refused.store(0, Ordering::SeqCst);
        self.permanent.store(false, Ordering::SeqCst);
        if failed == 0 {
            return Ok(());
        }
        let last = self.last_error.lock().expect("not poisoned").clone();
        Err(format!(
            "{failed} record(s) not delivered (last error: {})",
            last.unwrap_or_default()
        ))
    }

    /// Forgets failures counted so far (their batch was dropped).
    pub fn reset_failures(&self) {
        self.failed.store(0, Ordering::SeqCst);
        self.refused.store(0, Ordering::SeqCst);
    }

    /// The outcomes reported since the last call, appended to `into`.
    pub fn take_reports(&self, into: &mut Vec<(u64, bool)>) {
        into.append(&mut self.reports.lock().expect("not poisoned"));
    }

    /// Takes the acknowledged marker offsets of generation tag `t`, by partition.
    pub fn take_markers(&self, t: u64) -> HashMap<i32, i64> {
        let mut markers = self.markers.lock().expect("not poisoned");
        let mine: Vec<(u64, i32)> = markers.keys().filter(|k| k.0 == t).copied().collect();
        mine.into_iter()
            .filter_map(|k| markers.remove(&k).map(|o| (k.1, o)))
            .collect()
    }

    /// Counts a record the producer refused to queue as a failed delivery.
    fn note_refused(&self, e: &KafkaError) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.refused.fetch_add(1, Ordering::SeqCst);
        if e.rdkafka_error_code().is_some_and(is_permanent) {
            self.permanent.store(true, Ordering::SeqCst);
        }
        *self.last_error.lock().expect("not poisoned") = Some(e.to_string());
    }
}

impl ClientContext for Delivery {
    fn stats(&self, stats: Statistics) {
        if let Some(g) = &self.client_latency {
            report_client_latency(g, "producer", &stats);
        }
    }
}

/// How many events one [`serve_reports`] serves at most after the first (each holds the reports
/// of one produce batch), so that a flood of reports cannot keep the loop from its inputs.
const MAX_EVENTS_PER_SERVE: usize = 4096;

/// Serves the delivery reports waiting, after waiting up to `wait` for events. One `poll` with
/// no wait serves one event, the reports of one produce batch (one partition's): a loop that
/// polled once per turn would fall behind a producer writing to dozens of partitions, and every
/// report served late delays the latency it measures and the batch it acknowledges.
pub fn serve_reports(producer: &BaseProducer<Delivery>, wait: Duration) {
    producer.poll(wait);
    let served = &producer.context().served;
    for _ in 0..MAX_EVENTS_PER_SERVE {
        let before = served.load(Ordering::Relaxed);
        producer.poll(Duration::ZERO);
        if served.load(Ordering::Relaxed) == before {
            break;
        }
    }
}

/// Sets `waymark_client_latency_seconds` from a client's statistics: for each percentile, the
/// slowest broker's request round trip over the last window and, for a producer, the time its
/// records waited in the queue before they were sent. Brokers with no request in the window are
/// left out; a window with none anywhere leaves the gauges as they were.
pub fn report_client_latency(gauges: &prometheus::GaugeVec, client: &str, stats: &Statistics) {
    let brokers = || stats.brokers.values();
    set_worst(
        gauges,
        client,
        "rtt",
        brokers().filter_map(|b| b.rtt.as_ref()),
    );
    if client == "producer" {
        set_worst(
            gauges,
            client,
            "queue",
            brokers().filter_map(|b| b.int_latency.as_ref()),
        );
    }
}

/// Sets p50 and p99 of `measure` to the highest of `windows` that saw any value.
fn set_worst<'a>(
    gauges: &prometheus::GaugeVec,
    client: &str,
    measure: &str,
    windows: impl Iterator<Item = &'a Window>,
) {
    let seen: Vec<&Window> = windows.filter(|w| w.cnt > 0).collect();
    if seen.is_empty() {
        return;
    }
    let p50 = seen.iter().map(|w| w.p50).max().unwrap_or(0);
    let p99 = seen.iter().map(|w| w.p99).max().unwrap_or(0);
    for (q, v) in [("0.5", p50), ("0.99", p99)] {
        gauges
            .with_label_values(&[client, measure, q])
            .set(v as f64 / 1e6);
    }
}

impl ProducerContext for Delivery {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let opaque = Opaque(opaque);
        let ok = result.is_ok();
        self.served.fetch_add(1, Ordering::Relaxed);
        match result {
            Err((e, msg)) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                if e.rdkafka_error_code().is_some_and(is_permanent) {
                    self.permanent.store(true, Ordering::SeqCst);
                }
                *self.last_error.lock().expect("not poisoned") =
                    Some(format!("{e} (topic {})", msg.topic()));
            }
            Ok(msg) => {
                if let Some(p) = opaque.marker_partition() {
                    self.markers
                        .lock()
                        .expect("not poisoned")
                        .insert((opaque.tag(), p), msg.offset());
                } else if let (Some(h), Some(t)) = (&self.latency, opaque.record_time()) {
                    let now = super::runtime::Clock::system().now_ms();
                    h.observe(((now - t).max(0)) as f64 / 1000.0);
                }
            }
        }
        if self.track {
            self.reports
                .lock()
                .expect("not poisoned")
                .push((opaque.tag(), ok));
        }
    }
}

/// One record to send (`value` `None`: a tombstone).
pub struct Out<'a> {
    pub topic: &'a str,
    pub partition: Option<i32>,
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
    pub headers: Option<OwnedHeaders>,
    pub opaque: Opaque,
}

/// Sends one record, waiting while the producer's queue is full. `false`: the producer refused
/// it (counted as a failed delivery; its batch will not commit).
pub fn send(producer: &BaseProducer<Delivery>, out: Out<'_>) -> bool {
    let mut rec = BaseRecord::with_opaque_to(out.topic, out.opaque.0).key(out.key);
    if let Some(v) = out.value {
        rec = rec.payload(v);
    }
    if let Some(p) = out.partition {
        rec = rec.partition(p);
    }
    if let Some(h) = out.headers {
        rec = rec.headers(h);
    }
    loop {
        match producer.send(rec) {
            Ok(()) => return true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                producer.poll(Duration::from_millis(50));
                rec = r;
            }
            Err((e, _)) => {
                producer.context().note_refused(&e);
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::Broker;

    #[test]
    fn the_opaque_carries_generation_time_and_marker_partition_apart() {
        let o = Opaque::record(5, Some(1_780_000_000_123));
        assert_eq!(o.tag(), 5);
        assert_eq!(o.record_time(), Some(1_780_000_000_123));
        assert_eq!(o.marker_partition(), None);
        let m = Opaque::marker(16_384 + 7, 3);
        assert_eq!(m.tag(), 7, "the tag wraps");
        assert_eq!(m.marker_partition(), Some(3));
        assert_eq!(m.record_time(), None);
        let none = Opaque::record(9, None);
        assert_eq!((none.tag(), none.record_time()), (9, None));
        // A producer may stamp any time: it never spills into the tag or the marker bit.
        let far = Opaque::record(2, Some(i64::MAX));
        assert_eq!(far.tag(), 2);
        assert_eq!(far.marker_partition(), None);
        assert_eq!(Opaque::record(2, Some(-5)).record_time(), None);
    }

    #[test]
    fn permanent_errors_are_the_ones_no_retry_mends() {
        assert!(is_permanent(RDKafkaErrorCode::TopicAuthorizationFailed));
        assert!(is_permanent(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(!is_permanent(RDKafkaErrorCode::RequestTimedOut));
        assert!(!is_permanent(RDKafkaErrorCode::NotLeaderForPartition));
        assert!(!is_permanent(RDKafkaErrorCode::MessageTimedOut));
    }

    #[test]
    fn client_latency_is_the_slowest_brokers_and_an_idle_window_changes_nothing() {
        let gauges = prometheus::GaugeVec::new(
            prometheus::Opts::new("t", "t"),
            &["client", "measure", "quantile"],
        )
        .unwrap();
        let broker = |rtt: Option<(i64, i64, i64)>, queue: Option<(i64, i64, i64)>| Broker {
            rtt: rtt.map(|(cnt, p50, p99)| Window {
                cnt,
                p50,
                p99,
                ..Window::default()
            }),
            int_latency: queue.map(|(cnt, p50, p99)| Window {
                cnt,
                p50,
                p99,
                ..Window::default()
            }),
            ..Broker::default()
        };
        let mut stats = Statistics::default();
        stats.brokers.insert(
            "a".into(),
            broker(Some((10, 2_000, 90_000)), Some((5, 300, 700))),
        );
        stats
            .brokers
            .insert("b".into(), broker(Some((4, 5_000, 40_000)), None));
        // A broker with no request in the window says nothing.
        stats
            .brokers
            .insert("c".into(), broker(Some((0, 900_000, 900_000)), None));
        report_client_latency(&gauges, "producer", &stats);
        let get = |c: &str, m: &str, q: &str| gauges.with_label_values(&[c, m, q]).get();
        assert_eq!(get("producer", "rtt", "0.5"), 0.005);
        assert_eq!(get("producer", "rtt", "0.99"), 0.09);
        assert_eq!(get("producer", "queue", "0.99"), 0.0007);
        // A consumer has no producer queue.
        report_client_latency(&gauges, "consumer", &stats);
        assert_eq!(get("consumer", "rtt", "0.99"), 0.09);
        assert_eq!(get("consumer", "queue", "0.5"), 0.0);
        let idle = Statistics::default();
        report_client_latency(&gauges, "producer", &idle);
        assert_eq!(get("producer", "rtt", "0.99"), 0.09);
    }
}
