//! `--html FILE`: the report as one self-contained page (no scripts, no external files): per
//! journey a funnel drawn in SVG (triggers, entries, each step reached, each goal converted), then
//! the tables of the text report. With `--compare`, both sides and the differences.
//!
//! Every bar is an SVG `g.bar` with `data-stage` and `data-value`, so tools (and the browser test)
//! can read the numbers back from the page.

use std::fmt::Write;

use super::compare::Difference;
use super::funnel::{JourneyFunnel, Rate};
use super::Report;

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn pct(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{:.1}%", r * 100.0))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#1d2430;background:#fff}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #d0d7de}\
h3{font-size:1em;margin:1.2em 0 .4em}.meta{color:#57606a}\
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #d0d7de;padding:.25em .6em;text-align:right}\
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}\
svg.funnel text{font-size:12px;fill:#1d2430}svg.funnel .label{fill:#57606a}\
.diff td.changed{background:#fff3cd}\
table.goals td,table.goals th{white-space:nowrap}\
.pair{display:grid;grid-template-columns:1fr 1fr;gap:2em}.pair>*{min-width:0;overflow-x:auto}";

/// Colours of bars by stage kind.
fn fill(stage: &str) -> &'static str {
    match stage {
        "triggers" => "#8c959f",
        "entries" => "#0969da",
        s if s.starts_with("goal:") => "#1a7f37",
        _ => "#54aeff",
    }
}

/// The funnel of one journey as SVG: one horizontal bar per stage, widths relative to the
/// largest.
pub fn funnel_svg(j: &JourneyFunnel) -> String {
    let mut stages: Vec<(String, String, u64)> = vec![
        ("triggers".into(), "triggers".into(), j.triggers),
        ("entries".into(), "entries".into(), j.entries),
    ];
    for s in &j.steps {
        stages.push((
            format!("step:{}", s.step),
            format!("{} ({})", s.step, s.kind),
            s.reached,
        ));
    }
    for g in &j.goals {
        stages.push((
            format!("goal:{}", g.goal),
            format!("converted: {}", g.goal),
            g.all.converted,
        ));
    }
    let max = stages.iter().map(|s| s.2).max().unwrap_or(0).max(1);
    let (label_w, bar_w, row_h) = (220.0, 480.0, 26.0);
    let height = row_h * stages.len() as f64 + 8.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg class=\"funnel\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" \
         role=\"img\" aria-label=\"funnel of {id}\">",
        w = label_w + bar_w + 80.0,
        id = esc(&j.journey_id)
    );
    for (i, (stage, label, value)) in stages.iter().enumerate() {
        let y = 4.0 + row_h * i as f64;
        let w = (bar_w * *value as f64 / max as f64).max(if *value > 0 { 1.0 } else { 0.0 });
        let _ = write!(
            svg,
            "<g class=\"bar\" data-stage=\"{stage}\" data-value=\"{value}\">\
             <text class=\"label\" x=\"0\" y=\"{ty}\">{label}</text>\
             <rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{h}\" fill=\"{fill}\" rx=\"2\"/>\
             <text x=\"{tx:.1}\" y=\"{ty}\">{value}</text></g>",
            stage = esc(stage),
            label = esc(label),
            ty = y + row_h * 0.62,
            h = row_h - 6.0,
            fill = fill(stage),
            tx = label_w + w + 6.0,
        );
    }
    svg.push_str("</svg>");
    svg
}

fn rate_cell(r: &Option<Rate>) -> String {
    match r {
        Some(r) => format!(
            "<td>{} of {} ({})</td>",
            r.converted,
            r.entries,
            pct(r.rate)
        ),
        None => "<td>-</td>".into(),
    }
}

