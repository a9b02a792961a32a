//! The `waymark` command: parses arguments and dispatches to a subcommand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

mod backtest_cmd;
use backtest_cmd::{backtest_command, BacktestSource};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use waymark::journey::load_dir;
use waymark::replay::{replay, ReplayOptions};
use waymark::time::parse_rfc3339;

#[derive(Parser)]
#[command(
    name = "waymark",
    version,
    about = "A Kafka-native customer-journey engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How the engine runs over past events: what `replay` and `backtest` share.
#[derive(clap::Args)]
struct EngineRun {
    /// The journeys directory.
    #[arg(long, default_value = "config/journeys")]
    journeys: PathBuf,
    /// After the last event, fire timers due at or before this instant (RFC 3339).
    #[arg(long, value_parser = parse_until)]
    until: Option<i64>,
    /// Keep state in this directory (RocksDB) across runs; default: a temporary one (replay) or
    /// memory (backtest).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Skip (and report) events further ahead than this (e.g. 1d) of the latest event time
    /// read so far, as `processing.max_future_ms` does in `waymark run`.
    #[arg(long)]
    max_future: Option<humantime::Duration>,
    /// Events longer than this many bytes are reported and skipped.
    #[arg(long, default_value_t = waymark::replay::DEFAULT_MAX_EVENT_BYTES)]
    max_event_bytes: usize,
    /// Bound the cache of decoded users' state to about this many bytes (as
    /// `state.cache_max_bytes` bounds each partition's in `waymark run`); a full cache is
    /// emptied and refilled.
    #[arg(long, default_value_t = waymark::store::cache::DEFAULT_MAX_BYTES)]
    cache_bytes: usize,
}

/// The engine over a file of events.
#[derive(clap::Args)]
struct FileRun {
    #[command(flatten)]
    engine: EngineRun,
    /// The events file (JSON lines).
    #[arg(long)]
    events: PathBuf,
}

