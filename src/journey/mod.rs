//! Journey definitions (contract section 2): the compiled form the engine runs, loading a
//! directory of JSON files, and validation that reports every problem with file, JSON path and
//! reason.

pub mod condition;
mod controls;
mod graph;
pub mod policy;
mod validate;
pub mod window;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono_tz::Tz;
use serde_json::{Map, Value};

pub use condition::{Condition, Conditions, Op, Scalar};
pub use policy::{Cap, Period, Policy, QuietHours};
pub use validate::{compile_journey, MAX_STEPS};
pub use window::Window;

use crate::time::Millis;

/// One problem in a journey definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// JSON path into the file, such as `$.steps[2].next`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.path, self.message)
    }
}

/// Problems collected while checking one file.
#[derive(Debug, Default)]
pub struct Problems {
    file: String,
    pub list: Vec<Problem>,
}

impl Problems {
    pub fn new(file: impl Into<String>) -> Problems {
        Problems {
            file: file.into(),
            list: Vec::new(),
        }
    }

    pub fn add(&mut self, path: impl AsRef<str>, message: impl Into<String>) {
        self.list.push(Problem {
            file: self.file.clone(),
            path: path.as_ref().to_string(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Reports every key of `obj` that is not in `known`.
    pub fn unknown_keys(&mut self, obj: &Map<String, Value>, path: &str, known: &[&str]) {
        for k in obj.keys() {
            if !known.contains(&k.as_str()) {
                self.add(
                    format!("{path}.{k}"),
                    format!("unknown field {k:?}; expected one of {}", known.join(", ")),
                );
            }
        }
    }
}

/// Every problem found in a set of definitions.
#[derive(Debug, thiserror::Error)]
pub struct InvalidJourneys(pub Vec<Problem>);

impl fmt::Display for InvalidJourneys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} problem(s) in journey definitions:", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Journey status: `active` (default), `paused` (no new entries; sessions go on), `archived`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Paused,
    Archived,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Paused => "paused",
            Status::Archived => "archived",
        }
    }
}

/// Who enters when the trigger matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// The user who performed the event.
    EventUser,
    /// The users named in this attribute of the event.
    Attribute(String),
}

/// How many sessions a user may have at once in a journey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionMode {
    Single,
    /// One session per distinct value of this attribute of the trigger event.
    Multiple {
        identifier: String,
    },
}

/// The trigger-based entry element.
#[derive(Debug, Clone)]
pub struct Entry {
    pub event: String,
    pub conditions: Conditions,
    pub who: Who,
    /// `None`: any time.
    pub window: Option<Window>,
    pub sessions: SessionMode,
    /// When an entry key may enter again (contract 5.1).
    pub reentry: Reentry,
    /// At most this many entries per user, all identifiers together.
    pub max_entries: Option<u64>,
}

impl Entry {
    /// Whether entries of this journey are remembered after their session ends.
    pub fn keeps_history(&self) -> bool {
        self.reentry != Reentry::Always || self.max_entries.is_some()
    }
}

/// `entry.reentry`: when an entry key (the user, or user + identifier) may enter again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reentry {
    /// Only the session rules decide.
    Always,
    /// At most once, ever.
    Never,
    /// Again at or after the last entry + this long.
    After(Millis),
}

/// An event name with conditions on its attributes (an `exit_on` entry, a branch's event).
#[derive(Debug, Clone)]
pub struct Trigger {
    pub event: String,
    pub conditions: Conditions,
}

impl Trigger {
    /// Whether the event (name and attributes) matches, for a user with this profile.
    pub fn matches(
        &self,
        name: &str,
        attributes: &Map<String, Value>,
        profile: Option<&Map<String, Value>>,
    ) -> bool {
        self.event == name && self.conditions.eval_in(attributes, profile)
    }
}

/// One way out of a wait step (contract 5.3). A single-event wait is one branch with `any`.
#[derive(Debug, Clone)]
pub struct WaitBranch {
    /// `None` for the single-event form of section 2 (its records carry no `branch`).
    pub id: Option<String>,
    /// 1 to 4 triggers; progress is one bit per trigger.
    pub events: Vec<Trigger>,
    /// `match: "all"`: every trigger matched at least once while the session waits here.
    pub all: bool,
    pub next: Option<StepIx>,
}

/// Progress bits of branch `b`, trigger `e` in a session's `progress`.
pub fn progress_bit(b: usize, e: usize) -> u32 {
    1 << (b * 4 + e)
}

impl WaitBranch {
    /// Whether the branch `b` is complete with these progress bits.
    pub fn complete(&self, b: usize, progress: u32) -> bool {
        let mut bits = 0;
        for e in 0..self.events.len() {
            bits |= progress_bit(b, e);
        }
        if self.all {
            progress & bits == bits
        } else {
            progress & bits != 0
        }
    }
}

/// One variant of an experiment step.
#[derive(Debug, Clone)]
pub struct Variant {
    pub id: String,
    pub weight: u64,
    pub next: Option<StepIx>,
}

/// A step index inside its journey.
pub type StepIx = usize;

