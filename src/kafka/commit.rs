//! The at_least_once commit pipeline, as a pure state machine: which batch may send its changelog
//! markers, which may be written to the local store, and when everything in flight must be
//! dropped. No Kafka, clock or store in it; the runtime feeds it what it sent and what the
//! producer acknowledged, and does what [`Pipeline::next_action`] says.
//!
//! A batch (a generation of the state, see `store::State::seal`) goes through three phases:
//!
//! 1. **open**: inputs are processed; every output, routed record and dead letter is sent and
//!    counted with the batch's generation (the record's delivery opaque carries its [`tag`]);
//! 2. **outputs**: closed (sealed); the next batch is already open and being processed. Once every
//!    record of this batch is acknowledged, and every older batch has sent its markers,
//!    [`Action::SendMarkers`]: the runtime sends the batch's changelog changes and markers (they
//!    make the batch part of the partition's state for whoever restores it next, so they never go
//!    out before its outputs are acknowledged) and commits its input offsets to the group;
//! 3. **markers**: once those are acknowledged too and the batch is the oldest,
//!    [`Action::Write`]: its state goes to the local store with the offsets it reached.
//!
//! A failed delivery of any record in flight gives [`Action::Retry`]: every batch not yet written
//! is dropped (the runtime discards the state generations and rewinds the consumer to the
//! offsets of the last written one), as one failed batch was dropped before the pipeline. At most
//! `max_sealed` batches wait in phases 2 and 3 ([`Pipeline::is_full`]: the runtime stops reading
//! input until one is written).

use std::collections::VecDeque;

/// A batch's generation number (grows by one per batch, never reused in a process).
pub type Gen = u64;

/// Bits of a generation carried in a record's delivery opaque.
pub const TAG_BITS: u32 = 14;

/// The part of a generation a record's delivery opaque carries: unique among the batches in
/// flight, which are far fewer than `2^TAG_BITS`.
pub fn tag(gen: Gen) -> u64 {
    gen & ((1 << TAG_BITS) - 1)
}

/// What the runtime must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send this batch's changelog changes and markers, and commit its input offsets to the
    /// group; count them with [`Pipeline::sent`] before asking for the next action.
    SendMarkers(Gen),
    /// Write this batch's state (and the changelog position its markers reached) to the store.
    Write(Gen),
    /// A record in flight was not delivered: drop every batch not yet written, rewind.
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Outputs,
    Markers,
}

#[derive(Debug)]
struct Batch {
    gen: Gen,
    phase: Phase,
    /// Records sent and acknowledged, over all phases.
    sent: u64,
    acked: u64,
}

impl Batch {
    fn new(gen: Gen) -> Batch {
        Batch {
            gen,
            phase: Phase::Open,
            sent: 0,
            acked: 0,
        }
    }

    fn all_acked(&self) -> bool {
        self.acked >= self.sent
    }
}

/// The batches not yet written: sealed ones oldest first, then the open one (always last).
#[derive(Debug)]
pub struct Pipeline {
    batches: VecDeque<Batch>,
    max_sealed: usize,
    failed: bool,
    next: Gen,
}

impl Pipeline {
    /// A pipeline whose first open batch is generation 1; at most `max_sealed` (at least 1)
    /// closed batches wait for their acknowledgements.
    pub fn new(max_sealed: usize) -> Pipeline {
        Pipeline {
            batches: VecDeque::from([Batch::new(1)]),
            max_sealed: max_sealed.max(1),
            failed: false,
            next: 2,
        }
    }

    fn open_batch(&mut self) -> &mut Batch {
        self.batches
            .back_mut()
            .expect("an open batch is always there")
    }

    /// The open batch's generation: the one to tag outputs with.
    pub fn open(&self) -> Gen {
        self.batches.back().expect("always one").gen
    }

