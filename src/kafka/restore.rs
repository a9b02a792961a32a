//! Restoring partitions' local stores from the changelog, all assigned partitions at once: one
//! reader assigned to every changelog partition that has records to apply, each record handed
//! to its partition's [`changelog::Replayer`]. (One after another, eight partitions took about
//! 100 ms each on a quiet broker, most of it round trips: the fetches now overlap.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use super::{changelog, router};
use crate::metrics::Metrics;
use crate::store::rocks::RocksStore;
use crate::store::{Batch, Store, Table};

/// How a partition's restore ended.
pub enum Restored {
    Done(changelog::Restore),
    /// The local store is ahead of the changelog: it must be rebuilt from scratch.
    Ahead {
        local: i64,
        end: i64,
    },
}

/// What a restore needs besides the stores.
pub struct Restorer<'a> {
    pub consumer: &'a BaseConsumer,
    pub topic: &'a str,
    pub group: &'a str,
    pub metrics: &'a Metrics,
    /// A test failpoint: each partition's restore is held this long after the changelog's end
    /// was read.
    pub delay: Option<Duration>,
}

/// One partition being read.
struct Reading<'a> {
    store: &'a RocksStore,
    replayer: changelog::Replayer,
    next: i64,
    high: i64,
    batch: Batch,
    counter: prometheus::IntCounter,
}

/// A restore that stops making progress for this long fails (and says where it stood).
const STALL: Duration = Duration::from_secs(60);

impl Restorer<'_> {
    /// Brings each partition's local store up to the changelog's end: each writer's batch is
    /// applied when its marker is read (see [`changelog`]). Results are in the order given.
    pub fn restore(&self, stores: &[(i32, &RocksStore)]) -> anyhow::Result<Vec<Restored>> {
        let t0 = Instant::now();
        let topic = self.topic;
        let mut results: Vec<Option<Restored>> = Vec::with_capacity(stores.len());
        let mut reading: HashMap<i32, Reading<'_>> = HashMap::new();
        for &(p, store) in stores {
            // Exported from the first restore on, at 0 when there is nothing to read.
            let counter = self
                .metrics
                .restore_records
                .with_label_values(&[&p.to_string()]);
            let from =
                changelog::meta_i64(store.get(Table::Meta, changelog::META_NEXT.as_bytes())?)
                    .unwrap_or(0);
            let epoch =
                changelog::meta_i64(store.get(Table::Meta, changelog::META_EPOCH.as_bytes())?)
                    .unwrap_or(0) as u64;
            let (low, high) = self
                .consumer
                .fetch_watermarks(topic, p, Duration::from_secs(30))
                .with_context(|| format!("reading the end of changelog {topic}/{p}"))?;
            debug!(
                partition = p,
                low,
                high,
                from,
                ms = t0.elapsed().as_millis() as u64,
                "restore: changelog watermarks"
            );
            if from > high {
                results.push(Some(Restored::Ahead {
                    local: from,
                    end: high,
                }));
                continue;
            }
            let start = from.max(low);
            let replayer = changelog::Replayer::new(epoch);
            if start >= high {
                results.push(Some(Restored::Done(changelog::Restore {
                    end: high,
                    ..replayer.finish()
                })));
                continue;
            }
            results.push(None);
            reading.insert(
                p,
                Reading {
                    store,
                    replayer,
                    next: start,
                    high,
                    batch: Batch::default(),
                    counter,
                },
            );
        }
        if let Some(d) = self.delay {
            warn!(
                ms = d.as_millis() as u64,
                "failpoint restore_delay: holding the restore"
            );
            std::thread::sleep(d * stores.len().max(1) as u32);
        }
        if !reading.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (p, r) in &reading {
                tpl.add_partition_offset(topic, *p, Offset::Offset(r.next))?;
            }
            self.consumer.assign(&tpl)?;
            let result = self.read(&mut reading);
            let _ = self.consumer.unassign();
            result?;
        }
        debug!(
            partitions = stores.len(),
            ms = t0.elapsed().as_millis() as u64,
            "restore: read to the end"
        );
        let mut done: HashMap<i32, changelog::Restore> = reading
            .into_iter()
            .map(|(p, r)| {
                (
                    p,
                    changelog::Restore {
                        end: r.high,
                        ..r.replayer.finish()
                    },
                )
            })
            .collect();
        Ok(results
            .into_iter()
            .zip(stores)
            .map(|(r, (p, _))| {
                r.unwrap_or_else(|| Restored::Done(done.remove(p).expect("read above")))
            })
            .collect())
    }

    /// Reads every partition in `reading` to its end.
    fn read(&self, reading: &mut HashMap<i32, Reading<'_>>) -> anyhow::Result<()> {
        let topic = self.topic;
        let mut open = reading.len();
        let mut last_progress = Instant::now();
        while open > 0 {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    let p = m.partition();
                    let Some(r) = reading.get_mut(&p) else {
                        continue;
                    };
                    if r.next >= r.high {
                        continue;
                    }
                    r.next = m.offset() + 1;
                    r.counter.inc();
                    let group = router::header(m.headers(), changelog::HEADER_GROUP);
                    changelog::check_group(self.group, group.as_deref())
                        .map_err(|e| anyhow!("changelog {topic}/{p} offset {}: {e}", m.offset()))?;
                    let writer =
                        router::header(m.headers(), changelog::HEADER_WRITER).unwrap_or_default();
                    let key = m.key().unwrap_or_default();
                    let closed = match r.replayer.feed(m.offset(), &writer, key, m.payload()) {
                        Ok(closed) => closed,
                        Err(e) => {
                            // Not ours to repair: skipped, counted, said.
                            self.metrics.changelog_corrupt.inc();
                            warn!(partition = p, offset = m.offset(), error = %e, "restore: skipping a changelog record that cannot be decoded");
                            None
                        }
                    };
                    if let Some(b) = closed {
                        r.batch.ops.extend(b.ops);
                        if r.batch.ops.len() >= 10_000 {
                            r.store.write(&r.batch)?;
                            r.batch.clear();
                        }
                    }
                    if r.next >= r.high {
                        open -= 1;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    if let Some(r) = reading.get_mut(&p) {
                        if r.next < r.high {
                            // The end moved below what the watermark said (records deleted):
                            // nothing more to read here.
                            r.next = r.high;
                            open -= 1;
                        }
                    }
                }
                Some(Err(e)) => warn!(error = %e, "restore: consumer error"),
                None => {}
            }
            if last_progress.elapsed() > STALL {
                let behind: Vec<String> = reading
                    .iter()
                    .filter(|(_, r)| r.next < r.high)
                    .map(|(p, r)| format!("partition {p} at offset {} of {}", r.next, r.high))
                    .collect();
                bail!(
                    "restoring: no changelog record for 60 s ({})",
                    behind.join(", ")
                );
            }
        }
        for r in reading.values_mut() {
            r.store.write(&r.batch)?;
            r.batch.clear();
        }
        Ok(())
    }
}