#[derive(Debug, Clone)]
pub enum StepKind {
    WaitForTrigger {
        branches: Vec<WaitBranch>,
        timeout: Option<Millis>,
        on_timeout: Option<StepIx>,
    },
    Delay {
        duration: Millis,
        next: Option<StepIx>,
    },
    Action {
        action: String,
        params: Value,
        next: Option<StepIx>,
        ignore_quiet_hours: bool,
        ignore_caps: bool,
    },
    /// Sends each user down one variant, by a hash of (journey, step, user) (contract 5.4).
    Experiment {
        variants: Vec<Variant>,
        /// The sum of the weights (positive).
        total: u64,
    },
    Split {
        branches: Vec<(Conditions, StepIx)>,
        default: Option<StepIx>,
    },
    Exit,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
}

/// A conversion goal.
#[derive(Debug, Clone)]
pub struct Goal {
    pub id: String,
    pub event: String,
    pub conditions: Conditions,
    pub within: Option<Millis>,
    pub exit: bool,
}

/// A validated journey, ready to run.
#[derive(Debug, Clone)]
pub struct Journey {
    pub id: String,
    pub application: String,
    pub status: Status,
    pub entry: Entry,
    pub start: StepIx,
    pub steps: Vec<Step>,
    pub goals: Vec<Goal>,
    /// Events that end the user's sessions at once (contract 5.2).
    pub exit_on: Vec<Trigger>,
    /// Share of users held out, in hundredths of a percent (0 to 10000).
    pub holdout: Option<u32>,
    /// The journey's own quiet hours: `None` takes the application policy's, `Some(None)` has none.
    pub quiet_hours: Option<Option<QuietHours>>,
    /// The journey's own `timezone_attribute` and `default_timezone`, over the policy's.
    pub timezone_attribute: Option<String>,
    pub default_timezone: Option<Tz>,
    /// The definition as written, for versioning and inspection.
    pub source: Value,
    /// A hash of the definition: a changed journey is a new version.
    pub version: String,
    /// Where it was loaded from.
    pub file: String,
}

impl Journey {
    pub fn step_ix(&self, id: &str) -> Option<StepIx> {
        self.steps.iter().position(|s| s.id == id)
    }

    /// Whether any wait step, goal or exit criterion listens to `event`.
    pub fn listens_to(&self, event: &str) -> bool {
        self.listened().any(|e| e == event)
    }

    /// Every event name a session of this journey reacts to (goals, exit criteria, waits).
    pub fn listened(&self) -> impl Iterator<Item = &str> {
        let waits = self.steps.iter().flat_map(|s| match &s.kind {
            StepKind::WaitForTrigger { branches, .. } => branches.as_slice(),
            _ => &[],
        });
        self.goals
            .iter()
            .map(|g| g.event.as_str())
            .chain(self.exit_on.iter().map(|t| t.event.as_str()))
            .chain(waits.flat_map(|b| b.events.iter().map(|t| t.event.as_str())))
    }
}

/// What one (application, event name) pair means to the journey set.
#[derive(Debug, Default, Clone)]
pub struct Interest {
    /// Journeys (indexes into [`JourneySet::journeys`]) whose entry trigger is this event.
    pub entries: Vec<usize>,
    /// Whether some journey of the application waits for this event or has it as a goal, so the
    /// user's live sessions must be looked at.
    pub sessions: bool,
    /// Whether the entry conditions of some `who: "event_user"` journey of these read the
    /// profile, so the event user's state must be loaded before entries are decided.
    pub entry_profile: bool,
}

/// All loaded journeys, sorted by id, with an index from (application, event) to interest.
#[derive(Debug, Default, Clone)]
pub struct JourneySet {
    /// The current journeys, sorted by id.
    pub journeys: Vec<Arc<Journey>>,
    /// Every version sessions may be on: the current ones and older ones still in use.
    versions: HashMap<String, HashMap<String, Arc<Journey>>>,
    interest: HashMap<String, HashMap<String, Interest>>,
    /// Application policies (contract 5.5), by application.
    policies: HashMap<String, Arc<Policy>>,
}

impl JourneySet {
    pub fn new(journeys: Vec<Journey>) -> JourneySet {
        JourneySet::with_versions(journeys.into_iter().map(Arc::new).collect(), Vec::new())
    }

    /// The current journeys plus older versions that sessions may still be on. Entries use the
    /// current journeys only; waits, goals and timers of a session use the version it entered.
    pub fn with_versions(mut journeys: Vec<Arc<Journey>>, older: Vec<Arc<Journey>>) -> JourneySet {
        journeys.sort_by(|a, b| a.id.cmp(&b.id));
        let mut versions: HashMap<String, HashMap<String, Arc<Journey>>> = HashMap::new();
        for j in older.iter().chain(journeys.iter()) {
            versions
                .entry(j.id.clone())
                .or_default()
                .insert(j.version.clone(), j.clone());
        }
        let mut interest: HashMap<String, HashMap<String, Interest>> = HashMap::new();
        for (ix, j) in journeys.iter().enumerate() {
            let app = interest.entry(j.application.clone()).or_default();
            let it = app.entry(j.entry.event.clone()).or_default();
            it.entries.push(ix);
            if j.entry.who == Who::EventUser && j.entry.conditions.reads_profile() {
                it.entry_profile = true;
            }
        }
        for j in versions.values().flat_map(|v| v.values()) {
            let app = interest.entry(j.application.clone()).or_default();
            for e in j.listened() {
                app.entry(e.to_string()).or_default().sessions = true;
            }
        }
        JourneySet {
            journeys,
            versions,
            interest,
            policies: HashMap::new(),
        }
    }

