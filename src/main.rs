//! The `waymark` command: parses arguments and dispatches to a subcommand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Command {
    /// Check journey definitions; prints every problem with file, JSON path and reason.
    Validate {
        /// The journeys directory.
        #[arg(default_value = "config/journeys")]
        dir: PathBuf,
    },
    /// Run the engine over a file of events (one JSON object a line), printing output records.
    Replay {
        /// The journeys directory.
        #[arg(long, default_value = "config/journeys")]
        journeys: PathBuf,
        /// The events file (JSON lines).
        #[arg(long)]
        events: PathBuf,
        /// After the last event, fire timers due at or before this instant (RFC 3339).
        #[arg(long, value_parser = parse_until)]
        until: Option<i64>,
        /// Keep state in this directory (RocksDB) across runs; default: a temporary one.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print a summary (lines, records, events/s) on stderr at the end.
        #[arg(long)]
        stats: bool,
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
    },
}

fn parse_until(s: &str) -> Result<i64, String> {
    parse_rfc3339(s)
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 time such as 2026-12-01T00:00:00Z"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Loadgen {
            journeys,
            events,
            count,
            users,
            seed,
        } => {
            let result = (|| -> std::io::Result<()> {
                waymark::loadgen::write_journeys(&journeys)?;
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
        Command::Validate { dir } => match load_dir(&dir) {
            Ok(set) => {
                println!("ok: {} journey(s) in {}", set.len(), dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Replay {
            journeys,
            events,
            until,
            state,
            stats,
        } => {
            let set = match load_dir(&journeys) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(1);
                }
            };
            let opts = ReplayOptions {
                events,
                until,
                state,
                progress: true,
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
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
