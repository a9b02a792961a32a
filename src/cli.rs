//! The command line: every subcommand and flag of `waymark`, as clap parses them. `main.rs`
//! dispatches; this file only describes.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use waymark::replay::ReplayOptions;
use waymark::time::parse_rfc3339;

use crate::backtest_cmd::BacktestSource;

#[derive(Parser)]
#[command(
    name = "waymark",
    version,
    about = "A Kafka-native customer-journey engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How the engine runs over past events: what `replay` and `backtest` share.
#[derive(clap::Args)]
pub struct EngineRun {
    /// The journeys directory.
    #[arg(long, default_value = "config/journeys")]
    pub journeys: PathBuf,
    /// After the last event, fire timers due at or before this instant (RFC 3339).
    #[arg(long, value_parser = parse_until)]
    pub until: Option<i64>,
    /// Keep state in this directory (RocksDB) across runs; default: a temporary one (replay) or
    /// memory (backtest).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Skip (and report) events further ahead than this (e.g. 1d) of the latest event time
    /// read so far, as `processing.max_future_ms` does in `waymark run`.
    #[arg(long)]
    pub max_future: Option<humantime::Duration>,
    /// Events longer than this many bytes are reported and skipped.
    #[arg(long, default_value_t = waymark::replay::DEFAULT_MAX_EVENT_BYTES)]
    pub max_event_bytes: usize,
    /// Bound the cache of decoded users' state to about this many bytes (as
    /// `state.cache_max_bytes` bounds each partition's in `waymark run`); a full cache is
    /// emptied and refilled.
    #[arg(long, default_value_t = waymark::store::cache::DEFAULT_MAX_BYTES)]
    pub cache_bytes: usize,
}

/// The engine over a file of events.
#[derive(clap::Args)]
pub struct FileRun {
    #[command(flatten)]
    pub engine: EngineRun,
    /// The events file (JSON lines).
    #[arg(long)]
    pub events: PathBuf,
}

impl EngineRun {
    /// The journeys directory and the run's options.
    pub fn split(self, events: PathBuf) -> (PathBuf, ReplayOptions) {
        let opts = ReplayOptions {
            events,
            until: self.until,
            state: self.state,
            in_memory: false,
            progress: true,
            max_future: self
                .max_future
                .map(|d| d.as_millis().min(i64::MAX as u128) as i64),
            max_event_bytes: self.max_event_bytes,
            cache_bytes: self.cache_bytes,
        };
        (self.journeys, opts)
    }
}

impl FileRun {
    pub fn split(self) -> (PathBuf, ReplayOptions) {
        self.engine.split(self.events)
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the service: consume events, keep journey state, publish records.
    Run {
        /// The config file (TOML); default: config/waymark.toml if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override kafka.brokers.
        #[arg(long)]
        brokers: Option<String>,
        /// Override kafka.group_id.
        #[arg(long)]
        group_id: Option<String>,
        /// Override kafka.input_topics (comma-separated).
        #[arg(long)]
        input_topics: Option<String>,
        /// Override state.dir.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Override journeys.dir.
        #[arg(long)]
        journeys_dir: Option<PathBuf>,
        /// Override metrics.addr.
        #[arg(long)]
        metrics_addr: Option<String>,
        /// Log format: text or json.
        #[arg(long, default_value = "text")]
        log_format: String,
    },
    /// Produce a file of events (JSON lines, `-` for stdin) to a topic, keyed by userId.
    Produce {
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long, default_value = "events")]
        topic: String,
        /// Send at most this many records per second.
        #[arg(long)]
        rate: Option<u64>,
        /// Stop after this many records.
        #[arg(long)]
        limit: Option<u64>,
        /// Shift every event's timestamp by one amount so the first is now.
        #[arg(long)]
        retime: bool,
        file: PathBuf,
    },
    /// Print the records of topics from the beginning.
    Tail {
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
        /// Stop once no record arrived for this long (e.g. 5s).
        #[arg(long, default_value = "5s")]
        idle: humantime::Duration,
        /// raw (values), verbose (with key, headers, offsets) or pretty (readable summaries).
        #[arg(long, default_value = "raw")]
        format: String,
        #[arg(required = true)]
        topics: Vec<String>,
    },
    /// Check journey definitions; prints every problem with file, JSON path and reason.
    Validate {
        /// The journeys directory.
        #[arg(default_value = "config/journeys")]
        dir: PathBuf,
    },
    /// Run the engine over a file of events (one JSON object a line), printing output records.
    Replay {
        #[command(flatten)]
        file: FileRun,
        /// Print a summary (lines, records, events/s) on stderr at the end.
        #[arg(long)]
        stats: bool,
        /// Print one readable line per record instead of its JSON.
        #[arg(long)]
        pretty: bool,
    },
    /// What journeys would have done on past events: a funnel per journey (entries, refusals,
    /// each step reached and left, exits, conversions with holdout lift, actions per day). With
    /// `--compare`, `--state DIR` holds `base` and `proposed`.
    Backtest {
        #[command(flatten)]
        engine: EngineRun,
        #[command(flatten)]
        source: BacktestSource,
        /// A second journeys directory: both run over the same events, side by side, with the
        /// numbers that differ.
        #[arg(long)]
        compare: Option<PathBuf>,
        /// Print the report as JSON (schema: docs/backtest.md).
        #[arg(long)]
        json: bool,
        /// Also write the report as a self-contained HTML page (SVG funnels) to this file.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Print a summary (inputs, records, events/s) on stderr at the end.
        #[arg(long)]
        stats: bool,
    },
    /// Print a user's sessions (journey, step, identifier, context, timer) as JSON.
    Inspect {
        /// A replay state directory, or the state root of `waymark run` (partition-N inside).
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        user: String,
        /// Only this application's sessions.
        #[arg(long)]
        application: Option<String>,
    },
    /// List the journeys of a directory with their status and version.
    Journeys {
        #[arg(default_value = "config/journeys")]
        dir: PathBuf,
    },
    /// Write synthetic benchmark journeys and events (about 30% of events touch a journey).
    Loadgen {
        /// Where to write the ten benchmark journeys.
        #[arg(long)]
        journeys: PathBuf,
        /// Where to write the events (JSON lines); `-` for stdout.
        #[arg(long)]
        events: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        #[arg(long, default_value_t = 100_000)]
        users: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Write the journeys with every journey control of contract section 5 on, and a policy.
        #[arg(long)]
        controls: bool,
        /// Also write a profile record for each of `--profile-users` users to this file (replay
        /// lines), and journeys whose conditions read the profile.
        #[arg(long)]
        profiles: Option<PathBuf>,
        #[arg(long, default_value_t = 1_000_000)]
        profile_users: u64,
    },
}

pub fn parse_until(s: &str) -> Result<i64, String> {
    parse_rfc3339(s)
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 time such as 2026-12-01T00:00:00Z"))
}