    /// `n` more records handed to the producer for `gen`: the open batch's outputs, a closed
    /// batch's changelog changes, or the markers of a batch told to send them. Records of a batch
    /// no longer in flight (dropped) are not counted.
    pub fn sent(&mut self, gen: Gen, n: u64) {
        if let Some(b) = self.batches.iter_mut().find(|b| b.gen == gen) {
            b.sent += n;
        }
    }

    /// Whether every batch older than `gen` has been told to send its markers (so `gen`'s
    /// changelog changes may go out: they must follow those markers).
    pub fn markers_sent_before(&self, gen: Gen) -> bool {
        self.batches
            .iter()
            .take_while(|b| b.gen < gen)
            .all(|b| b.phase == Phase::Markers)
    }

    /// The closed batch right after `gen`, if there is one.
    pub fn next_sealed_after(&self, gen: Gen) -> Option<Gen> {
        self.batches
            .iter()
            .find(|b| b.gen > gen && b.phase == Phase::Outputs)
            .map(|b| b.gen)
    }

    /// A record of `gen` the producer refused to queue: it will never be delivered.
    pub fn refused(&mut self, gen: Gen) {
        if self.batches.iter().any(|b| b.gen == gen) {
            self.failed = true;
        }
    }

    /// The producer's report on one record whose opaque carried `tag`. Reports on records of
    /// dropped batches are ignored.
    pub fn delivered(&mut self, tag_of_record: u64, ok: bool) {
        let Some(b) = self
            .batches
            .iter_mut()
            .find(|b| tag(b.gen) == tag_of_record)
        else {
            return;
        };
        if ok {
            b.acked += 1;
        } else {
            self.failed = true;
        }
    }

    /// Closes the open batch (its generation is returned) and opens the next.
    pub fn close(&mut self) -> Gen {
        let b = self.open_batch();
        b.phase = Phase::Outputs;
        let gen = b.gen;
        self.batches.push_back(Batch::new(self.next));
        self.next += 1;
        gen
    }

    /// Closed batches not yet written.
    pub fn sealed(&self) -> usize {
        self.batches.len() - 1
    }

    /// Whether as many batches as allowed wait: read no more input until one is written.
    pub fn is_full(&self) -> bool {
        self.sealed() >= self.max_sealed
    }

    /// Whether the open batch has records in flight not yet acknowledged.
    pub fn open_unacked(&self) -> u64 {
        let b = self.batches.back().expect("always one");
        b.sent - b.acked.min(b.sent)
    }

    /// Drops every batch not yet written and opens a fresh one.
    pub fn reset(&mut self) {
        self.batches.clear();
        self.batches.push_back(Batch::new(self.next));
        self.next += 1;
        self.failed = false;
    }

