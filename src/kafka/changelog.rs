//! The changelog: every state change, written to a topic co-partitioned with the input, so a
//! partition's state can be rebuilt on whichever instance owns it next.
//!
//! Format. A committed batch of partition `p` is a run of records on changelog partition `p`:
//! one per changed key (key = table tag + store key, value = the new value or a tombstone),
//! followed by a **marker** (key = [`MARKER_PREFIX`] + writer, value = `{"epoch": E}`). Every
//! record carries the writer's name in the `waymark-writer` header. A writer is one owner of one
//! partition: it claims the partition with an epoch one above the highest it restored and writes
//! a marker with no changes at once.
//!
//! Restore ([`Replayer`]) buffers each writer's records until that writer's marker, then applies
//! them in one local batch together with the changelog offset reached. So:
//! - records of a batch whose writer died before its marker are never applied (the new owner
//!   redoes that work from the input offsets of the last applied marker);
//! - a marker whose epoch is below the highest applied is a zombie's (an owner that lost the
//!   partition and did not know yet): its batch is dropped;
//! - with `cleanup.policy=compact`, older values of a key and older markers of the same writer
//!   may vanish; every surviving record still precedes a surviving marker of its writer, so what
//!   is applied is the same. One hazard remains: a dropped record (unfinished or a zombie's) is
//!   the newest of its key, so compaction could remove the committed value before it. Two things
//!   close it: the restore reports the keys it dropped ([`Restore::dropped`]) and the new owner
//!   writes their values again in the batch after its claim (once the claim is acknowledged in
//!   place), so a committed record is again the newest;
//!   and the topic is created with `min.compaction.lag.ms` (`state.changelog_min_compaction_lag_ms`),
//!   so a record that young cannot make the cleaner drop an older one before that claim.

use std::collections::{BTreeSet, HashMap};

use crate::store::{Batch, Put, Table};

/// Header naming the writer of a changelog record.
pub const HEADER_WRITER: &str = "waymark-writer";
/// Header naming the consumer group (the deployment) of the writer.
pub const HEADER_GROUP: &str = "waymark-group";

/// Whether a changelog record written by `theirs` (its [`HEADER_GROUP`], if any) may be restored
/// by a deployment of group `ours`. Records without the header (written before it existed) are
/// accepted; a record of another group means two deployments share one changelog topic, whose
/// sessions would mix: an error that says so.
pub fn check_group(ours: &str, theirs: Option<&str>) -> Result<(), String> {
    match theirs {
        Some(g) if g != ours => Err(format!(
            "it holds records written by consumer group {g:?}, and this is group {ours:?}: two deployments share one changelog topic. Give each its own `topics.changelog` (and `topics.route`); their defaults derive from `kafka.group_id`"
        )),
        _ => Ok(()),
    }
}
/// Key prefix of markers (no store key starts with 0xff: table tags are ASCII).
pub const MARKER_PREFIX: &[u8] = b"\xffwaymark-commit/";

/// Local-only metadata (never written to the changelog): the next changelog offset to restore
/// from, and the epoch of the last applied marker.
pub const META_NEXT: &str = "changelog/next";
pub const META_EPOCH: &str = "changelog/epoch";

fn tag(t: Table) -> u8 {
    match t {
        Table::Sessions => b's',
        Table::Meta => b'm',
        Table::Profiles => b'p',
    }
}

/// The changelog key of a store key.
pub fn record_key(table: Table, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(tag(table));
    k.extend_from_slice(key);
    k
}

pub fn marker_key(writer: &str) -> Vec<u8> {
    let mut k = MARKER_PREFIX.to_vec();
    k.extend_from_slice(writer.as_bytes());
    k
}

pub fn marker_value(epoch: u64) -> Vec<u8> {
    format!("{{\"epoch\":{epoch}}}").into_bytes()
}

/// Whether a key is local-only metadata that never goes to the changelog.
pub fn is_local_meta(table: Table, key: &[u8]) -> bool {
    table == Table::Meta && key.starts_with(b"changelog/")
}

/// What one changelog record is.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Change(Put),
    Marker { epoch: u64 },
}

