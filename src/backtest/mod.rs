//! `waymark backtest`: what journeys would have done on past events, as a funnel per journey.
//!
//! The engine is the one `replay` and `run` use (a deterministic function of the event log with
//! event-time timers), so the records counted here are the ones production would have emitted on
//! the same events. [`funnel`] counts; [`render`] prints; [`compare`] sets two journey sets side
//! by side. The JSON report's schema is in `docs/backtest.md`.

pub mod compare;
pub mod funnel;
pub mod render;

use std::sync::Arc;

use serde::Serialize;

use crate::journey::JourneySet;
use crate::replay::{ReplayOptions, ReplayStats};

/// A backtest's result: what was read, and each journey's funnel.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Non-blank lines read, those skipped as malformed, and the records the engine emitted.
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
