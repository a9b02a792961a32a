//! The `waymark` command: parses arguments and dispatches to a subcommand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

mod cli;
use cli::{Cli, Command};

mod backtest_cmd;
use backtest_cmd::backtest_command;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use waymark::journey::load_dir;
use waymark::replay::replay;

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
