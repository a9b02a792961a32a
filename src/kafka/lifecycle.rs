//! One partition's life on this member, as a pure state machine: no Kafka, no store, no clock.
//!
//! A partition is opened with what its restore found (the highest writer epoch, where the
//! changelog ends), becomes this member's writer with the next epoch and owes a *claim* (a marker
//! that fences older owners, sent even with nothing staged). Inputs below the next offset of
//! their topic are redeliveries; each applied input moves that offset. Each batch sends its
//! changelog changes, then its marker; when the marker is acknowledged, [`Lifecycle::acknowledged`]
//! says whether it sits right after this writer's earlier records (write the batch, with the
//! changelog position it reached) or another writer's records are in between (a zombie, or a newer
//! owner: discard and restore again). After that restore, [`Lifecycle::reclaim`] says whether to
//! give the partition up (a newer epoch exists) or claim it again and where to resume reading.
//!
//! The runtime (`runtime/partition.rs`, `runtime/batch.rs`, `runtime/input.rs`) does the I/O each
//! answer asks for; everything decided here is unit-tested below without a broker, in the manner
//! of [`super::changelog::Replayer`] and [`super::commit::Pipeline`].

use std::collections::{HashMap, VecDeque};

use super::commit::Gen;
use crate::store::Table;

/// What a partition's restore found in its store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Restored {
    /// The highest writer epoch the store records (0: none yet).
    pub epoch: u64,
    /// The changelog offset the store has reached (never goes backwards).
    pub changelog_next: i64,
    /// Where the changelog ends: this writer's next record lands there if nobody else writes.
    pub changelog_end: i64,
    /// Keys whose newest changelog record the restore dropped (a dead writer's unfinished batch,
    /// a zombie's): their current value is written again once the claim is found in place.
    pub dropped: Vec<(Table, Vec<u8>)>,
}

/// What to do with a batch of this partition once its acknowledgements are in.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// The batch sent no marker for this partition: write its state as it is.
    Unmarked,
    /// The marker sits right after this writer's earlier records: write the batch with the
    /// changelog position it reached (`next`) and this writer's epoch; `rewrite` holds keys to
    /// stage again with the next batch (the dropped keys, released by the first marker in place).
    InPlace {
        next: i64,
        epoch: u64,
        rewrite: Vec<(Table, Vec<u8>)>,
    },
    /// Another writer's records are between this batch's: discard it and restore the partition
    /// again (every marker in flight is forgotten).
    Interleaved { expected: i64, found: i64 },
}

/// After a partition was restored again: give it up, or claim it again.
#[derive(Debug, Clone, PartialEq)]
pub enum Reclaim {
    /// A newer owner has claimed it (an epoch above this writer's): this member is the zombie.
    GiveUp { newer_epoch: u64 },
    /// Still this member's, with a new epoch; the consumer goes back to these offsets, where the
    /// restore is behind what was consumed.
    Claim { seeks: Vec<(String, i64)> },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LifecycleError {
    #[error("the changelog marker of partition {0} was acknowledged without an offset")]
    MarkerWithoutOffset(i32),
    #[error("changelog position of partition {partition} would go backwards ({from} -> {to})")]
    Backwards { partition: i32, from: i64, to: i64 },
}

/// One partition's writer and reader positions on this member.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    partition: i32,
    /// Whether the changelog is on (markers and claims exist at all).
    changelog: bool,
    /// This owner's epoch (one above the highest restored) and its name in the changelog.
    epoch: u64,
    writer: String,
    /// A marker is owed even with nothing staged: the claim that fences older owners.
    claim: bool,
    /// The changelog offset the local store has reached.
    changelog_next: i64,
    /// Where this writer's next changelog record lands if nobody else writes the partition (the
    /// restore's end, then one past each marker in place).
    changelog_tail: i64,
    /// How many changelog records each batch whose marker is in flight sent, oldest first.
    marks: VecDeque<(Gen, i64)>,
    rewrite: Vec<(Table, Vec<u8>)>,
    /// The next input offset to apply, per topic.
    next: HashMap<String, i64>,
    /// Whether an input offset moved since the last batch staged them.
    moved: bool,
}