/// Decodes a changelog record; `Err` names what is wrong with it.
pub fn decode(key: &[u8], value: Option<&[u8]>) -> Result<Entry, String> {
    if key.starts_with(MARKER_PREFIX) {
        let v: serde_json::Value = serde_json::from_slice(value.unwrap_or_default())
            .map_err(|e| format!("marker value is not JSON: {e}"))?;
        let epoch = v["epoch"]
            .as_u64()
            .ok_or_else(|| "marker without an epoch".to_string())?;
        return Ok(Entry::Marker { epoch });
    }
    let table = match key.first() {
        Some(b's') => Table::Sessions,
        Some(b'm') => Table::Meta,
        Some(b'p') => Table::Profiles,
        _ => return Err("record key without a table tag".into()),
    };
    Ok(Entry::Change(Put {
        table,
        key: key[1..].to_vec(),
        value: value.map(<[u8]>::to_vec),
    }))
}

/// Counts of one restore.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreStats {
    pub records: u64,
    pub batches: u64,
    /// Batches of zombie writers (epoch below the highest applied), dropped.
    pub stale_batches: u64,
    /// Records left without a marker at the end (a writer that died mid-batch), dropped.
    pub unfinished: u64,
}

/// What a restore did: its counts, and the keys of the records it dropped.
#[derive(Debug, Default)]
pub struct Restore {
    pub stats: RestoreStats,
    /// Keys (table, store key) written by dropped records: unfinished batches and zombies'.
    pub dropped: BTreeSet<(Table, Vec<u8>)>,
    /// The changelog's end offset when the restore began: what it read to. The owner's next
    /// record should land there if nobody else writes the partition.
    pub end: i64,
}

/// Turns changelog records, in offset order, into local write batches.
#[derive(Debug)]
pub struct Replayer {
    epoch: u64,
    pending: HashMap<String, Vec<Put>>,
    dropped: BTreeSet<(Table, Vec<u8>)>,
    pub stats: RestoreStats,
}

