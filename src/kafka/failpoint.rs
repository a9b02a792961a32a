//! Test failpoints, read from `WAYMARK_FAILPOINT` when the runtime starts.

/// Test failpoints, from `WAYMARK_FAILPOINT`: the process aborts at the N-th batch commit. Only
/// in builds with the `failpoints` feature, which `make` enables for the test suites; the release
/// image (`deploy/Dockerfile`: `cargo build --release`) has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub enum Failpoint {
    /// `crash_after_acks:N`: after outputs and changelog records are acknowledged (and the group
    /// commit), before the local state write.
    CrashAfterAcks(u64),
    /// `crash_before_changelog:N`: after the outputs are acknowledged, before any of the batch's
    /// changelog records is sent.
    CrashBeforeChangelog(u64),
    /// `fail_outputs:N`: the N-th commit's outputs, once acknowledged, are treated as not
    /// delivered (at_least_once): the batch is dropped, rewound and redone in-process, once.
    FailOutputs(u64),
    /// `restore_delay:MS`: each partition's restore waits MS milliseconds after reading the
    /// changelog's end (so a test can look at the instance while it restores).
    RestoreDelay(u64),
    /// `drain_delay:MS`: on shutdown, waits MS milliseconds before draining (so a test can send
    /// a second signal while the drain is under way).
    DrainDelay(u64),
}

/// Without the `failpoints` feature (the release binary) there are none: the crash hooks cannot be
/// reached from the environment.
#[cfg(not(feature = "failpoints"))]
pub fn failpoint() -> anyhow::Result<Option<Failpoint>> {
    Ok(None)
}

#[cfg(feature = "failpoints")]
pub fn failpoint() -> anyhow::Result<Option<Failpoint>> {
    let Ok(v) = std::env::var("WAYMARK_FAILPOINT") else {
        return Ok(None);
    };
    let parse = |prefix: &str| v.strip_prefix(prefix).and_then(|n| n.parse::<u64>().ok());
    if let Some(n) = parse("crash_after_acks:") {
        return Ok(Some(Failpoint::CrashAfterAcks(n)));
    }
    if let Some(n) = parse("crash_before_changelog:") {
        return Ok(Some(Failpoint::CrashBeforeChangelog(n)));
    }
    if let Some(n) = parse("fail_outputs:") {
        return Ok(Some(Failpoint::FailOutputs(n)));
    }
    if let Some(ms) = parse("restore_delay:") {
        return Ok(Some(Failpoint::RestoreDelay(ms)));
    }
    if let Some(ms) = parse("drain_delay:") {
        return Ok(Some(Failpoint::DrainDelay(ms)));
    }
    anyhow::bail!("WAYMARK_FAILPOINT={v:?}: failpoints are crash_after_acks:N, crash_before_changelog:N, fail_outputs:N, restore_delay:MS and drain_delay:MS")
}
