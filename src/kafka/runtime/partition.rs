//! A partition's life on this member: opened and restored (all assigned at once), claimed,
//! restored again when another writer's records are found between its own, rewound, closed.

use super::*;

impl Core {
    pub(super) fn state_dir(&self, p: i32) -> PathBuf {
        self.cfg.state.dir.join(format!("partition-{p}"))
    }

    /// The changelog reader, when the changelog is on.
    pub(super) fn restorer(&self) -> Option<Restorer<'_>> {
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

    /// Opens partition `p`'s store. Another processing thread of this process may still hold it
    /// for a moment (the group handed the partition over, and that thread has not served its
    /// revocation yet): a store locked by this process is waited for, up to a minute.
    pub(super) fn open_store(&self, p: i32) -> anyhow::Result<RocksStore> {
        let started = Instant::now();
        let mut said = false;
        loop {
            match RocksStore::open(&self.state_dir(p), self.cfg.state.sync) {
                Ok(store) => return Ok(store),
                Err(e)
                    if e.to_string().contains("lock hold by current process")
                        && started.elapsed() < Duration::from_secs(60) =>
                {
                    if !said {
                        info!(
                            partition = p,
                            "another processing thread still holds this partition's store: waiting for it to let go"
                        );
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("opening the state of partition {p}"))
                }
            }
        }
    }

