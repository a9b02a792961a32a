//! Batches (at_least_once): closed, taken through the [`commit`] pipeline (markers after the
//! outputs are acknowledged, state after the markers), retried when a delivery fails.

use super::*;

impl Core {
    /// Whether the batch should be made durable now. The clock is read every 64 inputs only.
    pub(super) fn batch_due(&self) -> bool {
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
                .any(|p| p.life.owes_claim() || p.proc.state().staged() > 0))
            && self.batch_started.elapsed() >= interval
    }

    /// Stages each partition's input offsets (those that moved) with its open batch.
    pub(super) fn stage_offsets(&mut self) -> Vec<(String, i32, i64)> {
        let mut moved = Vec::new();
        for (p, part) in self.parts.iter_mut() {
            for (topic, next) in part.life.take_moved().unwrap_or_default() {
                part.proc
                    .state_mut()
                    .stage_meta(&offset_key(&topic), next.to_be_bytes().to_vec());
                moved.push((topic, *p, next));
            }
        }
        moved
    }

    /// Whether the open batch holds anything to make durable: inputs, staged state, a claim.
    pub(super) fn batch_open_work(&self) -> bool {
        self.batch_inputs > 0
            || self
                .parts
                .values()
                .any(|p| p.life.has_work() || p.proc.state().staged() > 0)
    }

    /// at_least_once: closes the open batch (its state sealed as a generation in each
    /// partition's `State`) and opens the next; the batch becomes durable later, as the
    /// [`commit`] pipeline says (see [`Core::pump`]). Processing goes on meanwhile.
    pub(super) fn close_batch(&mut self) {
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
    pub(super) fn pump(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        wait: Duration,
    ) -> anyhow::Result<()> {
        serve_reports(&self.producer, wait);
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
    pub(super) fn drain(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        sealed_only: bool,
    ) -> anyhow::Result<()> {
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
    pub(super) fn send_markers(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        gen: Gen,
    ) -> anyhow::Result<()> {
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
    pub(super) fn fenced(&mut self, e: &dyn std::fmt::Display) -> anyhow::Result<()> {
        self.metrics.fenced.inc();
        warn!(error = %e, "this member was replaced in the group: dropping the uncommitted batches and closing its partitions");
        self.drop_batch()?;
        self.close_all()
    }

    /// at_least_once: batch `gen`'s outputs, changelog changes and markers are acknowledged: its
    /// state goes to each partition's store with the input offsets and changelog position it
    /// reached, in one local batch per partition.
    pub(super) fn write_batch(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        gen: Gen,
    ) -> anyhow::Result<()> {
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
    pub(super) fn note_committed(&self, offsets: impl Iterator<Item = (String, i32, i64)>) {
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
    pub(super) fn write_parts(
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
            // at_least_once: this writer's records since its last marker should sit right
            // after it. Anything else in between is another writer's: this member may be a
            // zombie whose partition has a newer owner, or a zombie wrote into this owner's
            // batch. Either way the local store cannot take the batch as if it were the
            // changelog's next records (a later restore would start past the other writer's
            // records and never see them): the partition is restored again instead.
            let mut rewrite = Vec::new();
            match part
                .life
                .acknowledged(gen, markers.get(p).copied(), self.eos)?
            {
                Written::Unmarked => {}
                Written::Interleaved { expected, found } => {
                    warn!(
                        partition = p,
                        marker_offset = found,
                        expected_offset = expected,
                        "another writer's records are between this batch's changelog records: restoring the partition again from the changelog"
                    );
                    self.metrics.changelog_interleaved.inc();
                    part.proc.discard()?;
                    interleaved.push(*p);
                    continue;
                }
                Written::InPlace {
                    next,
                    epoch,
                    rewrite: keys,
                } => {
                    meta.push((changelog::META_NEXT, next.to_be_bytes().to_vec()));
                    meta.push((changelog::META_EPOCH, epoch.to_be_bytes().to_vec()));
                    rewrite = keys;
                }
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
            if !rewrite.is_empty() {
                // The claim sits where it should: the restore's view is the changelog's, and
                // the dropped keys' values may be written again, with the next batch.
                let state = part.proc.state_mut();
                for (table, key) in rewrite {
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

    /// at_least_once: a batch whose records were not all delivered. A permanent error stops the
    /// service with it; anything else (a broker restart, a timeout) drops every batch not yet
    /// written, rewinds to the last written offsets and goes on after a backoff, under a new
    /// changelog writer name so that a restore never applies the dropped batches' records.
    /// Counted in `waymark_batch_retries_total`.
    pub(super) fn retry_batch(
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
        for part in self.parts.values_mut() {
            part.life.retried(&self.incarnation, self.retries_total);
        }
        self.retries_total += 1;
        // Whether any of their records landed is unknown: counted as none (the marks are
        // dropped), so if some did, the next marker is found out of place and the partition
        // restored again (always safe).
        self.rewind(consumer)?;
        std::thread::sleep(backoff);
        Ok(())
    }

    pub(super) fn writer_header(&self, part: &Part) -> OwnedHeaders {
        OwnedHeaders::new()
            .insert(Header {
                key: changelog::HEADER_WRITER,
                value: Some(part.life.writer()),
            })
            .insert(Header {
                key: changelog::HEADER_GROUP,
                value: Some(&self.cfg.kafka.group_id),
            })
    }

    /// Sends partition `p`'s changes of batch `gen` to the changelog (until its marker follows,
    /// a restore ignores them). `sealed`: the sealed generation's changes (at_least_once),
    /// `None`: the open batch's (exactly_once).
    pub(super) fn send_changes(&mut self, p: i32, gen: Gen, sealed: Option<Gen>) {
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
            part.life.changes_sent(gen, n);
        }
    }

    /// Sends partition `p`'s marker of batch `gen`, after its changes, if it owes one: changes,
    /// or a claim. A partition opened after the batch closed has no part in it (its claim goes
    /// with its own first batch).
    pub(super) fn send_marker(&mut self, p: i32, gen: Gen, sealed: Option<Gen>) {
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
        if !part.life.owes_marker(ops) {
            return;
        }
        self.send_raw(
            Out {
                topic: &self.cfg.topics.changelog,
                partition: Some(p),
                key: &changelog::marker_key(part.life.writer()),
                value: Some(&changelog::marker_value(part.life.epoch())),
                headers: Some(self.writer_header(part)),
                opaque: Opaque::marker(gen, p),
            },
            gen,
        );
        self.metrics.changelog_records.inc();
        let part = self.parts.get_mut(&p).expect("checked above");
        part.life.marker_sent(gen);
    }

    /// at_least_once: sends sealed batch `gen`'s changes to the changelog of every partition, if
    /// not sent yet. Each batch's changes go after the markers of every older batch (a restore
    /// applies all of a writer's records up to its marker: the next batch's changes must not
    /// come before this batch's marker).
    pub(super) fn send_batch_changes(&mut self, gen: Gen) {
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
}