    /// The next thing to do, if any. [`Action::Retry`] has already reset the pipeline.
    pub fn next_action(&mut self) -> Option<Action> {
        if self.failed {
            self.reset();
            return Some(Action::Retry);
        }
        let front = self.batches.front().expect("always one");
        if front.phase == Phase::Markers && front.all_acked() {
            let gen = front.gen;
            self.batches.pop_front();
            return Some(Action::Write(gen));
        }
        // Markers go out in generation order: the first batch still waiting for its outputs.
        let b = self
            .batches
            .iter_mut()
            .find(|b| b.phase != Phase::Markers)
            .expect("the open batch is never in the markers phase");
        if b.phase == Phase::Outputs && b.all_acked() {
            b.phase = Phase::Markers;
            return Some(Action::SendMarkers(b.gen));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn drain(p: &mut Pipeline) -> Vec<Action> {
        std::iter::from_fn(|| p.next_action()).collect()
    }

    #[test]
    fn a_batch_is_written_only_after_its_outputs_then_its_markers_are_acknowledged() {
        let mut p = Pipeline::new(2);
        assert_eq!(p.open(), 1);
        p.sent(1, 3);
        p.delivered(tag(1), true);
        assert_eq!(p.close(), 1);
        assert_eq!(p.open(), 2);
        assert_eq!(p.next_action(), None, "two outputs still unacknowledged");
        p.delivered(tag(1), true);
        p.delivered(tag(1), true);
        assert_eq!(p.next_action(), Some(Action::SendMarkers(1)));
        p.sent(1, 2); // one change, one marker
        p.delivered(tag(1), true);
        assert_eq!(drain(&mut p), vec![]);
        p.delivered(tag(1), true);
        assert_eq!(drain(&mut p), vec![Action::Write(1)]);
        assert_eq!(p.sealed(), 0);
    }

    #[test]
    fn the_next_batch_is_processed_while_the_last_one_waits_and_markers_keep_their_order() {
        let mut p = Pipeline::new(2);
        p.sent(1, 1);
        p.close();
        p.sent(2, 1);
        p.close();
        assert!(p.is_full());
        // Batch 2's output is acknowledged first: its markers still wait for batch 1's.
        p.delivered(tag(2), true);
        assert_eq!(drain(&mut p), vec![]);
        p.delivered(tag(1), true);
        assert_eq!(
            p.next_action(),
            Some(Action::SendMarkers(1)),
            "batch 2 waits until batch 1's markers are sent"
        );
        // (no changelog: nothing sent with the markers, so batch 1 is written at once)
        assert_eq!(
            drain(&mut p),
            vec![Action::Write(1), Action::SendMarkers(2), Action::Write(2)]
        );
        assert!(!p.is_full());
    }

    #[test]
    fn a_failed_delivery_drops_every_batch_not_yet_written() {
        let mut p = Pipeline::new(3);
        p.sent(1, 1);
        p.close();
        p.sent(2, 1);
        p.close();
        p.delivered(tag(1), true);
        assert_eq!(p.next_action(), Some(Action::SendMarkers(1)));
        p.sent(1, 1);
        p.delivered(tag(2), false);
        assert_eq!(drain(&mut p), vec![Action::Retry]);
        assert_eq!(p.sealed(), 0);
        let open = p.open();
        assert!(open > 3, "a fresh generation after the dropped ones");
        // Late reports on dropped batches change nothing.
        p.delivered(tag(1), true);
        p.delivered(tag(2), false);
        assert_eq!(drain(&mut p), vec![]);
        p.refused(1);
        assert_eq!(drain(&mut p), vec![]);
        p.refused(open);
        assert_eq!(drain(&mut p), vec![Action::Retry]);
    }

    #[test]
    fn a_batch_s_changes_wait_for_the_older_batch_s_markers() {
        let mut p = Pipeline::new(3);
        p.sent(1, 1);
        p.close();
        assert!(p.markers_sent_before(1), "nothing older: at once");
        p.close();
        assert!(!p.markers_sent_before(2), "batch 1's markers are not out");
        assert_eq!(p.next_sealed_after(1), Some(2));
        p.delivered(tag(1), true);
        assert_eq!(p.next_action(), Some(Action::SendMarkers(1)));
        assert!(p.markers_sent_before(2));
        assert_eq!(p.next_sealed_after(2), None, "the open batch is not closed");
    }

    #[test]
    fn reading_stops_at_max_batches_waiting_until_the_oldest_is_written() {
        let mut p = Pipeline::new(2);
        p.sent(1, 1);
        p.close();
        assert!(!p.is_full());
        p.sent(2, 1);
        p.close();
        assert!(p.is_full());
        p.delivered(tag(1), true);
        assert_eq!(p.next_action(), Some(Action::SendMarkers(1)));
        assert!(p.is_full(), "markers sent is not written");
        assert_eq!(p.next_action(), Some(Action::Write(1)));
        assert!(!p.is_full());
        assert_eq!(p.open_unacked(), 0);
    }

    #[test]
    fn an_empty_batch_passes_straight_through() {
        let mut p = Pipeline::new(1);
        p.close();
        assert_eq!(
            drain(&mut p),
            vec![Action::SendMarkers(1), Action::Write(1)]
        );
    }

    /// One step of a random schedule.
    #[derive(Debug, Clone)]
    enum Op {
        Send(u8),
        Close,
        /// Deliver the i-th record still in flight (modulo their count); false: it failed.
        Deliver(usize, bool),
        Step,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..4).prop_map(Op::Send),
            Just(Op::Close),
            (any::<usize>(), prop::bool::weighted(0.97)).prop_map(|(i, ok)| Op::Deliver(i, ok)),
            Just(Op::Step),
            Just(Op::Step),
        ]
    }