impl EngineRun {
    /// The journeys directory and the run's options.
    fn split(self, events: PathBuf) -> (PathBuf, ReplayOptions) {
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
    fn split(self) -> (PathBuf, ReplayOptions) {
        self.engine.split(self.events)
    }
}

#[derive(Subcommand)]
enum Command {
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

fn parse_until(s: &str) -> Result<i64, String> {
    parse_rfc3339(s)
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 time such as 2026-12-01T00:00:00Z"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            brokers,
            group_id,
            input_topics,
            state_dir,
            journeys_dir,
            metrics_addr,
            log_format,
        } => {
            use toml::Value;
            let mut overrides: Vec<(&str, Value)> = Vec::new();
            if let Some(b) = brokers {
                overrides.push(("kafka.brokers", Value::String(b)));
            }
            if let Some(g) = group_id {
                overrides.push(("kafka.group_id", Value::String(g)));
            }
            if let Some(t) = input_topics {
                let list = t
                    .split(',')
                    .map(|s| Value::String(s.trim().to_string()))
                    .collect();
                overrides.push(("kafka.input_topics", Value::Array(list)));
            }
            if let Some(d) = state_dir {
                overrides.push(("state.dir", Value::String(d.display().to_string())));
            }
            if let Some(d) = journeys_dir {
                overrides.push(("journeys.dir", Value::String(d.display().to_string())));
            }
            if let Some(a) = metrics_addr {
                overrides.push(("metrics.addr", Value::String(a)));
            }
            let config = config.or_else(|| {
                let default = PathBuf::from("config/waymark.toml");
                default.exists().then_some(default)
            });
            waymark::logging::init(&log_format);
            match waymark::service::run(config.as_deref(), &overrides) {
                Ok(()) => ExitCode::SUCCESS,
                Err(code) => ExitCode::from(code),
            }
        }
        Command::Produce {
            brokers,
            topic,
            rate,
            limit,
            retime,
            file,
        } => match waymark::kafka::tools::produce(&brokers, &topic, &file, rate, limit, retime) {
            Ok(n) => {
                eprintln!("produced {n} record(s) to {topic}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("waymark produce: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Tail {
            brokers,
            count,
            idle,
            format,
            topics,
        } => {
            use waymark::kafka::tools::{tail, TailFormat};
            let format = match format.as_str() {
                "raw" => TailFormat::Raw,
                "verbose" => TailFormat::Verbose,
                "pretty" => TailFormat::Pretty,
                other => {
                    eprintln!("waymark tail: unknown format {other:?}; use raw, verbose or pretty");
                    return ExitCode::from(2);
                }
            };
            let mut out = std::io::stdout().lock();
            match tail(&brokers, &topics, count, idle.into(), format, &mut out) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("waymark tail: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Loadgen {
            journeys,
            events,
            count,
            users,
            seed,
            controls,
            profiles,
            profile_users,
        } => {
            let result = (|| -> std::io::Result<()> {
                if controls {
                    waymark::loadgen::write_control_journeys(&journeys)?;
                } else {
                    waymark::loadgen::write_journeys_reading(&journeys, profiles.is_some())?;
                }
                if let Some(path) = &profiles {
                    let mut out =
                        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
                    // A day before the first event.
                    let at = 1_795_860_000_000 - 86_400_000;
                    waymark::loadgen::write_profiles(&mut out, profile_users, seed, at)?;
                    std::io::Write::flush(&mut out)?;
                }
                let mut out: Box<dyn std::io::Write> = if events.as_os_str() == "-" {
                    Box::new(std::io::stdout().lock())
                } else {
                    Box::new(std::fs::File::create(&events)?)
                };
                let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut out);
                waymark::loadgen::write_events(
                    &mut out,
                    count,
                    users,
                    seed,
                    1_795_860_000_000,
                    50,
                )?;
                std::io::Write::flush(&mut out)
            })();
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("waymark loadgen: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Inspect {
            state,
            user,
            application,
        } => match waymark::inspect::user_sessions(&state, &user, application.as_deref()) {
            Ok(v) => {
                println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("waymark inspect: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Journeys { dir } => match load_dir(&dir) {
            Ok(set) => {
                let v = waymark::inspect::list_journeys(&set);
                println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Validate { dir } => match load_dir(&dir) {
            Ok(set) => {
                match set.policies().len() {
                    0 => println!("ok: {} journey(s) in {}", set.len(), dir.display()),
                    n => println!(
                        "ok: {} journey(s) and {n} application policy(ies) in {}",
                        set.len(),
                        dir.display()
                    ),
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Backtest {
            engine,
            source,
            compare,
            json,
            html,
            stats,
        } => backtest_command(engine, source, compare, json, html, stats),
        Command::Replay {
            file,
            stats,
            pretty,
        } => {
            let (journeys, opts) = file.split();
            let set = match load_dir(&journeys) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(1);
                }
            };
            let stdout = std::io::stdout();
            let buffered = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
            let mut out: Box<dyn std::io::Write> = if pretty {
                Box::new(PrettyLines {
                    inner: buffered,
                    line: Vec::new(),
                })
            } else {
                Box::new(buffered)
            };
            let mut err = std::io::stderr();
            match replay(set, &opts, &mut out, &mut err) {
                Ok(s) => {
                    if stats {
                        eprintln!(
                            "replay: {} lines ({} malformed), {} records in {:.3} s: {:.0} events/s",
                            s.lines,
                            s.malformed,
                            s.records,
                            s.seconds,
                            s.lines as f64 / s.seconds.max(1e-9)
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("waymark replay: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// `waymark backtest`: exit 0 with the report, 1 for invalid journeys, 2 when the run fails.
/// Writes each line of JSON it is given as [`waymark::kafka::tools::pretty`] prints it.
struct PrettyLines<W: std::io::Write> {
    inner: W,
    line: Vec<u8>,
}

impl<W: std::io::Write> std::io::Write for PrettyLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&self.line).into_owned();
                writeln!(self.inner, "{}", waymark::kafka::tools::pretty(&text))?;
                self.line.clear();
            } else {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
