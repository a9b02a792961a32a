//! `waymark backtest`: its source flags and the command (run, then text, JSON or HTML out).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use waymark::journey::load_dir;
use waymark::replay::ReplayOptions;

use crate::cli::{parse_until, EngineRun};

/// Where a backtest reads its events: a file, or a time range of Kafka topics.
#[derive(clap::Args)]
pub(crate) struct BacktestSource {
    /// The events file (JSON lines).
    #[arg(long, required_unless_present = "brokers", conflicts_with = "brokers")]
    events: Option<PathBuf>,
    /// Read the events from these Kafka brokers instead (read only: no group, no commits, nothing
    /// produced).
    #[arg(long, requires_all = ["topics", "from", "to"])]
    brokers: Option<String>,
    /// The topics to read (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "brokers")]
    topics: Vec<String>,
    /// The first record time to read (RFC 3339): offsets are looked up by time.
    #[arg(long, value_parser = parse_until, requires = "brokers")]
    from: Option<i64>,
    /// Read records stamped before this time (RFC 3339); `--until` defaults to it.
    #[arg(long, value_parser = parse_until, requires = "brokers")]
    to: Option<i64>,
    /// A waymark config file whose Kafka client properties (`[kafka.properties]`: TLS, SASL)
    /// the reader uses.
    #[arg(long, requires = "brokers")]
    config: Option<PathBuf>,
    /// Only read the range and print how many records it holds and how fast they came, without
    /// running the journeys (the baseline a backtest from Kafka is measured against).
    #[arg(long, requires = "brokers")]
    consume_only: bool,
}

pub(crate) fn backtest_command(
    engine: EngineRun,
    source: BacktestSource,
    compare: Option<PathBuf>,
    json: bool,
    html: Option<PathBuf>,
    stats: bool,
) -> ExitCode {
    let started = std::time::Instant::now();
    use waymark::backtest::{self, compare as cmp, kafka, render};
    let read_from = match (&source.events, &source.brokers) {
        (Some(f), _) => f.display().to_string(),
        (None, Some(b)) => format!(
            "{} on {b}, {} to {}",
            source.topics.join(","),
            source
                .from
                .map(waymark::time::format_millis)
                .unwrap_or_default(),
            source
                .to
                .map(waymark::time::format_millis)
                .unwrap_or_default()
        ),
        (None, None) => String::new(),
    };
    let (journeys, mut opts) = engine.split(source.events.clone().unwrap_or_default());
    // A backtest's state is thrown away: in memory unless --state puts it in RocksDB.
    opts.in_memory = true;
    let load = |dir: &PathBuf| match load_dir(dir) {
        Ok(s) => Ok(Arc::new(s)),
        Err(e) => {
            eprint!("{e}");
            Err(ExitCode::from(1))
        }
    };
    let mut sides = vec![match load(&journeys) {
        Ok(s) => s,
        Err(c) => return c,
    }];
    if let Some(dir) = &compare {
        match load(dir) {
            Ok(s) => sides.push(s),
            Err(c) => return c,
        }
    }
    // With --compare, each side keeps its state under --state/base and --state/proposed.
    let until = opts.until;
    let side_opts: Vec<ReplayOptions> = if compare.is_some() {
        ["base", "proposed"]
            .iter()
            .map(|name| ReplayOptions {
                state: opts.state.as_ref().map(|d| d.join(name)),
                events: opts.events.clone(),
                ..opts
            })
            .collect()
    } else {
        vec![opts]
    };
    let sides: Vec<_> = sides.into_iter().zip(side_opts).collect();
    let reports = match &source.brokers {
        None => sides
            .into_iter()
            .map(|(set, o)| backtest::run_file(set, &o, &mut std::io::stderr()).map(|(r, _)| r))
            .collect::<anyhow::Result<Vec<_>>>(),
        Some(brokers) => {
            if let Some(file) = &source.config {
                let cfg = match waymark::config::load(Some(file), Vec::new(), &[]) {
                    Ok(c) => c,
                    Err(e) => {
                        eprint!("waymark backtest: {e}");
                        return ExitCode::from(2);
                    }
                };
                match cfg.client_properties() {
                    Ok(props) => waymark::kafka::set_client_properties(props),
                    Err(e) => {
                        eprint!("waymark backtest: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            let range = kafka::Range {
                brokers: brokers.clone(),
                topics: source.topics.clone(),
                from: source.from.expect("clap requires --from"),
                to: source.to.expect("clap requires --to"),
                progress: true,
                buffer_bytes: kafka::BUFFER_BYTES,
            };
            if source.consume_only {
                let mut bytes = 0u64;
                return match kafka::read(&range, &mut |r| {
                    bytes += r.value.len() as u64;
                    Ok(())
                }) {
                    Ok(s) => {
                        println!(
                            "consume only: {} records ({bytes} bytes) from {} partitions in {:.3} s: {:.0} records/s",
                            s.records,
                            s.partitions,
                            s.seconds,
                            s.records as f64 / s.seconds.max(1e-9)
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("waymark backtest: {e:#}");
                        ExitCode::from(2)
                    }
                };
            }
            backtest::run_kafka(sides, &range, until, &mut std::io::stderr()).map(|(r, _)| r)
        }
    };
    let mut reports = match reports {
        Ok(r) => r,
        Err(e) => {
            eprintln!("waymark backtest: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &html {
        let title = format!("waymark backtest: {} over {read_from}", journeys.display());
        let page = match &compare {
            None => backtest::html::page(&title, &[("", &reports[0])], None),
            Some(_) => {
                let d = cmp::differences(&reports[0], &reports[1]);
                backtest::html::page(
                    &title,
                    &[("base", &reports[0]), ("proposed", &reports[1])],
                    Some(&d),
                )
            }
        };
        if let Err(e) = std::fs::write(path, page) {
            eprintln!("waymark backtest: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if stats {
        let secs = started.elapsed().as_secs_f64();
        let r = &reports[0];
        eprintln!(
            "backtest: {} inputs ({} malformed), {} records, {} journey set(s) in {secs:.3} s: {:.0} events/s",
            r.lines,
            r.malformed,
            r.records,
            reports.len(),
            r.lines as f64 / secs.max(1e-9)
        );
    }
    let style = render::Style::for_stdout();
    let text = match compare {
        None => {
            let r = reports.remove(0);
            if json {
                serde_json::to_string_pretty(&r).expect("reports serialise") + "\n"
            } else {
                render::report(&r, style)
            }
        }
        Some(dir) => {
            let proposed = reports.pop().expect("two sides");
            let base = reports.pop().expect("two sides");
            let differences = cmp::differences(&base, &proposed);
            if json {
                let c = cmp::Comparison {
                    base,
                    proposed,
                    differences,
                };
                serde_json::to_string_pretty(&c).expect("reports serialise") + "\n"
            } else {
                format!(
                    "{}\n{}\n{}\n{}\n{}",
                    style_heading(style, &format!("base: {}", journeys.display())),
                    render::report(&base, style),
                    style_heading(style, &format!("proposed: {}", dir.display())),
                    render::report(&proposed, style),
                    render::differences(&differences, style)
                )
            }
        }
    };
    print!("{text}");
    ExitCode::SUCCESS
}

fn style_heading(style: waymark::backtest::render::Style, s: &str) -> String {
    if style.colour {
        format!("\x1b[1;4m{s}\x1b[0m")
    } else {
        format!("== {s}")
    }
}
