//! exactly_once: one transaction a batch (outputs, changelog, input offsets), then the state.

use super::*;

impl Core {
    /// exactly_once: commits outputs, changelog changes and markers, and input offsets in one
    /// transaction, then writes local state; an abortable error aborts, drops the batch and
    /// rewinds the consumer to the last committed offsets.
    pub(super) fn commit_batch(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<()> {
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
            .flat_map(|(p, part)| {
                part.life
                    .offsets()
                    .map(move |(t, n)| (t.to_string(), *p, n))
            })
            .collect();
        self.write_parts(consumer, gen, None)?;
        self.note_committed(offsets.into_iter());
        // The transaction holds every record it counted: the next batch counts afresh.
        self.pipeline.get_mut().reset();
        self.batch_inputs = 0;
        self.batch_started = Instant::now();
        Ok(())
    }

    /// exactly_once: adds the input offsets to the open transaction and commits it. A timeout is
    /// retried (never aborted: the commit may have happened); an abortable error aborts and
    /// rewinds (returns false); anything else is fatal.
    pub(super) fn commit_transaction(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
    ) -> anyhow::Result<bool> {
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
    pub(super) fn note_retry(&self, e: &rdkafka::error::RDKafkaError, what: &str) {
        self.metrics
            .transactions
            .with_label_values(&["commit_retried"])
            .inc();
        warn!(error = %e, "{what} not confirmed yet; retrying");
    }

    /// exactly_once: a producer in a fatal state (fenced by a newer instance with the same
    /// transactional.id, or another unrecoverable error) stops the service.
    pub(super) fn check_fatal(&self) -> anyhow::Result<()> {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            if is_producer_fenced(code) {
                self.metrics.fenced.inc();
                bail!("this instance's transactional producer was fenced by a newer one ({code:?}: {reason}); stopping without committing");
            }
            bail!("the transactional producer failed ({code:?}: {reason}); stopping without committing");
        }
        Ok(())
    }
}
