//! Metrics and health: the Prometheus registry, typed helpers the runtime calls, and the HTTP
//! endpoints `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric waymark exports.
pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounterVec,
    pub matched: IntCounterVec,
    pub entries: IntCounterVec,
    pub steps: IntCounterVec,
    pub funnel_triggers: IntCounterVec,
    pub funnel_reached: IntCounterVec,
    pub funnel_left: IntCounterVec,
    pub conversions: IntCounterVec,
    pub exits: IntCounterVec,
    pub refused: IntCounterVec,
    pub suppressed: IntCounterVec,
    pub quiet_holds: IntCounterVec,
    pub quiet_releases: IntCounterVec,
    pub quiet_held: IntGaugeVec,
    pub dead_letters: IntCounterVec,
    pub routed: IntCounter,
    pub profile_updates: IntCounter,
    pub erasures: IntCounter,
    pub profiles_stored: IntGauge,
    pub timers_fired: IntCounter,
    pub timer_lateness: Histogram,
    pub latency: Histogram,
    pub lag: IntGaugeVec,
    /// The next input offset whose effects are durable (outputs acknowledged, state written).
    pub committed_offset: IntGaugeVec,
    /// Round trip to the brokers and time in the producer's queue, from the clients' statistics.
    pub client_latency: GaugeVec,
    pub active_sessions: IntGaugeVec,
    pub rebalances: IntCounter,
    pub batch_retries: IntCounter,
    pub partitions_assigned: IntGauge,
    pub commit_seconds: HistogramVec,
    pub transactions: IntCounterVec,
    pub fenced: IntCounter,
    pub changelog_records: IntCounter,
    pub restore_records: IntCounterVec,
    pub changelog_corrupt: IntCounter,
    pub changelog_interleaved: IntCounter,
    pub restore_seconds: GaugeVec,
    pub ready: IntGauge,
    pub ready_flag: AtomicBool,
    /// Group members this instance runs (one per processing thread), and which are ready.
    members: std::sync::atomic::AtomicUsize,
    ready_members: std::sync::atomic::AtomicU64,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0,
        ];
        let lag = IntGaugeVec::new(
            Opts::new(
                "waymark_consumer_lag",
                "Records behind the partition's high watermark",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        r.register(Box::new(lag.clone())).expect("unique metric");
        let committed_offset = IntGaugeVec::new(
            Opts::new(
                "waymark_committed_offset",
                "The next input offset whose effects are durable (outputs acknowledged, state written)",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        r.register(Box::new(committed_offset.clone()))
            .expect("unique metric");
        let client_latency = GaugeVec::new(
            Opts::new(
                "waymark_client_latency_seconds",
                "Percentiles over the clients' last statistics window (1 s), the slowest broker's: request round trip (rtt) of the producer and the consumer, and time records wait in the producer's queue before they are sent (queue)",
            ),
            &["client", "measure", "quantile"],
        )
        .expect("valid metric");
        r.register(Box::new(client_latency.clone()))
            .expect("unique metric");
        let quiet_held = IntGaugeVec::new(
            Opts::new(
                "waymark_quiet_hours_held",
                "Sessions held by quiet hours now, changes seen by this instance since it started",
            ),
            &["journey"],
        )
        .expect("valid metric");
        r.register(Box::new(quiet_held.clone()))
            .expect("unique metric");
        let active = IntGaugeVec::new(
            Opts::new(
                "waymark_active_sessions",
                "Active sessions in the partitions this instance owns",
            ),
            &["journey"],
        )
        .expect("valid metric");
        r.register(Box::new(active.clone())).expect("unique metric");
        let partitions = IntGauge::new(
            "waymark_partitions_assigned",
            "Partitions this instance owns",
        )
        .expect("valid metric");
        r.register(Box::new(partitions.clone()))
            .expect("unique metric");
        let ready = IntGauge::new(
            "waymark_ready",
            "1 when assigned partitions are restored and consuming",
        )
        .expect("valid metric");
        r.register(Box::new(ready.clone())).expect("unique metric");
        let commit = HistogramVec::new(
            HistogramOpts::new(
                "waymark_commit_seconds",
                "Time to make a batch durable, by phase: acks (outputs and changelog acknowledged), group (offsets committed to the group), transaction (exactly_once: the transaction committed), state (the local write)",
            )
            .buckets(latency_buckets.clone()),
            &["phase"],
        )
        .expect("valid metric");
        r.register(Box::new(commit.clone())).expect("unique metric");
        let restore_seconds = GaugeVec::new(
            Opts::new(
                "waymark_restore_seconds",
                "Duration of the partition's last restore from the changelog",
            ),
            &["partition"],
        )
        .expect("valid metric");
        r.register(Box::new(restore_seconds.clone()))
            .expect("unique metric");
        let transactions = counter_vec(
                &r,
                "waymark_transactions_total",
            "Kafka transactions (exactly_once) by outcome: committed, aborted, or commit_retried (a commit that timed out and was tried again)",
            &["outcome"],
        );
        // Exported from the start, so dashboards and alerts see zeros rather than nothing.
        for outcome in ["committed", "aborted", "commit_retried"] {
            transactions.with_label_values(&[outcome]);
        }
        Arc::new(Metrics {
            transactions,
            fenced: counter(
                &r,
                "waymark_fenced_total",
                "Times this instance found it no longer owned its partitions (a newer group generation or producer took over) and dropped its uncommitted work",
            ),
            changelog_records: counter(
                &r,
                "waymark_changelog_records_total",
                "Records written to the changelog topic (changes and batch markers)",
            ),
            restore_records: counter_vec(
                &r,
                "waymark_restore_records_total",
                "Changelog records read while restoring a partition",
                &["partition"],
            ),
            changelog_corrupt: counter(
                &r,
                "waymark_changelog_corrupt_records_total",
                "Changelog records that could not be decoded while restoring (skipped)",
            ),
            changelog_interleaved: counter(
                &r,
                "waymark_changelog_interleaved_total",
                "Batches whose changelog records were found interleaved with another writer's (a zombie's, or a newer owner's): the partition was restored again from the changelog instead of writing the batch locally",
            ),
            restore_seconds,

            events_consumed: counter_vec(
                &r,
                "waymark_events_consumed_total",
                "Input records consumed",
                &["topic", "partition"],
            ),
            matched: counter_vec(
                &r,
                "waymark_journey_matched_total",
                "Events whose trigger, wait or goal matched, per journey",
                &["journey"],
            ),
            entries: counter_vec(&r, "waymark_entries_total", "Journey entries", &["journey"]),
            steps: counter_vec(
                &r,
                "waymark_steps_total",
                "Step advances",
                &["journey", "reason"],
            ),
            // The backtest's funnel, live (docs/backtest.md): labels are journey and step ids of
            // the definitions and the contract's reasons, so their number is bounded by the
            // journeys loaded.
            funnel_triggers: counter_vec(
                &r,
                "waymark_funnel_triggers_total",
                "Events that were a journey's entry event, before any check (the funnel's first stage)",
                &["journey"],
            ),
            funnel_reached: counter_vec(
                &r,
                "waymark_funnel_reached_total",
                "Sessions that arrived at a step (entered there or moved there)",
                &["journey", "step"],
            ),
            funnel_left: counter_vec(
                &r,
                "waymark_funnel_left_total",
                "Sessions that left a step, by reason (the exit after an action step without next counts once, as the action)",
                &["journey", "step", "reason"],
            ),
            conversions: counter_vec(
                &r,
                "waymark_conversions_total",
                "Goal conversions",
                &["journey", "goal"],
            ),
            exits: counter_vec(
                &r,
                "waymark_exits_total",
                "Session exits",
                &["journey", "reason"],
            ),
            refused: counter_vec(
                &r,
                "waymark_entries_refused_total",
                "Matched triggers that did not start a session",
                &["journey", "reason"],
            ),
            suppressed: counter_vec(
                &r,
                "waymark_actions_suppressed_total",
                "Action steps left without delivering their action, by reason (holdout, frequency_cap)",
                &["journey", "reason"],
            ),
            quiet_holds: counter_vec(
                &r,
                "waymark_quiet_hours_holds_total",
                "Sessions held at an action step by quiet hours",
                &["journey"],
            ),
            quiet_releases: counter_vec(
                &r,
                "waymark_quiet_hours_releases_total",
                "Sessions released from a quiet-hours hold",
                &["journey"],
            ),
            quiet_held: quiet_held.clone(),
            batch_retries: counter(
                &r,
                "waymark_batch_retries_total",
                "Batches dropped and redone after a delivery failure that may be transient (a broker restart, a timeout)",
            ),
            dead_letters: counter_vec(
                &r,
                "waymark_dead_letters_total",
                "Input records sent to the dead-letter topic",
                &["reason"],
            ),
            routed: counter(
                &r,
                "waymark_routed_total",
                "Records forwarded to the partition that owns their user",
            ),
            profile_updates: counter(
                &r,
                "waymark_profile_updates_total",
                "Profile updates merged into users' stored profiles",
            ),
            erasures: counter(
                &r,
                "waymark_erasures_total",
                "Profile erasures applied (a user's profile, sessions and history removed)",
            ),
            profiles_stored: {
                let g = IntGauge::new(
                    "waymark_profiles_stored",
                    "Users' profiles held in the partitions this instance owns",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            timers_fired: counter(
                &r,
                "waymark_timers_fired_total",
                "Timers fired (delays and wait timeouts)",
            ),
            timer_lateness: histogram(
                &r,
                "waymark_timer_lateness_seconds",
                "Wall-clock time between a timer's due time and its firing",
                latency_buckets.clone(),
            ),
            latency: histogram(
                &r,
                "waymark_processing_latency_seconds",
                "Input record timestamp to output acknowledged",
                latency_buckets,
            ),
            rebalances: counter(
                &r,
                "waymark_rebalances_total",
                "Consumer group rebalances seen",
            ),
            lag,
            committed_offset,
            client_latency,
            active_sessions: active,
            partitions_assigned: partitions,
            commit_seconds: commit,
            ready,
            ready_flag: AtomicBool::new(false),
            members: std::sync::atomic::AtomicUsize::new(1),
            ready_members: std::sync::atomic::AtomicU64::new(0),
            registry: r,
        })
    }

    /// An instance with one group member: ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.set_member_ready(0, ready);
    }

    /// The instance runs `n` group members (processing threads, at most 64); it is ready when
    /// every one of them is.
    pub fn set_members(&self, n: usize) {
        self.members.store(n.clamp(1, 64), Ordering::SeqCst);
        self.ready_members.store(0, Ordering::SeqCst);
        self.update_ready();
    }

    /// Member `k` has its partitions assigned and restored (or not any more).
    pub fn set_member_ready(&self, k: usize, ready: bool) {
        let bit = 1u64 << k.min(63);
        if ready {
            self.ready_members.fetch_or(bit, Ordering::SeqCst);
        } else {
            self.ready_members.fetch_and(!bit, Ordering::SeqCst);
        }
        self.update_ready();
    }

    fn update_ready(&self) {
        let n = self.members.load(Ordering::SeqCst);
        let all = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        let ready = self.ready_members.load(Ordering::SeqCst) & all == all;
        self.ready_flag.store(ready, Ordering::SeqCst);
        self.ready.set(ready as i64);
    }

    pub fn is_ready(&self) -> bool {
        self.ready_flag.load(Ordering::SeqCst)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }

    /// Counts what one input (or timer tick) caused: the funnel, entries, steps, exits,
    /// conversions, refusals, quiet hours, timers fired; `active` (sessions by journey, of the
    /// partition) follows entries and exits.
    pub fn count_output(
        &self,
        out: &crate::processor::Output,
        active: &mut std::collections::HashMap<String, i64>,
    ) {
        use crate::record::Record;
        for j in &out.triggered {
            self.funnel_triggers.with_label_values(&[j.as_str()]).inc();
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
                        self.funnel_left
                            .with_label_values(&[journey, &m.from, &m.reason])
                            .inc();
                    }
                    if let Some(to) = &m.to {
                        self.funnel_reached.with_label_values(&[journey, to]).inc();
                    }
                    left_to_nowhere = (!exit && m.to.is_none()).then_some(m.session_id.as_str());
                }
                Record::JourneyEntry(e) => {
                    self.funnel_reached
                        .with_label_values(&[journey, &e.step])
                        .inc();
                    left_to_nowhere = None;
                }
                Record::Conversion(_) => {}
            }
            match r {
                Record::JourneyEntry(_) => {
                    self.entries.with_label_values(&[journey]).inc();
                    self.active_sessions.with_label_values(&[journey]).inc();
                    *active.entry(journey.to_string()).or_default() += 1;
                }
                Record::StepAdvance(s) => {
                    self.steps.with_label_values(&[journey, &s.reason]).inc();
                    if let Some(why) = &s.suppressed {
                        self.suppressed.with_label_values(&[journey, why]).inc();
                    }
                }
                Record::JourneyExit(s) => {
                    self.exits.with_label_values(&[journey, &s.reason]).inc();
                    self.active_sessions.with_label_values(&[journey]).dec();
                    *active.entry(journey.to_string()).or_default() -= 1;
                }
                Record::Conversion(c) => self
                    .conversions
                    .with_label_values(&[journey, &c.goal_id])
                    .inc(),
            }
        }

        for (journey, reason) in &out.refused {
            self.refused
                .with_label_values(&[journey, reason.as_str()])
                .inc();
        }
        for journey in &out.matched {
            self.matched.with_label_values(&[journey]).inc();
        }
        for journey in &out.held {
            self.quiet_holds.with_label_values(&[journey]).inc();
            self.quiet_held.with_label_values(&[journey]).inc();
        }
        for journey in &out.released {
            self.quiet_releases.with_label_values(&[journey]).inc();
            self.quiet_held.with_label_values(&[journey]).dec();
        }
        if !out.timers_fired.is_empty() {
            self.timers_fired.inc_by(out.timers_fired.len() as u64);
        }
    }

    /// How late timers fired by the wall clock at `now` were.
    pub fn count_timer_lateness(&self, due: &[crate::time::Millis], now: crate::time::Millis) {
        for d in due {
            self.timer_lateness
                .observe(((now - d).max(0)) as f64 / 1000.0);
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
    let m2 = metrics;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m1.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let m = m2.clone();
                async move {
                    if m.is_ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_ready_when_every_member_is() {
        let m = Metrics::new();
        m.set_ready(true);
        assert!(m.is_ready(), "one member by default");
        m.set_members(2);
        assert!(!m.is_ready());
        m.set_member_ready(0, true);
        assert!(!m.is_ready(), "one of two");
        m.set_member_ready(1, true);
        assert!(m.is_ready());
        assert_eq!(m.ready.get(), 1);
        m.set_member_ready(0, false);
        assert!(!m.is_ready(), "a member rebalancing");
        assert_eq!(m.ready.get(), 0);
    }
}
