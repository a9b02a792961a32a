//! The worker loop of `waymark run`: the consumer, its rebalance callback, polling, back-pressure,
//! timers by the wall clock, journey reloads.

use super::*;

impl Core {
    /// Loads the journeys directory again: applies the new set whole, or refuses it whole and
    /// keeps the current one. Sessions stay on the version they entered with; sessions of
    /// journeys now archived end.
    pub(super) fn reload(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn tick(
        &mut self,
        high: &HashMap<(String, i32), i64>,
        idle: bool,
    ) -> anyhow::Result<()> {
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
                let next = self.parts[&p].life.next(topic);
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

pub(super) struct Ctx {
    core: Arc<Mutex<Core>>,
    metrics: Arc<Metrics>,
    /// High watermarks by (topic, partition), from the client's statistics.
    high: Mutex<HashMap<(String, i32), i64>>,
    /// An asynchronous offset commit found this member replaced in the group.
    fenced: AtomicBool,
    /// Which of the instance's members (processing threads) this is.
    member: usize,
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        super::super::producer::report_client_latency(
            &self.metrics.client_latency,
            "consumer",
            &stats,
        );
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
                self.metrics.set_member_ready(self.member, false);
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
                            self.metrics.set_member_ready(self.member, true);
                        }
                    }
                    Err(e) => core.fatal = Some(e),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.metrics.set_member_ready(self.member, false);
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

/// How many processing threads (group members) to run: `processing.threads`, or one per core
/// (0), never more than the input partitions.
pub fn threads(cfg: &Config, partitions: i32) -> usize {
    let wanted = match cfg.processing.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    wanted.clamp(1, partitions.max(1) as usize)
}

/// Runs the service until `shutdown` is set; returns after draining and committing. With more
/// than one processing thread, each is a member of the group of its own (its partitions, stores,
/// producer and commit pipeline); the first to fail stops the others, and its error is returned.
pub fn run(
    cfg: Config,
    journeys: Arc<JourneySet>,
    metrics: Arc<Metrics>,
    partitions: i32,
    shutdown: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let n = threads(&cfg, partitions);
    metrics.set_members(n);
    if n == 1 {
        return run_member(0, cfg, journeys, metrics, partitions, shutdown, reload);
    }
    info!(threads = n, "processing threads: one group member each");
    let reloads: Vec<Arc<AtomicBool>> = (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|k| {
                let (cfg, journeys, metrics) = (cfg.clone(), journeys.clone(), metrics.clone());
                let (shutdown, reload) = (shutdown.clone(), reloads[k].clone());
                std::thread::Builder::new()
                    .name(format!("waymark-{k}"))
                    .spawn_scoped(s, move || {
                        let r = run_member(
                            k,
                            cfg,
                            journeys,
                            metrics,
                            partitions,
                            shutdown.clone(),
                            reload,
                        );
                        if r.is_err() {
                            shutdown.store(true, Ordering::SeqCst);
                        }
                        r
                    })
            })
            .collect::<Result<_, _>>()
            .context("starting the processing threads")?;
        // SIGHUP reaches every member.
        while !handles
            .iter()
            .all(|h: &std::thread::ScopedJoinHandle<'_, _>| h.is_finished())
        {
            if reload.swap(false, Ordering::SeqCst) {
                for r in &reloads {
                    r.store(true, Ordering::SeqCst);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut first: anyhow::Result<()> = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("a processing thread panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

/// One group member: its consumer, producer, stores and loop.
fn run_member(
    member: usize,
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
        // Each member's transactions are its own: member 0 keeps the configured name.
        let id = if member == 0 {
            id
        } else {
            format!("{id}-{member}")
        };
        pc.set("transactional.id", &id).set(
            "transaction.timeout.ms",
            cfg.kafka.transaction_timeout_ms.to_string(),
        );
        info!(transactional_id = %id, "exactly_once: transactional producer");
    }
    // Statistics once a second: the producer's round trip and queue time (see
    // `waymark_client_latency_seconds`).
    pc.set("statistics.interval.ms", "1000");
    let mut delivery = Delivery::tracking(metrics.latency.clone(), metrics.client_latency.clone());
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
            crate::kafka::apply_consumer_properties(
                crate::kafka::base_config(&cfg.kafka.brokers)
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
        reported: (0, 0),
    }));
    let session_timeout = cfg.kafka.session_timeout_ms.max(1000);
    let mut consumer = crate::kafka::base_config(&cfg.kafka.brokers);
    consumer
        .set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", session_timeout.to_string())
        // A member learns of a rebalance (another member joined, or left) at its next heartbeat:
        // a tenth of the session timeout (1 s by default) rather than a quarter, so that the
        // processing threads of an instance started together, which join one after another,
        // settle within a second instead of one thread working alone for 2.5 s.
        .set(
            "heartbeat.interval.ms",
            (session_timeout / 10).max(250).to_string(),
        )
        .set("max.poll.interval.ms", "300000")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "100")
        .set("statistics.interval.ms", "1000");
    let consumer: BaseConsumer<Ctx> = crate::kafka::apply_consumer_properties(&mut consumer)
        .create_with_context(Ctx {
            core: core.clone(),
            metrics: metrics.clone(),
            high: Mutex::new(HashMap::new()),
            fenced: AtomicBool::new(false),
            member,
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
    metrics.set_member_ready(member, false);
    consumer.unsubscribe();
    drop(consumer);
    info!("stopped");
    Ok(())
}