impl Lifecycle {
    /// A partition just restored: this member becomes its writer with the next epoch, named
    /// `{incarnation}-p{partition}-e{epoch}`, and owes a claim when the changelog is on.
    pub fn open(partition: i32, incarnation: &str, changelog: bool, restored: Restored) -> Self {
        let epoch = restored.epoch + 1;
        Lifecycle {
            partition,
            changelog,
            epoch,
            writer: format!("{incarnation}-p{partition}-e{epoch}"),
            claim: changelog,
            changelog_next: restored.changelog_next,
            changelog_tail: restored.changelog_end,
            marks: VecDeque::new(),
            rewrite: restored.dropped,
            next: HashMap::new(),
            moved: false,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// This writer's name in the changelog (its records' header, its markers' key).
    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// Whether the claim is still to be sent.
    pub fn owes_claim(&self) -> bool {
        self.claim
    }

    /// How many keys wait to be written again after the claim.
    pub fn rewrites(&self) -> usize {
        self.rewrite.len()
    }

    /// Starts reading `topic` where the store's applied offset says (`None`: from 0, the state
    /// being rebuilt from the start of the input); returns the offset to read from.
    pub fn start(&mut self, topic: &str, stored: Option<i64>) -> i64 {
        let next = stored.unwrap_or(0);
        self.next.insert(topic.to_string(), next);
        next
    }

    /// Whether the input at `offset` of `topic` is already in the state (a redelivery).
    pub fn is_applied(&self, topic: &str, offset: i64) -> bool {
        self.next.get(topic).is_some_and(|&next| offset < next)
    }

    /// An input was handled (processed, forwarded or dead-lettered): reading goes on after it.
    pub fn applied(&mut self, topic: &str, offset: i64) {
        match self.next.get_mut(topic) {
            Some(next) => *next = offset + 1,
            None => {
                self.next.insert(topic.to_string(), offset + 1);
            }
        }
        self.moved = true;
    }

    /// The next offset to apply of `topic`, if it was started or read.
    pub fn next(&self, topic: &str) -> Option<i64> {
        self.next.get(topic).copied()
    }

    /// Every topic's next offset.
    pub fn offsets(&self) -> impl Iterator<Item = (&str, i64)> {
        self.next.iter().map(|(t, n)| (t.as_str(), *n))
    }

    /// Whether the open batch must be made durable even without inputs: offsets moved, or a claim
    /// is owed.
    pub fn has_work(&self) -> bool {
        self.moved || self.claim
    }

    /// The offsets to stage with the batch being closed: all of them if any moved since the last
    /// batch, else none.
    pub fn take_moved(&mut self) -> Option<Vec<(String, i64)>> {
        if !std::mem::take(&mut self.moved) {
            return None;
        }
        Some(self.next.iter().map(|(t, n)| (t.clone(), *n)).collect())
    }

    /// Batch `gen` sent `n` changelog records of this partition.
    pub fn changes_sent(&mut self, gen: Gen, n: i64) {
        if n > 0 {
            self.count(gen, n);
        }
    }

    /// Whether a batch with `ops` staged changes owes a marker: changes, or the claim (never
    /// without a changelog).
    pub fn owes_marker(&self, ops: usize) -> bool {
        self.changelog && (self.claim || ops > 0)
    }

    /// Batch `gen`'s marker was sent: the claim, if owed, is in it.
    pub fn marker_sent(&mut self, gen: Gen) {
        self.count(gen, 1);
        self.claim = false;
    }

    fn count(&mut self, gen: Gen, n: i64) {
        match self.marks.back_mut() {
            Some((g, sent)) if *g == gen => *sent += n,
            _ => self.marks.push_back((gen, n)),
        }
    }

    /// Batch `gen`'s records are all acknowledged, its marker (if it sent one for this partition)
    /// at `marker`. at_least_once (`eos` false): the marker must sit right after this writer's
    /// earlier records; under exactly_once transaction markers take offsets too, and the producer
    /// fence keeps zombies out, so any offset is in place.
    pub fn acknowledged(
        &mut self,
        gen: Gen,
        marker: Option<i64>,
        eos: bool,
    ) -> Result<Written, LifecycleError> {
        if self.marks.front().is_none_or(|m| m.0 != gen) {
            return Ok(Written::Unmarked);
        }
        let (_, sent) = self.marks.pop_front().expect("checked");
        let offset = marker.ok_or(LifecycleError::MarkerWithoutOffset(self.partition))?;
        let expected = self.changelog_tail + sent - 1;
        if !eos && offset != expected {
            self.marks.clear();
            self.moved = false;
            return Ok(Written::Interleaved {
                expected,
                found: offset,
            });
        }
        let next = offset + 1;
        if next < self.changelog_next {
            return Err(LifecycleError::Backwards {
                partition: self.partition,
                from: self.changelog_next,
                to: next,
            });
        }
        self.changelog_tail = next;
        self.changelog_next = next;
        Ok(Written::InPlace {
            next,
            epoch: self.epoch,
            rewrite: std::mem::take(&mut self.rewrite),
        })
    }

    /// Every batch not yet written was dropped (a failed delivery, a rewind, a lost partition):
    /// the markers in flight are forgotten (if some of their records landed, the next marker is
    /// found out of place and the partition restored again, which is always safe) and reading
    /// goes back to the offsets the store holds, given per topic by `stored`.
    pub fn dropped(&mut self, stored: impl Fn(&str) -> Option<i64>) {
        self.marks.clear();
        self.moved = false;
        for (topic, next) in self.next.iter_mut() {
            *next = stored(topic).unwrap_or(0);
        }
    }

    /// A batch is retried after a failed delivery: a new writer name (`-r{retry}`), so that a
    /// restore never applies the dropped batches' records, and a claim again.
    pub fn retried(&mut self, incarnation: &str, retry: u64) {
        self.writer = format!("{incarnation}-p{}-e{}-r{retry}", self.partition, self.epoch);
        self.claim = self.changelog;
    }

    /// This partition was restored again after its marker was found out of place; `self` is the
    /// writer before, `new` the one the restore made. Gives the partition up if an owner newer
    /// than this writer claimed it; else `new` starts where its store is, and the consumer goes
    /// back wherever that is behind what this writer had consumed.
    pub fn reclaim(&self, new: &mut Lifecycle, stored: impl Fn(&str) -> Option<i64>) -> Reclaim {
        let newer = new.epoch - 1;
        if newer > self.epoch {
            return Reclaim::GiveUp { newer_epoch: newer };
        }
        let mut seeks = Vec::new();
        let mut topics: Vec<(&String, &i64)> = self.next.iter().collect();
        topics.sort();
        for (topic, &consumed) in topics {
            let next = new.start(topic, stored(topic));
            if next < consumed {
                seeks.push((topic.clone(), next));
            }
        }
        Reclaim::Claim { seeks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(epoch: u64, end: i64) -> Lifecycle {
        Lifecycle::open(
            3,
            "host-1",
            true,
            Restored {
                epoch,
                changelog_next: end,
                changelog_end: end,
                dropped: vec![(Table::Sessions, b"k".to_vec())],
            },
        )
    }

    #[test]
    fn an_opened_partition_is_claimed_with_the_next_epoch() {
        let life = opened(4, 100);
        assert_eq!(life.epoch(), 5);
        assert_eq!(life.writer(), "host-1-p3-e5");
        assert!(life.owes_claim());
        // The claim is owed with nothing staged, and is work for a batch of its own.
        assert!(life.owes_marker(0));
        assert!(life.has_work());
    }

    #[test]
    fn without_a_changelog_nothing_is_claimed_or_marked() {
        let mut life = Lifecycle::open(0, "h", false, Restored::default());
        assert_eq!(life.epoch(), 1);
        assert!(!life.owes_claim());
        assert!(!life.owes_marker(10));
        assert!(!life.has_work());
        life.retried("h", 1);
        assert!(!life.owes_claim());
        // No marker was sent, so a batch is written as it is.
        assert_eq!(life.acknowledged(1, None, false), Ok(Written::Unmarked));
    }

    #[test]
    fn inputs_below_the_stored_offset_are_redeliveries_and_applied_ones_move_it() {
        let mut life = opened(0, 0);
        assert_eq!(life.start("events", Some(40)), 40);
        assert_eq!(life.start("route", None), 0);
        assert!(life.is_applied("events", 39));
        assert!(!life.is_applied("events", 40));
        // A topic never started (no assignment seen yet) has nothing applied.
        assert!(!life.is_applied("profiles", 0));
        // A claim is work, offsets not yet: nothing moved.
        assert_eq!(life.take_moved(), None);
        life.applied("events", 40);
        life.applied("events", 41);
        assert!(life.is_applied("events", 41));
        assert_eq!(life.next("events"), Some(42));
        let mut moved = life.take_moved().expect("offsets moved");
        moved.sort();
        assert_eq!(moved, vec![("events".into(), 42), ("route".into(), 0)]);
        // Staged once: the next batch has none to stage until another input is applied.
        assert_eq!(life.take_moved(), None);
    }

    #[test]
    fn the_claim_goes_with_the_first_marker_only() {
        let mut life = opened(0, 10);
        life.marker_sent(1);
        assert!(!life.owes_claim());
        assert!(!life.owes_marker(0), "nothing staged, no claim: no marker");
        assert!(life.owes_marker(2));
    }

    #[test]
    fn a_marker_in_place_writes_the_batch_and_releases_the_dropped_keys_once() {
        let mut life = opened(1, 10);
        // Batch 1: the claim alone, at offset 10.
        life.marker_sent(1);
        match life.acknowledged(1, Some(10), false) {
            Ok(Written::InPlace {
                next,
                epoch,
                rewrite,
            }) => {
                assert_eq!((next, epoch), (11, 2));
                assert_eq!(rewrite, vec![(Table::Sessions, b"k".to_vec())]);
            }
            other => panic!("{other:?}"),
        }
        // Batch 2: three changes and a marker, at 11..=14.
        life.changes_sent(2, 3);
        life.marker_sent(2);
        match life.acknowledged(2, Some(14), false) {
            Ok(Written::InPlace { next, rewrite, .. }) => {
                assert_eq!(next, 15);
                assert!(rewrite.is_empty(), "released once");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batches_in_flight_are_checked_oldest_first_each_after_the_last() {
        let mut life = opened(0, 0);
        life.changes_sent(1, 2);
        life.marker_sent(1); // 0, 1, marker 2
        life.changes_sent(2, 1);
        life.marker_sent(2); // 3, marker 4
                             // A batch that sent nothing for this partition while others wait is not this one's.
        assert_eq!(life.acknowledged(7, Some(99), false), Ok(Written::Unmarked));
        assert!(matches!(
            life.acknowledged(1, Some(2), false),
            Ok(Written::InPlace { next: 3, .. })
        ));
        assert!(matches!(
            life.acknowledged(2, Some(4), false),
            Ok(Written::InPlace { next: 5, .. })
        ));
    }

    #[test]
    fn another_writers_records_between_a_batchs_mean_restore_again() {
        let mut life = opened(0, 0);
        life.applied("events", 5);
        life.changes_sent(1, 2);
        life.marker_sent(1);
        life.changes_sent(2, 2);
        life.marker_sent(2);
        // A zombie wrote one record at offset 1: the marker landed at 3, not 2.
        assert_eq!(
            life.acknowledged(1, Some(3), false),
            Ok(Written::Interleaved {
                expected: 2,
                found: 3
            })
        );
        // Every marker in flight is forgotten with it; the restore decides what comes next.
        assert_eq!(life.acknowledged(2, Some(6), false), Ok(Written::Unmarked));
        assert_eq!(life.take_moved(), None);
    }

    #[test]
    fn exactly_once_takes_any_marker_offset_the_fence_keeps_zombies_out() {
        let mut life = opened(0, 0);
        life.changes_sent(1, 2);
        life.marker_sent(1);
        // A transaction marker took an offset in between.
        assert!(matches!(
            life.acknowledged(1, Some(5), true),
            Ok(Written::InPlace { next: 6, .. })
        ));
        // The next batch is expected after it.
        life.marker_sent(2);
        assert!(matches!(
            life.acknowledged(2, Some(6), false),
            Ok(Written::InPlace { next: 7, .. })
        ));
    }

    #[test]
    fn a_marker_without_an_offset_or_a_position_going_back_is_an_error() {
        let mut life = opened(0, 0);
        life.marker_sent(1);
        assert_eq!(
            life.acknowledged(1, None, false),
            Err(LifecycleError::MarkerWithoutOffset(3))
        );
        // The store reached 50 but the restore ended at 10 (a changelog recreated behind it).
        let mut life = Lifecycle::open(
            3,
            "h",
            true,
            Restored {
                epoch: 0,
                changelog_next: 50,
                changelog_end: 10,
                dropped: vec![],
            },
        );
        life.marker_sent(1);
        assert_eq!(
            life.acknowledged(1, Some(10), false),
            Err(LifecycleError::Backwards {
                partition: 3,
                from: 50,
                to: 11
            })
        );
    }

    #[test]
    fn a_retry_renames_the_writer_claims_again_and_rereads_from_the_store() {
        let mut life = opened(2, 0);
        life.start("events", Some(10));
        life.applied("events", 10);
        life.applied("events", 11);
        life.marker_sent(1);
        life.changes_sent(2, 4);
        life.dropped(|t| (t == "events").then_some(10));
        life.retried("host-1", 7);
        assert_eq!(life.writer(), "host-1-p3-e3-r7");
        assert!(life.owes_claim());
        assert_eq!(life.next("events"), Some(10));
        assert!(!life.is_applied("events", 10));
        assert_eq!(life.take_moved(), None);
        // The dropped batches' marks are gone: the claim's marker is expected where the
        // changelog ended, and if a dropped record landed there it is found out of place.
        life.marker_sent(3);
        assert!(matches!(
            life.acknowledged(3, Some(1), false),
            Ok(Written::Interleaved {
                expected: 0,
                found: 1
            })
        ));
    }

    #[test]
    fn a_restore_that_finds_a_newer_owner_gives_the_partition_up() {
        let old = opened(4, 0); // epoch 5
        let mut new = opened(6, 20); // someone claimed with epoch 6
        assert_eq!(
            old.reclaim(&mut new, |_| Some(0)),
            Reclaim::GiveUp { newer_epoch: 6 }
        );
    }

    #[test]
    fn a_restore_that_finds_only_a_zombie_claims_again_and_rereads_what_it_lost() {
        let mut old = opened(4, 0); // epoch 5
        old.start("events", Some(0));
        old.start("route", Some(0));
        old.applied("events", 29); // consumed to 30
        old.applied("route", 4); // consumed to 5
                                 // The restore applied this writer's records up to events 25 and route 5 (its own
                                 // epoch is still the highest: a zombie of epoch 3 wrote in between).
        let mut new = opened(5, 40);
        assert_eq!(new.epoch(), 6);
        let reclaim = old.reclaim(&mut new, |t| Some(if t == "events" { 25 } else { 5 }));
        assert_eq!(
            reclaim,
            Reclaim::Claim {
                seeks: vec![("events".into(), 25)]
            }
        );
        assert_eq!(new.next("events"), Some(25));
        assert_eq!(new.next("route"), Some(5));
        assert!(new.owes_claim());
    }
}
