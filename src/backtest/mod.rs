//! `waymark backtest`: what journeys would have done on past events, as a funnel per journey.
//!
//! The engine is the one `replay` and `run` use (a deterministic function of the event log with
//! event-time timers), so the records counted here are the ones production would have emitted on
//! the same events. [`funnel`] counts; [`render`] prints; [`compare`] sets two journey sets side
//! by side. The JSON report's schema is in `docs/backtest.md`.

pub mod compare;
pub mod funnel;
pub mod html;
pub mod kafka;
pub mod render;

use std::sync::Arc;

use serde::Serialize;

use crate::journey::JourneySet;
use crate::processor::Output;
use crate::replay::{Feed, Origin, ReplayOptions, ReplayStats};

/// A backtest's result: what was read, and each journey's funnel.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Inputs read (non-blank lines of a file, or Kafka records), those skipped as malformed,
    /// and the records the engine emitted.
    pub lines: u64,
    pub malformed: u64,
    pub records: u64,
    pub journeys: Vec<funnel::JourneyFunnel>,
}

/// Runs `journeys` over the events of `opts` and counts their funnels. Problems with single lines
/// go to `err`, as in `replay`.
pub fn run_file(
    journeys: Arc<JourneySet>,
    opts: &ReplayOptions,
    err: &mut dyn std::io::Write,
) -> anyhow::Result<(Report, ReplayStats)> {
    let mut f = funnel::Funnel::new(&journeys);
    let stats = crate::replay::run(
        journeys,
        opts,
        &mut |o| {
            f.observe(o);
            Ok(())
        },
        err,
    )?;
    let report = Report {
        lines: stats.lines,
        malformed: stats.malformed,
        records: stats.records,
        journeys: f.report(),
    };
    Ok((report, stats))
}

/// Runs each journey set (with its options: its own state) over the records of `range`, read
/// from Kafka once, and counts their funnels. Timers due by `until` (default: `range.to`) fire at
/// the end. Problems with single records go to `err`, named by topic, partition and offset.
pub fn run_kafka(
    sides: Vec<(Arc<JourneySet>, ReplayOptions)>,
    range: &kafka::Range,
    until: Option<crate::time::Millis>,
    err: &mut dyn std::io::Write,
) -> anyhow::Result<(Vec<Report>, kafka::ReadStats)> {
    let mut feeds = Vec::new();
    let mut funnels = Vec::new();
    for (set, opts) in &sides {
        feeds.push(Feed::open(set.clone(), opts)?);
        funnels.push(funnel::Funnel::new(set));
    }
    let read = kafka::read(range, &mut |r| {
        let origin = Origin::Record {
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            time: r.time,
        };
        for (feed, f) in feeds.iter_mut().zip(funnels.iter_mut()) {
            feed.input(origin, r.value, &mut observe(f), err)?;
        }
        Ok(())
    })?;
    let mut reports = Vec::new();
    for (feed, mut f) in feeds.into_iter().zip(funnels) {
        let stats = feed.finish(until.or(Some(range.to)), &mut observe(&mut f))?;
        reports.push(Report {
            lines: stats.lines,
            malformed: stats.malformed,
            records: stats.records,
            journeys: f.report(),
        });
    }
    Ok((reports, read))
}

fn observe(f: &mut funnel::Funnel) -> impl FnMut(&Output) -> anyhow::Result<()> + '_ {
    move |o| {
        f.observe(o);
        Ok(())
    }
}