impl Replayer {
    /// `epoch`: the highest epoch the local store has applied (0 for none).
    pub fn new(epoch: u64) -> Replayer {
        Replayer {
            epoch,
            pending: HashMap::new(),
            dropped: BTreeSet::new(),
            stats: RestoreStats::default(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Feeds the record at `offset`. Returns the batch to write when it closes a writer's batch;
    /// the batch also moves the local restore position past the marker.
    pub fn feed(
        &mut self,
        offset: i64,
        writer: &str,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Option<Batch>, String> {
        self.stats.records += 1;
        match decode(key, value)? {
            Entry::Change(put) => {
                self.pending
                    .entry(writer.to_string())
                    .or_default()
                    .push(put);
                Ok(None)
            }
            Entry::Marker { epoch } => {
                let ops = self.pending.remove(writer).unwrap_or_default();
                if epoch < self.epoch {
                    self.stats.stale_batches += 1;
                    self.dropped
                        .extend(ops.into_iter().map(|put| (put.table, put.key)));
                    return Ok(None);
                }
                self.epoch = epoch;
                self.stats.batches += 1;
                let mut batch = Batch { ops };
                batch.put(
                    Table::Meta,
                    META_NEXT.as_bytes().to_vec(),
                    (offset + 1).to_be_bytes().to_vec(),
                );
                batch.put(
                    Table::Meta,
                    META_EPOCH.as_bytes().to_vec(),
                    epoch.to_be_bytes().to_vec(),
                );
                Ok(Some(batch))
            }
        }
    }

    /// Ends the restore: what was never closed by a marker is dropped.
    pub fn finish(mut self) -> Restore {
        self.stats.unfinished = self.pending.values().map(|v| v.len() as u64).sum();
        for put in self.pending.into_values().flatten() {
            self.dropped.insert((put.table, put.key));
        }
        Restore {
            stats: self.stats,
            dropped: self.dropped,
            end: 0,
        }
    }
}

/// Reads a big-endian i64/u64 meta value.
pub fn meta_i64(v: Option<Vec<u8>>) -> Option<i64> {
    v.and_then(|v| v.try_into().ok()).map(i64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, value: Option<&str>) -> (Vec<u8>, Option<Vec<u8>>) {
        (
            record_key(Table::Sessions, key.as_bytes()),
            value.map(|v| v.as_bytes().to_vec()),
        )
    }

    /// (writer, key, value) records in offset order.
    type Log<'a> = [(&'a str, Vec<u8>, Option<Vec<u8>>)];

    fn feed_all(r: &mut Replayer, log: &Log<'_>) -> Vec<Batch> {
        let mut out = Vec::new();
        for (i, (w, k, v)) in log.iter().enumerate() {
            if let Some(b) = r.feed(i as i64, w, k, v.as_deref()).unwrap() {
                out.push(b);
            }
        }
        out
    }

    fn keys(b: &Batch) -> Vec<String> {
        b.ops
            .iter()
            .filter(|p| p.table == Table::Sessions)
            .map(|p| String::from_utf8_lossy(&p.key).into_owned())
            .collect()
    }

    #[test]
    fn a_batch_applies_at_its_marker_with_the_position_after_it() {
        let (k1, v1) = change("a", Some("1"));
        let (k2, v2) = change("b", None);
        let mut r = Replayer::new(0);
        let out = feed_all(
            &mut r,
            &[
                ("w1", k1, v1),
                ("w1", k2, v2),
                ("w1", marker_key("w1"), Some(marker_value(1))),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(keys(&out[0]), ["a", "b"]);
        assert_eq!(out[0].ops[1].value, None, "a tombstone deletes");
        let next = out[0]
            .ops
            .iter()
            .find(|p| p.key == META_NEXT.as_bytes())
            .unwrap();
        assert_eq!(next.value.as_deref(), Some(&3i64.to_be_bytes()[..]));
        let stats = r.finish().stats;
        assert_eq!(stats.batches, 1);
        assert_eq!(stats.records, 3);
    }

    #[test]
    fn a_dead_writers_unfinished_batch_is_dropped() {
        let (k1, v1) = change("a", Some("1"));
        let (k2, v2) = change("b", Some("2"));
        let mut r = Replayer::new(0);
        let out = feed_all(
            &mut r,
            &[
                ("w1", k1, v1),
                // w1 died; w2 claims and writes its own batch.
                ("w2", marker_key("w2"), Some(marker_value(2))),
                ("w2", k2, v2),
                ("w2", marker_key("w2"), Some(marker_value(2))),
            ],
        );
        assert_eq!(out.len(), 2);
        assert!(keys(&out[0]).is_empty());
        assert_eq!(keys(&out[1]), ["b"]);
        let done = r.finish();
        assert_eq!(done.stats.unfinished, 1);
        assert_eq!(
            done.dropped.into_iter().collect::<Vec<_>>(),
            [(Table::Sessions, b"a".to_vec())],
            "the dropped key is reported, to be written again by the new owner"
        );
    }

    #[test]
    fn a_zombies_batch_after_a_newer_claim_is_dropped() {
        let (k1, v1) = change("a", Some("zombie"));
        let (k2, v2) = change("b", Some("owner"));
        let mut r = Replayer::new(0);
        let out = feed_all(
            &mut r,
            &[
                ("old", marker_key("old"), Some(marker_value(1))),
                ("new", marker_key("new"), Some(marker_value(2))),
                ("old", k1, v1),
                ("new", k2, v2),
                ("old", marker_key("old"), Some(marker_value(1))),
                ("new", marker_key("new"), Some(marker_value(2))),
            ],
        );
        let applied: Vec<String> = out.iter().flat_map(keys).collect();
        assert_eq!(applied, ["b"]);
        let done = r.finish();
        assert_eq!(done.stats.stale_batches, 1);
        assert_eq!(done.stats.unfinished, 0);
        assert_eq!(
            done.dropped.into_iter().collect::<Vec<_>>(),
            [(Table::Sessions, b"a".to_vec())]
        );
    }

    #[test]
    fn a_restore_starts_from_the_local_epoch() {
        let (k1, v1) = change("a", Some("1"));
        let mut r = Replayer::new(5);
        let out = feed_all(
            &mut r,
            &[("w", k1, v1), ("w", marker_key("w"), Some(marker_value(4)))],
        );
        assert!(out.is_empty());
        assert_eq!(r.epoch(), 5);
    }

    #[test]
    fn undecodable_records_are_errors() {
        let mut r = Replayer::new(0);
        assert!(r.feed(0, "w", b"", Some(b"x")).is_err());
        assert!(r.feed(1, "w", &marker_key("w"), Some(b"nope")).is_err());
        assert!(matches!(
            decode(&record_key(Table::Meta, b"offset/t"), Some(b"1")),
            Ok(Entry::Change(Put {
                table: Table::Meta,
                ..
            }))
        ));
    }

    #[test]
    fn a_record_of_another_group_is_refused_with_what_to_do() {
        assert!(check_group("prod", Some("prod")).is_ok());
        assert!(
            check_group("prod", None).is_ok(),
            "records from before the header"
        );
        let e = check_group("prod", Some("staging")).unwrap_err();
        assert!(e.contains("\"staging\"") && e.contains("\"prod\""), "{e}");
        assert!(e.contains("topics.changelog"), "{e}");
    }
}