    /// Opens the stores of partitions `ps` and restores them from the changelog, all at once,
    /// rebuilding a store from scratch when the local copy is ahead of the changelog (a
    /// recreated topic).
    pub(super) fn open_partitions(
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
    pub(super) fn open_part(&mut self, p: i32) -> anyhow::Result<()> {
        self.open_parts(&[p])
    }

    /// Opens partitions' stores, restores them from the changelog together, and makes this
    /// member their writer with the next epoch (the claims go out with the next commit).
    pub(super) fn open_parts(&mut self, ps: &[i32]) -> anyhow::Result<()> {
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
    pub(super) fn install_part(
        &mut self,
        p: i32,
        store: RocksStore,
        restored: changelog::Restore,
        restore_ms: u64,
    ) -> anyhow::Result<()> {
        let stored = |key: &str| -> anyhow::Result<i64> {
            Ok(changelog::meta_i64(store.get(Table::Meta, key.as_bytes())?).unwrap_or(0))
        };
        let changelog_next = stored(changelog::META_NEXT)?;
        let epoch = stored(changelog::META_EPOCH)? as u64;
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
        // where it should be (see `Written::InPlace`), so that compaction keeps a committed
        // value for them.
        let rewritten = restored.dropped.len();
        let life = Lifecycle::open(
            p,
            &self.incarnation,
            self.restorer.is_some(),
            lifecycle::Restored {
                epoch,
                changelog_next,
                changelog_end: restored.end,
                dropped: restored.dropped.into_iter().collect(),
            },
        );
        let epoch = life.epoch();
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
                life,
                consumed: HashMap::new(),
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
    pub(super) fn assign(&mut self, tpl: &mut TopicPartitionList) -> anyhow::Result<()> {
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
            let offset = Offset::Offset(part.life.start(topic, stored));
            tpl.set_partition_offset(topic, *p, offset)?;
        }
        self.report_assigned();
        Ok(())
    }

    /// Closes every store. Unless the partitions were lost to another member, every batch is
    /// made durable first; lost batches are dropped (their new owner redoes them).
    pub(super) fn revoke_all(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        lost: bool,
    ) -> anyhow::Result<()> {
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
    pub(super) fn make_durable(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<()> {
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
    pub(super) fn drop_batch(&mut self) -> anyhow::Result<()> {
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
            let stored = stored_offsets(&part.proc, part.life.offsets())?;
            part.life.dropped(|t| stored.get(t).copied().flatten());
        }
        self.batch_inputs = 0;
        self.batch_started = Instant::now();
        self.set_profile_gauge();
        Ok(())
    }

    /// Restores a partition again from the changelog, after another writer's records were found
    /// between this writer's (see [`Written::Interleaved`]). The restore applies what any later restore
    /// would: this member's batch if its epoch is still the highest, a zombie's never. If a newer
    /// owner has claimed the partition (an epoch above this writer's), this member is the zombie:
    /// it gives the partition up (the group takes it away at the next rebalance) and counts
    /// itself fenced. Otherwise it claims the partition again with the next epoch and goes on
    /// from the restored input offsets.
    pub(super) fn reopen(&mut self, consumer: &BaseConsumer<Ctx>, p: i32) -> anyhow::Result<()> {
        let Some(old) = self.parts.remove(&p) else {
            return Ok(());
        };
        for (j, n) in &old.active {
            self.metrics.active_sessions.with_label_values(&[j]).sub(*n);
        }
        // The store is closed before it is opened and restored again.
        let Part {
            proc, life: old, ..
        } = old;
        proc.state().flush()?;
        drop(proc);
        self.open_part(p)?;
        let part = self.parts.get_mut(&p).expect("opened above");
        let stored = stored_offsets(&part.proc, old.offsets())?;
        match old.reclaim(&mut part.life, |t| stored.get(t).copied().flatten()) {
            Reclaim::GiveUp { newer_epoch } => {
                warn!(
                    partition = p,
                    epoch = old.epoch(),
                    newer_epoch,
                    "a newer owner has claimed this partition: giving it up"
                );
                self.metrics.fenced.inc();
                let part = self.parts.remove(&p).expect("opened above");
                for (j, n) in &part.active {
                    self.metrics.active_sessions.with_label_values(&[j]).sub(*n);
                }
                part.proc.state().flush()?;
                self.report_assigned();
                // Its records are no longer this member's to read.
                let mut tpl = TopicPartitionList::new();
                for (topic, _) in old.offsets() {
                    tpl.add_partition(topic, p);
                }
                if let Err(e) = consumer.pause(&tpl) {
                    warn!(partition = p, error = %e, "pausing a partition given up");
                }
            }
            // Inputs up to the restored offsets are in the restored state (later ones the
            // consumer meets are skipped as applied); a restore behind what was consumed has the
            // consumer read the rest again.
            Reclaim::Claim { seeks } => {
                for (topic, next) in seeks {
                    consumer
                        .seek(&topic, p, Offset::Offset(next), Duration::from_secs(10))
                        .map_err(|e| anyhow!("rewinding {topic}/{p} to {next}: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// Aborts the open transaction, drops the batch and points the consumer back at the offsets
    /// the stores hold (the last committed ones).
    pub(super) fn rewind(&mut self, consumer: &BaseConsumer<Ctx>) -> anyhow::Result<()> {
        self.drop_batch()?;
        for (p, part) in self.parts.iter_mut() {
            for (topic, next) in part.life.offsets() {
                consumer
                    .seek(topic, *p, Offset::Offset(next), Duration::from_secs(10))
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
    pub(super) fn close_all(&mut self) -> anyhow::Result<()> {
        for (p, part) in self.parts.drain() {
            for (j, n) in &part.active {
                self.metrics.active_sessions.with_label_values(&[j]).sub(*n);
            }
            part.proc.state().flush()?;
            info!(partition = p, "partition state closed");
        }
        self.report_assigned();
        self.set_profile_gauge();
        Ok(())
    }

    /// `waymark_partitions_assigned`: this member's share of the instance's partitions (every
    /// processing thread is a member of its own and adds what it holds).
    pub(super) fn report_assigned(&mut self) {
        let n = self.parts.len() as i64;
        self.metrics
            .partitions_assigned
            .add(n - std::mem::replace(&mut self.reported.0, n));
    }
}

/// The input offsets a partition's store holds, for each of `topics`.
fn stored_offsets<'a>(
    proc: &Processor<RocksStore>,
    topics: impl Iterator<Item = (&'a str, i64)>,
) -> anyhow::Result<HashMap<String, Option<i64>>> {
    topics
        .map(|(topic, _)| {
            let at = changelog::meta_i64(proc.state().get_meta(&offset_key(topic))?);
            Ok((topic.to_string(), at))
        })
        .collect()
}