    /// The same set with these application policies.
    pub fn with_policies(mut self, policies: HashMap<String, Arc<Policy>>) -> JourneySet {
        self.policies = policies;
        self
    }

    /// The policy of `application`, if it has one.
    pub fn policy(&self, application: &str) -> Option<&Arc<Policy>> {
        self.policies.get(application)
    }

    /// Every policy, by application.
    pub fn policies(&self) -> &HashMap<String, Arc<Policy>> {
        &self.policies
    }

    /// The version `version` of journey `id`, or the current one when that version is unknown.
    pub fn version(&self, id: &str, version: &str) -> Option<&Arc<Journey>> {
        self.versions
            .get(id)
            .and_then(|v| v.get(version))
            .or_else(|| self.get(id))
    }

    /// Every version held, current ones included.
    pub fn all_versions(&self) -> impl Iterator<Item = &Arc<Journey>> {
        self.versions.values().flat_map(|v| v.values())
    }

    /// Whether `version` is the current version of journey `id`.
    pub fn is_current(&self, id: &str, version: &str) -> bool {
        self.get(id).is_some_and(|j| j.version == version)
    }

    /// Whether this exact version is held.
    pub fn has_version(&self, id: &str, version: &str) -> bool {
        self.versions
            .get(id)
            .is_some_and(|v| v.contains_key(version))
    }

    /// What the event `name` of `application` means here; `None` when no journey cares.
    pub fn interest(&self, application: &str, name: &str) -> Option<&Interest> {
        self.interest.get(application)?.get(name)
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Journey>> {
        self.journeys
            .binary_search_by(|j| j.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.journeys[i])
    }

    pub fn len(&self) -> usize {
        self.journeys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.journeys.is_empty()
    }
}

/// Loads and validates every `*.json` file of `dir` (sorted by name). All problems of all files
/// are returned together; duplicate journey ids across files are problems too.
pub fn load_dir(dir: &Path) -> Result<JourneySet, InvalidJourneys> {
    let mut problems = Vec::new();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
            .collect(),
        Err(e) => {
            return Err(InvalidJourneys(vec![Problem {
                file: dir.display().to_string(),
                path: "$".into(),
                message: format!("cannot read the journeys directory: {e}"),
            }]))
        }
    };
    files.sort();
    let mut journeys: Vec<Journey> = Vec::new();
    let mut policies: HashMap<String, Arc<Policy>> = HashMap::new();
    for f in &files {
        let name = f.display().to_string();
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem {
                    file: name,
                    path: "$".into(),
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        match parse_definition(&name, &text) {
            Ok(Definition::Journey(j)) => {
                if let Some(other) = journeys.iter().find(|o| o.id == j.id) {
                    problems.push(Problem {
                        file: name,
                        path: "$.id".into(),
                        message: format!("duplicate journey id {:?}, also in {}", j.id, other.file),
                    });
                } else {
                    journeys.push(*j);
                }
            }
            Ok(Definition::Policy(pol)) => {
                if let Some(other) = policies.get(&pol.application) {
                    problems.push(Problem {
                        file: name,
                        path: "$.policy_for".into(),
                        message: format!(
                            "a second policy for application {:?}, also in {}: one policy per application",
                            pol.application, other.file
                        ),
                    });
                } else {
                    policies.insert(pol.application.clone(), Arc::new(pol));
                }
            }
            Err(mut ps) => problems.append(&mut ps),
        }
    }
    if problems.is_empty() {
        Ok(JourneySet::new(journeys).with_policies(policies))
    } else {
        Err(InvalidJourneys(problems))
    }
}

/// One file of the journeys directory: a journey, or an application policy (`policy_for`).
pub enum Definition {
    Journey(Box<Journey>),
    Policy(Policy),
}

/// Parses and validates one file's text, a journey or a policy.
pub fn parse_definition(file: &str, text: &str) -> Result<Definition, Vec<Problem>> {
    let value = parse_json(file, text)?;
    if value.get("policy_for").is_some() && value.get("id").is_none() {
        policy::compile_policy(file, &value).map(Definition::Policy)
    } else {
        compile_journey(file, &value).map(|j| Definition::Journey(Box::new(j)))
    }
}

fn parse_json(file: &str, text: &str) -> Result<Value, Vec<Problem>> {
    serde_json::from_str(text).map_err(|e| {
        vec![Problem {
            file: file.to_string(),
            path: "$".into(),
            message: format!("not valid JSON: {e}"),
        }]
    })
}

/// Parses and validates one definition file's text.
pub fn parse_journey(file: &str, text: &str) -> Result<Journey, Vec<Problem>> {
    compile_journey(file, &parse_json(file, text)?)
}