    proptest! {
        /// Over any order of acknowledgements and failures: a batch's markers go out only after
        /// every one of its outputs is acknowledged, and after the markers of every older batch
        /// still in flight; a batch is written only after every record it sent (outputs, changes,
        /// markers) is acknowledged, in generation order, and never after it was dropped.
        #[test]
        fn state_and_markers_never_run_ahead_of_acknowledgements(
            ops in prop::collection::vec(op(), 1..300),
            max in 1usize..4,
        ) {
            let mut p = Pipeline::new(max);
            // Records in flight: (gen, sent with the markers).
            let mut in_flight: Vec<(Gen, bool)> = Vec::new();
            // Every record ever sent, by gen: (sent, acknowledged).
            let mut ledger: std::collections::HashMap<Gen, (u64, u64)> = Default::default();
            let mut marked: Vec<Gen> = Vec::new();
            let mut written: Vec<Gen> = Vec::new();
            let mut dropped_below: Gen = 0; // gens below this (and not written) were dropped
            let mut closed: Vec<Gen> = Vec::new();
            for op in ops {
                match op {
                    Op::Send(n) => {
                        if p.is_full() { continue; }
                        let g = p.open();
                        p.sent(g, n as u64);
                        ledger.entry(g).or_default().0 += n as u64;
                        in_flight.extend(std::iter::repeat_n((g, false), n as usize));
                    }
                    Op::Close => {
                        if p.is_full() { continue; }
                        closed.push(p.close());
                    }
                    Op::Deliver(i, ok) => {
                        if in_flight.is_empty() { continue; }
                        let (g, _) = in_flight.remove(i % in_flight.len());
                        if ok { ledger.entry(g).or_default().1 += 1; }
                        p.delivered(tag(g), ok);
                    }
                    Op::Step => {
                        while let Some(a) = p.next_action() {
                            match a {
                                Action::SendMarkers(g) => {
                                    let (s, k) = ledger.get(&g).copied().unwrap_or_default();
                                    prop_assert_eq!(s, k, "markers of {} before its outputs were acknowledged", g);
                                    prop_assert!(g >= dropped_below);
                                    for older in closed.iter().filter(|&&c| c < g && c >= dropped_below) {
                                        prop_assert!(marked.contains(older), "markers of {} before those of {}", g, older);
                                    }
                                    marked.push(g);
                                    // One change and one marker.
                                    p.sent(g, 2);
                                    ledger.entry(g).or_default().0 += 2;
                                    in_flight.push((g, true));
                                    in_flight.push((g, true));
                                }
                                Action::Write(g) => {
                                    let (s, k) = ledger.get(&g).copied().unwrap_or_default();
                                    prop_assert_eq!(s, k, "batch {} written before all its records were acknowledged", g);
                                    prop_assert!(marked.contains(&g));
                                    prop_assert!(g >= dropped_below, "batch {} written after it was dropped", g);
                                    prop_assert!(written.last().is_none_or(|&w| w < g));
                                    for older in closed.iter().filter(|&&c| c < g && c >= dropped_below) {
                                        prop_assert!(written.contains(older), "batch {} written before {}", g, older);
                                    }
                                    written.push(g);
                                }
                                Action::Retry => {
                                    dropped_below = p.open();
                                    prop_assert_eq!(p.sealed(), 0);
                                }
                            }
                        }
                    }
                }
                prop_assert!(p.sealed() <= max);
            }
        }
    }
}
