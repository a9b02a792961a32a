//! Moving a session: leaving a step, arriving at the next, and ending. Instant steps (action,
//! split, experiment) move on at once; an action step may hold the session for quiet hours and
//! may suppress its action (holdout, frequency cap).

use serde_json::Value;

use super::controls;
use super::{Cause, Effects, Engine, UserSessions};
use crate::journey::{Journey, StepIx, StepKind};
use crate::record::{MoveRecord, Record};
use crate::time::format_millis;

/// What a move out of a step carries besides its reason.
#[derive(Clone, Copy, Default)]
pub(super) struct Leave<'a> {
    /// The delivered action and its params (an action step's move out).
    pub action: Option<(&'a str, &'a Value)>,
    pub branch: Option<&'a str>,
    pub variant: Option<&'a str>,
    /// Why the action step's action was not delivered.
    pub suppressed: Option<&'static str>,
}

impl Engine {
    /// Moves session `ix` from `from` to `to` (or ends it when `to` is `None`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn go(
        &self,
        journey: &Journey,
        us: &mut UserSessions,
        ix: usize,
        from: StepIx,
        to: Option<StepIx>,
        reason: &str,
        cause: Cause,
        leave: Leave,
        fx: &mut Effects,
    ) {
        let from_id = &journey.steps[from].id;
        us.session_mut(ix).progress = 0;
        let Some(to) = to else {
            if reason == "action" {
                // The move out of the action step carries the action; the exit follows it.
                let record = self.move_record(journey, us, ix, from_id, None, reason, cause, leave);
                fx.records.push(Record::StepAdvance(record));
            }
            // Any other step without a successor just ends the session: its exit record is like
            // every other (a branch or variant without `next` adds no field to it).
            let done = Leave::default();
            self.end(journey, us, ix, from_id, "completed", cause, done, fx);
            return;
        };
        let to_id = &journey.steps[to].id;
        let record = self.move_record(journey, us, ix, from_id, Some(to_id), reason, cause, leave);
        fx.records.push(Record::StepAdvance(record));
        us.session_mut(ix).step = to_id.clone();
        self.arrive(journey, us, ix, to, cause, fx);
    }

    #[allow(clippy::too_many_arguments)]
    fn move_record(
        &self,
        journey: &Journey,
        us: &UserSessions,
        ix: usize,
        from: &str,
        to: Option<&str>,
        reason: &str,
        cause: Cause,
        leave: Leave,
    ) -> MoveRecord {
        let s = us.session(ix);
        MoveRecord {
            journey_id: journey.id.clone(),
            application: journey.application.clone(),
            user_id: s.user_id.clone(),
            session_id: s.session_id.clone(),
            session_key: s.key.clone(),
            from: from.to_string(),
            to: to.map(str::to_string),
            step: None,
            reason: reason.to_string(),
            event: cause.event.map(|e| e.0.to_string()),
            event_id: cause.event.map(|e| e.1.to_string()),
            action: leave.action.map(|a| a.0.to_string()),
            params: leave.action.map(|a| a.1.clone()),
            at: format_millis(cause.at),
            branch: leave.branch.map(str::to_string),
            variant: leave.variant.map(str::to_string),
            suppressed: leave.suppressed.map(str::to_string),
            holdout: s.holdout.then_some(true),
        }
    }

    /// What happens on arriving at a step: waits arm their timer, instant steps move on.
    pub(super) fn arrive(
        &self,
        journey: &Journey,
        us: &mut UserSessions,
        ix: usize,
        step: StepIx,
        cause: Cause,
        fx: &mut Effects,
    ) {
        match &journey.steps[step].kind {
            StepKind::WaitForTrigger { timeout, .. } => {
                us.session_mut(ix).timer = timeout.map(|t| cause.at.saturating_add(t));
            }
            StepKind::Delay { duration, .. } => {
                us.session_mut(ix).timer = Some(cause.at.saturating_add(*duration));
            }
            StepKind::Action {
                ignore_quiet_hours, ..
            } => {
                if !ignore_quiet_hours {
                    let policy = self.journeys.policy(&journey.application).map(|p| &**p);
                    if let Some(q) = controls::quiet_hours(journey, policy) {
                        let tz =
                            controls::zone(journey, policy, &us.session(ix).context, us.profile());
                        if let Some(release) = q.hold_until(cause.at, tz) {
                            us.session_mut(ix).timer = Some(release);
                            fx.held.push(journey.id.clone());
                            return;
                        }
                    }
                }
                self.leave_action(journey, us, ix, step, cause, fx)
            }
            StepKind::Split { branches, default } => {
                let ctx = &us.session(ix).context;
                let to = branches
                    .iter()
                    .find(|(c, _)| c.eval_in(ctx, us.profile()))
                    .map(|b| b.1)
                    .or(*default);
                self.go(
                    journey,
                    us,
                    ix,
                    step,
                    to,
                    "split",
                    cause,
                    Leave::default(),
                    fx,
                )
            }
            StepKind::Experiment { variants, total } => {
                let s = us.session(ix);
                let Some(v) = controls::pick_variant(
                    &journey.id,
                    &journey.steps[step].id,
                    &s.user_id,
                    variants,
                    *total,
                ) else {
                    return;
                };
                let leave = Leave {
                    variant: Some(&v.id),
                    ..Leave::default()
                };
                self.go(
                    journey,
                    us,
                    ix,
                    step,
                    v.next,
                    "experiment",
                    cause,
                    leave,
                    fx,
                )
            }
            StepKind::Exit => {
                let from = &journey.steps[step].id;
                self.end(
                    journey,
                    us,
                    ix,
                    from,
                    "completed",
                    cause,
                    Leave::default(),
                    fx,
                )
            }
        }
    }

    /// The move out of an action step: the action is delivered, or suppressed for a held-out
    /// user or a reached frequency cap (judged now, after any quiet-hours hold).
    pub(super) fn leave_action(
        &self,
        journey: &Journey,
        us: &mut UserSessions,
        ix: usize,
        step: StepIx,
        cause: Cause,
        fx: &mut Effects,
    ) {
        let StepKind::Action {
            action,
            params,
            next,
            ignore_caps,
            ..
        } = &journey.steps[step].kind
        else {
            return;
        };
        let mut suppressed = None;
        if us.session(ix).holdout {
            suppressed = Some("holdout");
        } else if !ignore_caps {
            let policy = self.journeys.policy(&journey.application);
            if let Some(policy) = policy.filter(|p| p.caps_action(action)) {
                let tz =
                    controls::zone(journey, Some(policy), &us.session(ix).context, us.profile());
                if controls::cap_reached(us.history(), &policy.caps, action, cause.at, tz) {
                    suppressed = Some("frequency_cap");
                } else {
                    controls::record_delivery(us.history_mut(), policy, action, cause.at);
                }
            }
        }
        let leave = Leave {
            action: suppressed.is_none().then_some((action.as_str(), params)),
            suppressed,
            ..Leave::default()
        };
        self.go(journey, us, ix, step, *next, "action", cause, leave, fx)
    }

    /// Ends session `ix` at step `at_step` with `reason`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn end(
        &self,
        journey: &Journey,
        us: &mut UserSessions,
        ix: usize,
        at_step: &str,
        reason: &str,
        cause: Cause,
        leave: Leave,
        fx: &mut Effects,
    ) {
        let mut record = self.move_record(journey, us, ix, at_step, None, reason, cause, leave);
        record.step = Some(at_step.to_string());
        fx.records.push(Record::JourneyExit(record));
        us.remove(ix);
    }
}