fn journey_section(j: &JourneyFunnel, side: &str) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<section class=\"journey\" data-journey=\"{id}\" data-side=\"{side}\"><h2>{id} \
         <span class=\"meta\">({app})</span></h2>",
        id = esc(&j.journey_id),
        app = esc(&j.application),
        side = esc(side)
    );
    h.push_str(&funnel_svg(j));
    if !j.refused.is_empty() || !j.exits.is_empty() {
        h.push_str(
            "<h3>Refused and exits</h3><table><tr><th>what</th><th>reason</th><th>count</th></tr>",
        );
        for (r, n) in &j.refused {
            let _ = write!(
                h,
                "<tr><td>refused</td><td>{}</td><td>{n}</td></tr>",
                esc(r)
            );
        }
        for (r, n) in &j.exits {
            let _ = write!(h, "<tr><td>exit</td><td>{}</td><td>{n}</td></tr>", esc(r));
        }
        h.push_str("</table>");
    }
    h.push_str("<h3>Steps</h3><table class=\"steps\"><tr><th>step</th><th>type</th><th>reached</th><th>still there</th><th style=\"text-align:left\">left</th></tr>");
    for s in &j.steps {
        let ways: Vec<String> = s
            .left
            .iter()
            .map(|w| format!("{}: {}", esc(&super::compare::way_name(&w.way)), w.sessions))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
            esc(&s.step),
            s.kind,
            s.reached,
            s.still_there,
            ways.join("<br>")
        );
    }
    h.push_str("</table>");
    if !j.goals.is_empty() {
        h.push_str(
            "<h3>Goals</h3><table class=\"goals\"><tr><th>goal</th><th>converted of entries</th>\
             <th>treatment</th><th>holdout</th><th>lift (95% CI)</th>\
             <th>time to convert p50 / p90</th></tr>",
        );
        for g in &j.goals {
            let lift = g.lift.as_ref().map_or("-".into(), |l| {
                format!(
                    "{:+.1} pts ({:+.1} to {:+.1})",
                    l.absolute * 100.0,
                    l.ci95[0] * 100.0,
                    l.ci95[1] * 100.0
                )
            });
            let ttc = g.time_to_convert_ms.map_or("-".into(), |p| {
                format!(
                    "{} / {}",
                    humantime::format_duration(std::time::Duration::from_secs(
                        (p.p50 / 1000).max(0) as u64
                    )),
                    humantime::format_duration(std::time::Duration::from_secs(
                        (p.p90 / 1000).max(0) as u64
                    ))
                )
            });
            let _ = write!(
                h,
                "<tr><td>{}</td>{}{}{}<td>{}</td><td>{}</td></tr>",
                esc(&g.goal),
                rate_cell(&Some(g.all.clone())),
                rate_cell(&g.treatment),
                rate_cell(&g.holdout),
                esc(&lift),
                esc(&ttc)
            );
        }
        h.push_str("</table>");
    }
    if !j.actions.is_empty() {
        h.push_str("<h3>Actions</h3><table class=\"actions\"><tr><th>action</th><th>sent</th><th>suppressed</th><th>per day</th></tr>");
        for a in &j.actions {
            let sup: Vec<String> = a
                .suppressed
                .iter()
                .map(|(r, n)| format!("{}: {n}", esc(r)))
                .collect();
            let days: Vec<String> = a
                .per_day
                .iter()
                .map(|(d, n)| format!("{}: {n}", esc(d)))
                .collect();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
                esc(&a.action),
                a.sent,
                sup.join(", "),
                days.join("<br>")
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");
    h
}

/// The whole page: `sides` are (name, report) pairs (one, or base and proposed); `differences`
/// with `--compare`.
pub fn page(title: &str, sides: &[(&str, &Report)], differences: Option<&[Difference]>) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>{STYLE}</style></head><body><h1>{t}</h1>",
        t = esc(title)
    );
    if let [(_, r)] = sides {
        let _ = write!(
            h,
            "<p class=\"meta\">{} inputs read, {} malformed, {} records emitted</p>",
            r.lines, r.malformed, r.records
        );
        for j in &r.journeys {
            h.push_str(&journey_section(j, ""));
        }
    } else {
        // Side by side: a column per side, a row per journey (either side's).
        let _ = write!(h, "<div class=\"pair\">");
        for (name, r) in sides {
            let _ = write!(
                h,
                "<div><h1 class=\"side\">{}</h1><p class=\"meta\">{} inputs read, {} malformed, \
                 {} records emitted</p></div>",
                esc(name),
                r.lines,
                r.malformed,
                r.records
            );
        }
        h.push_str("</div>");
        let mut ids: Vec<&str> = sides
            .iter()
            .flat_map(|(_, r)| r.journeys.iter().map(|j| j.journey_id.as_str()))
            .collect();
        ids.sort();
        ids.dedup();
        for id in ids {
            h.push_str("<div class=\"pair\">");
            for (name, r) in sides {
                match r.journeys.iter().find(|j| j.journey_id == id) {
                    Some(j) => h.push_str(&journey_section(j, name)),
                    None => {
                        let _ = write!(
                            h,
                            "<section class=\"absent\"><h2>{}</h2><p class=\"meta\">not in {}</p></section>",
                            esc(id),
                            esc(name)
                        );
                    }
                }
            }
            h.push_str("</div>");
        }
    }
    if let Some(d) = differences {
        let _ = write!(
            h,
            "<h1>Differences</h1><table class=\"diff\"><tr><th>journey</th><th>metric</th>\
             <th>base</th><th>proposed</th></tr>"
        );
        let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v}"));
        for x in d {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"changed\">{}</td><td class=\"changed\">{}</td></tr>",
                esc(&x.journey_id),
                esc(&x.metric),
                num(x.base),
                num(x.proposed)
            );
        }
        if d.is_empty() {
            h.push_str("<tr><td colspan=\"4\">no differences</td></tr>");
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped() {
        let j = JourneyFunnel {
            journey_id: "<script>x</script>".into(),
            application: "a&b".into(),
            triggers: 3,
            entries: 2,
            ..Default::default()
        };
        let r = Report {
            lines: 1,
            malformed: 0,
            records: 2,
            journeys: vec![j],
        };
        let p = page("t", &[("", &r)], None);
        assert!(!p.contains("<script>"));
        assert!(p.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(p.contains("a&amp;b"));
        assert!(p.contains("data-stage=\"entries\" data-value=\"2\""));
    }

    #[test]
    fn bars_are_as_wide_as_their_share_of_the_largest() {
        let j = JourneyFunnel {
            journey_id: "j".into(),
            triggers: 4,
            entries: 2,
            ..Default::default()
        };
        let svg = funnel_svg(&j);
        assert!(svg.contains("width=\"480.0\""), "{svg}");
        assert!(svg.contains("width=\"240.0\""), "{svg}");
    }
}
