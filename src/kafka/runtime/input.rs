//! One input record: already applied, a dead letter, forwarded to its owner, or processed;
//! what it caused is published and counted.

use super::*;

impl Core {
    pub(super) fn offsets(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, part) in &self.parts {
            for (topic, next) in part.life.offsets() {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(next));
            }
        }
        tpl
    }

    /// Sends an output, routed record or dead letter of the open batch.
    pub(super) fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        value: &[u8],
        headers: Option<OwnedHeaders>,
        record_time: Option<Millis>,
    ) {
        let gen = self.pipeline.borrow().open();
        self.send_raw(
            Out {
                topic,
                partition,
                key: key.as_bytes(),
                value: Some(value),
                headers,
                opaque: Opaque::record(gen, record_time),
            },
            gen,
        );
    }

    /// Sends one record of batch `gen`, waiting while the producer's queue is full, and counts
    /// it in the pipeline. A record the producer refuses fails its batch.
    pub(super) fn send_raw(&self, out: Out<'_>, gen: Gen) {
        if crate::kafka::producer::send(&self.producer, out) {
            self.pipeline.borrow_mut().sent(gen, 1);
        } else {
            self.pipeline.borrow_mut().refused(gen);
        }
    }

    /// The decoded record, or `None` once a record that does not decode went to the dead-letter
    /// topic with its reason.
    pub(super) fn or_dead_letter<T>(
        &self,
        m: &BorrowedMessage<'_>,
        decoded: Result<T, EventError>,
    ) -> Option<T> {
        decoded.map_err(|e| self.dead_letter(m, &e)).ok()
    }

    pub(super) fn dead_letter(&self, m: &BorrowedMessage<'_>, err: &EventError) {
        let reason = err.reason();
        self.metrics.dead_letters.with_label_values(&[reason]).inc();
        // A forwarded input names where it was first read.
        let own = router::Source::new(m.topic(), m.partition(), m.offset());
        let source = router::source(m.headers(), own);
        let headers = router::dead_letter_headers(&format!("{reason}: {err}"), &source);
        let key = m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let payload = m.payload().unwrap_or(&[]);
        self.send(
            &self.cfg.topics.dlq,
            None,
            &key,
            payload,
            Some(headers),
            None,
        );
    }

    pub(super) fn handle(&mut self, m: &BorrowedMessage<'_>) {
        let (topic, p, offset) = (m.topic(), m.partition(), m.offset());
        let Some(part) = self.parts.get(&p) else {
            warn!(
                topic,
                partition = p,
                "record from a partition this instance does not own"
            );
            return;
        };
        if part.life.is_applied(topic, offset) {
            return; // already applied
        }
        match self
            .parts
            .get_mut(&p)
            .expect("checked above")
            .consumed
            .get(topic)
        {
            Some(c) => c.inc(),
            None => {
                let c = self
                    .metrics
                    .events_consumed
                    .with_label_values(&[topic, &p.to_string()]);
                c.inc();
                let part = self.parts.get_mut(&p).expect("checked above");
                part.consumed.insert(topic.to_string(), c);
            }
        }
        let record_time = m.timestamp().to_millis();
        // (Looked up only when something is poisoned: the key costs an allocation and a hash.)
        let poisoned = if self.poisoned.is_empty() {
            None
        } else {
            self.poisoned.remove(&(topic.to_string(), p, offset))
        };
        if let Some(why) = poisoned {
            // Its outputs cannot be published: it goes to the dead-letter topic unprocessed.
            self.dead_letter(m, &EventError::OutputTooLarge(why));
        } else {
            // Sizes are judged per input.
            if let Some(part) = self.parts.get_mut(&p) {
                part.proc.state_mut().take_largest_write();
            }
            let result = if topic == self.cfg.topics.route {
                self.handle_route(m, p, record_time)
            } else if self.cfg.kafka.profile_topics.iter().any(|t| t == topic) {
                self.handle_profile(m, p, record_time)
            } else {
                self.handle_input(m, p, record_time)
            };
            if let Err(e) = result {
                self.fatal = Some(e);
                return;
            }
            if self.rewind_requested {
                return; // the batch is dropped; this input is met again, poisoned
            }
        }
        let part = self.parts.get_mut(&p).expect("checked above");
        part.life.applied(topic, offset);
        self.batch_inputs += 1;
    }

    pub(super) fn handle_input(
        &mut self,
        m: &BorrowedMessage<'_>,
        p: i32,
        record_time: Option<Millis>,
    ) -> anyhow::Result<()> {
        let payload = m.payload().unwrap_or(&[]);
        let decoded = RawEvent::decode(payload, self.cfg.processing.max_event_bytes);
        let Some(raw) = self.or_dead_letter(m, decoded) else {
            return Ok(());
        };
        let owner = owner_of(raw.user_id(), self.partitions);
        if owner != p {
            self.forward(m, p, owner, router::Kind::Event, raw.user_id(), record_time);
            return Ok(());
        }
        let default_id = router::Source::new(m.topic(), p, m.offset()).default_id();
        self.process_raw(m, raw, p, record_time, default_id)
    }

    /// Sends an input read on partition `p` to the route topic's partition `owner`, which owns
    /// its user, with where it was read (for its default event id and dead letters).
    pub(super) fn forward(
        &mut self,
        m: &BorrowedMessage<'_>,
        p: i32,
        owner: i32,
        kind: router::Kind,
        user_id: &str,
        record_time: Option<Millis>,
    ) {
        let payload = m.payload().unwrap_or(&[]);
        let source = router::Source::new(m.topic(), p, m.offset());
        let headers = router::forward_headers(kind, &source, record_time);
        let route = self.cfg.topics.route.clone();
        self.send(&route, Some(owner), user_id, payload, Some(headers), None);
        self.metrics.routed.inc();
    }

    /// A profile topic's record: decoded (a bad one is a dead letter), forwarded to the partition
    /// that owns its user if read elsewhere, else applied.
    pub(super) fn handle_profile(
        &mut self,
        m: &BorrowedMessage<'_>,
        p: i32,
        record_time: Option<Millis>,
    ) -> anyhow::Result<()> {
        let payload = m.payload().unwrap_or(&[]);
        let decoded = crate::profile::decode(payload, self.cfg.processing.max_event_bytes);
        let Some(record) = self.or_dead_letter(m, decoded) else {
            return Ok(());
        };
        let owner = owner_of(record.user_id(), self.partitions);
        if owner != p {
            self.forward(
                m,
                p,
                owner,
                router::Kind::Profile,
                record.user_id(),
                record_time,
            );
            return Ok(());
        }
        self.process_profile(m, &record, p, record_time)
    }

    /// Why an input stamped `time` is refused as too far ahead of the clock, if it is.
    pub(super) fn in_future(&self, time: Millis) -> Option<EventError> {
        let horizon = self
            .clock
            .now_ms()
            .saturating_add(self.cfg.processing.max_future_ms.min(i64::MAX as u64) as i64);
        (time > horizon).then(|| {
            EventError::InFuture(format!(
                "{} is more than processing.max_future_ms ({} ms) ahead of the clock",
                crate::time::format_millis(time),
                self.cfg.processing.max_future_ms
            ))
        })
    }

    /// Applies a profile record on the partition that owns its user: timed like an event (its
    /// `timestamp`, else the record's); a refused update is a dead letter.
    pub(super) fn process_profile(
        &mut self,
        m: &BorrowedMessage<'_>,
        record: &crate::profile::ProfileRecord,
        p: i32,
        record_time: Option<Millis>,
    ) -> anyhow::Result<()> {
        let Some(time) = record.time().or(record_time) else {
            self.dead_letter(m, &EventError::NoTime);
            return Ok(());
        };
        if let Some(e) = self.in_future(time) {
            self.dead_letter(m, &e);
            return Ok(());
        }
        let part = self.parts.get_mut(&p).expect("owned");
        let applied = part.proc.on_profile(record, time, &mut self.out)?;
        if self.poison_if_oversized(m, p) {
            return Ok(());
        }
        match applied {
            Ok(ProfileApplied::Updated) => self.metrics.profile_updates.inc(),
            Ok(ProfileApplied::Erased) => self.metrics.erasures.inc(),
            Err(e) => self.dead_letter(m, &e),
        }
        self.set_profile_gauge();
        self.publish(p, record_time, false);
        Ok(())
    }

    /// `waymark_profiles_stored`: the profiles of the partitions this member holds, added to
    /// the other members'.
    pub(super) fn set_profile_gauge(&mut self) {
        let n: i64 = self.parts.values().map(|p| p.proc.state().profiles()).sum();
        self.metrics
            .profiles_stored
            .add(n - std::mem::replace(&mut self.reported.1, n));
    }

    pub(super) fn process_raw(
        &mut self,
        m: &BorrowedMessage<'_>,
        raw: RawEvent<'_>,
        p: i32,
        record_time: Option<Millis>,
        default_id: String,
    ) -> anyhow::Result<()> {
        let Some(time) = raw.timestamp().or(record_time) else {
            self.dead_letter(m, &EventError::NoTime);
            return Ok(());
        };
        if let Some(e) = self.in_future(time) {
            self.dead_letter(m, &e);
            return Ok(());
        }
        let parts = self.partitions;
        let part = self.parts.get_mut(&p).expect("owned");
        let owns = move |u: &str| owner_of(u, parts) == p;
        match part
            .proc
            .on_input(raw, time, || default_id, &owns, &mut self.out)?
        {
            Err(e) => {
                self.dead_letter(m, &e);
                return Ok(());
            }
            Ok(InputApplied::TimersOnly) => {}
            Ok(InputApplied::Event) => {
                if self.poison_if_oversized(m, p) {
                    return Ok(());
                }
                let bad: Vec<&str> = self
                    .out
                    .refused
                    .iter()
                    .filter(|(_, r)| *r == crate::engine::Refusal::BadTargets)
                    .map(|(j, _)| j.as_str())
                    .collect();
                if !bad.is_empty() {
                    // The event was processed for everything else, so it is no dead letter (a
                    // DLQ replay would apply it twice): counted (refusal bad_targets) and logged.
                    tracing::warn!(
                        journeys = %bad.join(", "),
                        topic = m.topic(),
                        partition = p,
                        offset = m.offset(),
                        "the who attribute holds something other than user ids: nobody entered"
                    );
                }
            }
        }
        self.publish(p, record_time, false);
        Ok(())
    }

    pub(super) fn handle_route(
        &mut self,
        m: &BorrowedMessage<'_>,
        p: i32,
        record_time: Option<Millis>,
    ) -> anyhow::Result<()> {
        let routed = router::read(m.headers());
        let payload = m.payload().unwrap_or(&[]);
        let t = routed.record_time.or(record_time);
        match routed.kind {
            Some(Ok(router::Kind::Event)) => {
                let Some(raw) = self.or_dead_letter(m, RawEvent::decode(payload, 0)) else {
                    return Ok(());
                };
                let default_id = routed
                    .event_id
                    .unwrap_or_else(|| router::Source::new(m.topic(), p, m.offset()).default_id());
                self.process_raw(m, raw, p, t, default_id)
            }
            Some(Ok(router::Kind::Profile)) => {
                let Some(record) = self.or_dead_letter(m, crate::profile::decode(payload, 0))
                else {
                    return Ok(());
                };
                self.process_profile(m, &record, p, t)
            }
            Some(Ok(router::Kind::Entry)) => {
                let intent: EntryIntent = match serde_json::from_slice(payload) {
                    Ok(i) => i,
                    Err(e) => {
                        self.dead_letter(m, &EventError::NotJson(format!("routed entry: {e}")));
                        return Ok(());
                    }
                };
                let part = self.parts.get_mut(&p).expect("owned");
                part.proc.on_intent(&intent, &mut self.out)?;
                if self.poison_if_oversized(m, p) {
                    return Ok(());
                }
                self.publish(p, record_time, false);
                Ok(())
            }
            other => {
                let other = other.and_then(Result::err);
                self.dead_letter(
                    m,
                    &EventError::WrongType(format!("route record of unknown kind {other:?}")),
                );
                Ok(())
            }
        }
    }

    /// When something the input `m` caused is too large to publish (an output or routed record,
    /// or a state change the changelog would carry), marks the input poisoned and asks for a
    /// rewind: the batch is dropped (its state changes with it) and, met again, the input goes to
    /// the dead-letter topic as `output_too_large` while everything else is processed anew.
    pub(super) fn poison_if_oversized(&mut self, m: &BorrowedMessage<'_>, p: i32) -> bool {
        let limit = self.max_record_bytes.saturating_sub(RECORD_HEADROOM);
        let part = self.parts.get_mut(&p).expect("owned");
        let largest = part.proc.state_mut().take_largest_write();
        let payload = m.payload().map_or(0, <[u8]>::len);
        let mut why = None;
        if self.cfg.state.changelog && largest > limit {
            why = Some(format!(
                "a state change of {largest} bytes would not fit a changelog record (at most {limit})"
            ));
        }
        // Records carry ids and attributes that the state change or the input also holds, so
        // they are measured only when either is large.
        if why.is_none() && (largest > limit / 8 || payload > limit / 8) {
            for r in &self.out.records {
                let n = r.to_json().len() + r.user_id().len();
                if n > limit {
                    why = Some(format!(
                        "a {} record of {n} bytes (at most {limit})",
                        r.journey_id()
                    ));
                    break;
                }
            }
            for i in &self.out.routed {
                let n = serde_json::to_vec(i).map_or(0, |v| v.len()) + i.user_id.len();
                if why.is_none() && n > limit {
                    why = Some(format!("a routed entry of {n} bytes (at most {limit})"));
                }
            }
        }
        let Some(why) = why else {
            return false;
        };
        warn!(
            topic = m.topic(),
            partition = p,
            offset = m.offset(),
            reason = %why,
            "an input's outputs are too large to publish: dropping the batch, rewinding; the input goes to the dead-letter topic"
        );
        self.poisoned.insert(
            (m.topic().to_string(), p, m.offset()),
            format!("{why}; its outputs were not published and its state change was not applied"),
        );
        self.out.clear();
        self.rewind_requested = true;
        true
    }

    /// Produces what the last input caused and counts it.
    pub(super) fn publish(&mut self, p: i32, record_time: Option<Millis>, by_wall_clock: bool) {
        let mut out = std::mem::take(&mut self.out);
        let part = self.parts.get_mut(&p).expect("owned");
        self.metrics.count_output(&out, &mut part.active);
        if by_wall_clock && !out.timers_fired.is_empty() {
            self.metrics
                .count_timer_lateness(&out.timers_fired, self.clock.now_ms());
        }
        for r in out.records.drain(..) {
            let topic = match r.stream() {
                Stream::Entries => &self.cfg.topics.entries,
                Stream::Steps => &self.cfg.topics.steps,
                Stream::Conversions => &self.cfg.topics.conversions,
            };
            self.send(
                topic,
                None,
                r.user_id(),
                r.to_json().as_bytes(),
                None,
                record_time,
            );
        }
        for intent in out.routed.drain(..) {
            let owner = owner_of(&intent.user_id, self.partitions);
            let headers = router::entry_headers();
            let value = serde_json::to_vec(&intent).expect("intents serialise");
            self.send(
                &self.cfg.topics.route,
                Some(owner),
                &intent.user_id,
                &value,
                Some(headers),
                None,
            );
            self.metrics.routed.inc();
        }
        for (journey, reason) in &out.refused {
            if matches!(
                reason,
                crate::engine::Refusal::TooManyTargets | crate::engine::Refusal::TooManySessions
            ) {
                tracing::warn!(journey = %journey, reason = reason.as_str(), "entry refused at a limit (processing.max_targets / processing.max_sessions_per_user)");
            }
        }
        out.clear();
        self.out = out;
        if self.batch_inputs % 64 == 0 {
            serve_reports(&self.producer, Duration::ZERO);
        }
    }
}
