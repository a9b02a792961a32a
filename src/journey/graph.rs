//! The step graph of a journey: successors, reachability, and loops that never wait.

use super::{Problems, Step, StepIx, StepKind};

/// Successors of a step, in the order they are written.
fn successors(kind: &StepKind) -> Vec<StepIx> {
    match kind {
        StepKind::WaitForTrigger {
            branches,
            on_timeout,
            ..
        } => branches
            .iter()
            .filter_map(|b| b.next)
            .chain(on_timeout.iter().copied())
            .collect(),
        StepKind::Experiment { variants, .. } => variants.iter().filter_map(|v| v.next).collect(),
        StepKind::Delay { next, .. } | StepKind::Action { next, .. } => {
            next.iter().copied().collect()
        }
        StepKind::Split { branches, default } => branches
            .iter()
            .map(|b| b.1)
            .chain(default.iter().copied())
            .collect(),
        StepKind::Exit => Vec::new(),
    }
}

fn is_instant(kind: &StepKind) -> bool {
    matches!(
        kind,
        StepKind::Action { .. } | StepKind::Split { .. } | StepKind::Experiment { .. }
    )
}

/// Unreachable steps and loops that never wait.
pub(super) fn check_graph(steps: &[Step], start: StepIx, p: &mut Problems) {
    let mut seen = vec![false; steps.len()];
    let mut stack = vec![start];
    while let Some(s) = stack.pop() {
        if std::mem::replace(&mut seen[s], true) {
            continue;
        }
        stack.extend(successors(&steps[s].kind));
    }
    for (i, s) in steps.iter().enumerate() {
        if !seen[i] {
            p.add(
                format!("$.steps[{i}]"),
                format!("step {:?} is unreachable from the start step", s.id),
            );
        }
    }
    // A loop made only of action and split steps would run forever at once.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; steps.len()];
    let mut reported = false;
    fn dfs(
        s: StepIx,
        steps: &[Step],
        mark: &mut Vec<Mark>,
        path: &mut Vec<StepIx>,
        p: &mut Problems,
        reported: &mut bool,
    ) {
        mark[s] = Mark::Open;
        path.push(s);
        for n in successors(&steps[s].kind) {
            if !is_instant(&steps[n].kind) {
                continue;
            }
            match mark[n] {
                Mark::Open if !*reported => {
                    let from = path.iter().position(|&x| x == n).unwrap_or(0);
                    let cycle: Vec<&str> = path[from..]
                        .iter()
                        .chain(std::iter::once(&n))
                        .map(|&i| steps[i].id.as_str())
                        .collect();
                    p.add(
                        format!("$.steps[{n}]"),
                        format!(
                            "loop with no waiting step: {} (add a wait_for_trigger or delay to the loop)",
                            cycle.join(" -> ")
                        ),
                    );
                    *reported = true;
                }
                Mark::New => dfs(n, steps, mark, path, p, reported),
                _ => {}
            }
        }
        path.pop();
        mark[s] = Mark::Done;
    }
    for i in 0..steps.len() {
        if is_instant(&steps[i].kind) && mark[i] == Mark::New {
            dfs(i, steps, &mut mark, &mut Vec::new(), p, &mut reported);
        }
    }
}
