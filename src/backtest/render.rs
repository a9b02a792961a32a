//! The backtest report as aligned text tables (colour on a terminal, unless `NO_COLOR` is set).

use std::fmt::Write as _;

use super::compare::{way_name, Difference};
use super::funnel::{JourneyFunnel, Rate};
use super::Report;

/// Text styles: bold headings and dim notes on a terminal, nothing otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    /// Colour when stdout is a terminal and `NO_COLOR` is not set.
    pub fn for_stdout() -> Style {
        Style {
            colour: std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn bold(&self, s: &str) -> String {
        self.wrap("1", s)
    }

    fn dim(&self, s: &str) -> String {
        self.wrap("2", s)
    }

    fn wrap(&self, code: &str, s: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

/// Rows of cells as a table: the first row is the header; the first and last columns are
/// left-aligned, the ones between (numbers) right-aligned.
pub fn table(rows: &[Vec<String>], style: Style) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width = |c: usize| {
        rows.iter()
            .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..cols).map(width).collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let mut line = String::from("  ");
        for (c, cell) in r.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            if c == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else if c == cols - 1 {
                line.push_str("  ");
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        let line = line.trim_end().to_string();
        out.push_str(&if i == 0 { style.bold(&line) } else { line });
        out.push('\n');
    }
    out
}

fn pct(r: Option<f64>) -> String {
    r.map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
}

fn rate(r: &Rate) -> String {
    format!("{}/{} {}", r.converted, r.entries, pct(r.rate))
}

fn duration(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        _ if s < 120 => format!("{s}s"),
        _ if s < 7200 => format!("{}m", s / 60),
        _ if s < 172_800 => format!("{:.1}h", s as f64 / 3600.0),
        _ => format!("{:.1}d", s as f64 / 86_400.0),
    }
}

fn counts(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One journey's funnel.
pub fn journey(j: &JourneyFunnel, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {}",
        style.bold(&format!("journey {}", j.journey_id)),
        style.dim(&format!("(application {})", j.application))
    );
    let _ = writeln!(
        out,
        "  triggers {}, entries {}, refused: {}",
        j.triggers,
        j.entries,
        counts(&j.refused)
    );
    let mut rows = vec![vec![
        "step".to_string(),
        "type".into(),
        "reached".into(),
        "still there".into(),
        "left by".into(),
    ]];
    for s in &j.steps {
        let left: Vec<String> = s
            .left
            .iter()
            .map(|w| format!("{} {}", way_name(&w.way), w.sessions))
            .collect();
        rows.push(vec![
            s.step.clone(),
            s.kind.to_string(),
            s.reached.to_string(),
            s.still_there.to_string(),
            if left.is_empty() {
                "-".into()
            } else {
                left.join("; ")
            },
        ]);
    }
    out.push_str(&table(&rows, style));
    let _ = writeln!(out, "  exits: {}", counts(&j.exits));
    if !j.goals.is_empty() {
        let mut rows = vec![vec![
            "goal".to_string(),
            "converted".into(),
            "treatment".into(),
            "holdout".into(),
            "lift (95% CI)".into(),
            "p50".into(),
            "p90".into(),
        ]];
        for g in &j.goals {
            let lift = g.lift.as_ref().map_or("-".into(), |l| {
                format!(
                    "{:+.1} pt [{:+.1}, {:+.1}]",
                    l.absolute * 100.0,
                    l.ci95[0] * 100.0,
                    l.ci95[1] * 100.0
                )
            });
            let (p50, p90) = g.time_to_convert_ms.map_or(("-".into(), "-".into()), |t| {
                (duration(t.p50), duration(t.p90))
            });
            rows.push(vec![
                g.goal.clone(),
                rate(&g.all),
                g.treatment.as_ref().map_or("-".into(), rate),
                g.holdout.as_ref().map_or("-".into(), rate),
                lift,
                p50,
                p90,
            ]);
        }
        out.push_str(&table(&rows, style));
    }
    for a in &j.actions {
        let days: Vec<String> = a.per_day.iter().map(|(d, n)| format!("{d} {n}")).collect();
        let _ = writeln!(
            out,
            "  action {}: sent {}, suppressed: {}{}",
            a.action,
            a.sent,
            counts(&a.suppressed),
            if days.is_empty() {
                String::new()
            } else {
                format!("; per day: {}", days.join(", "))
            }
        );
    }
    out
}

/// The whole report.
pub fn report(r: &Report, style: Style) -> String {
    let mut out = format!(
        "{}\n\n",
        style.dim(&format!(
            "{} events ({} malformed), {} records",
            r.lines, r.malformed, r.records
        ))
    );
    for j in &r.journeys {
        out.push_str(&journey(j, style));
        out.push('\n');
    }
    out
}

/// The differences of a comparison, as one table; a line saying so when there are none.
pub fn differences(d: &[Difference], style: Style) -> String {
    if d.is_empty() {
        return "no differences\n".into();
    }
    let num = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v}"));
    let mut rows = vec![vec![
        "journey".to_string(),
        "metric".into(),
        "base".into(),
        "proposed".into(),
        "change".into(),
    ]];
    for x in d {
        let change = match (x.base, x.proposed) {
            (Some(a), Some(b)) => format!("{:+}", b - a),
            _ => "-".into(),
        };
        rows.push(vec![
            x.journey_id.clone(),
            x.metric.clone(),
            num(x.base),
            num(x.proposed),
            change,
        ]);
    }
    table(&rows, style)
}
