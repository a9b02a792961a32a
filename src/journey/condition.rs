//! Conditions on event attributes (contract section 2, "Condition operators").
//!
//! Rules: numbers compare numerically (`10` equals `10.0`); strings exactly; `contains` is a
//! substring test on a string and an element test on an array; `between` is inclusive. A value of
//! the wrong type makes a condition false. An absent attribute satisfies only `not_exists`. An
//! empty list always holds; `match: "any"` needs one condition to hold instead of all.
//!
//! An attribute name is looked up as a key first; if there is no such key and the name has dots,
//! it is read as a path into nested objects (`address.city`).

use serde_json::{Map, Value};

use super::Problems;

/// A scalar operand from a definition.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Num(f64),
    Int(i64),
    Str(String),
    Bool(bool),
}

impl Scalar {
    fn from_json(v: &Value) -> Option<Scalar> {
        match v {
            Value::String(s) => Some(Scalar::Str(s.clone())),
            Value::Bool(b) => Some(Scalar::Bool(*b)),
            Value::Number(n) => Some(match n.as_i64() {
                Some(i) => Scalar::Int(i),
                None => Scalar::Num(n.as_f64()?),
            }),
            _ => None,
        }
    }

    /// Equality under the contract's rules; a type mismatch is `None` ("wrong type").
    fn equals(&self, v: &Value) -> Option<bool> {
        match (self, v) {
            (Scalar::Str(a), Value::String(b)) => Some(a == b),
            (Scalar::Bool(a), Value::Bool(b)) => Some(a == b),
            (Scalar::Int(a), Value::Number(n)) => Some(match n.as_i64() {
                Some(b) => *a == b,
                None => n.as_f64() == Some(*a as f64),
            }),
            (Scalar::Num(a), Value::Number(n)) => Some(n.as_f64() == Some(*a)),
            _ => None,
        }
    }
}

/// An operator with its prepared operand.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Eq(Scalar),
    Ne(Scalar),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
    Between(f64, f64),
    In(Vec<Scalar>),
    NotIn(Vec<Scalar>),
    Contains(Scalar),
    NotContains(Scalar),
    StartsWith(String),
    Exists,
    NotExists,
}

/// One condition: an attribute and an operator.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub attribute: String,
    pub op: Op,
}

/// A condition list with its `match` mode.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conditions {
    pub any: bool,
    pub list: Vec<Condition>,
}

impl Conditions {
    /// True when the list holds for these attributes, with no profile.
    pub fn eval(&self, attrs: &Map<String, Value>) -> bool {
        self.eval_in(attrs, None)
    }

    /// True when the list holds for these attributes (event attributes or a session context)
    /// and the user's profile (read by `profile.` names).
    pub fn eval_in(
        &self,
        attrs: &Map<String, Value>,
        profile: Option<&Map<String, Value>>,
    ) -> bool {
        if self.list.is_empty() {
            return true;
        }
        if self.any {
            self.list.iter().any(|c| c.eval_in(attrs, profile))
        } else {
            self.list.iter().all(|c| c.eval_in(attrs, profile))
        }
    }

    /// The list judged without the profile: `Some(answer)` when the conditions on the
    /// attributes decide it whatever the profile holds, `None` when it depends on conditions
    /// that read the profile (a `who: {attribute}` entry decides those on each target's
    /// partition).
    pub fn eval_without_profile(&self, attrs: &Map<String, Value>) -> Option<bool> {
        if self.list.is_empty() {
            return Some(true);
        }
        let mut unknown = false;
        for c in &self.list {
            if c.reads_profile() {
                unknown = true;
                continue;
            }
            let held = c.eval_in(attrs, None);
            if held == self.any {
                // `any` and one holds, or `all` and one fails: decided.
                return Some(held);
            }
        }
        if unknown {
            None
        } else {
            Some(!self.any)
        }
    }

    /// Whether some condition reads the user's profile.
    pub fn reads_profile(&self) -> bool {
        self.list.iter().any(Condition::reads_profile)
    }
}

/// The prefix of attribute names that read the user's stored profile.
pub const PROFILE_PREFIX: &str = "profile.";

/// Finds a condition's attribute: a `profile.` name in the profile (by the rest of the name),
/// any other in `attrs`.
pub fn lookup_in<'a>(
    attrs: &'a Map<String, Value>,
    profile: Option<&'a Map<String, Value>>,
    name: &str,
) -> Option<&'a Value> {
    match name.strip_prefix(PROFILE_PREFIX) {
        Some(rest) => lookup(profile?, rest),
        None => lookup(attrs, name),
    }
}

/// Finds an attribute by key, or by dotted path into nested objects when no such key exists.
pub fn lookup<'a>(attrs: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = attrs.get(name) {
        return Some(v);
    }
    if !name.contains('.') {
        return None;
    }
    let mut parts = name.split('.');
    let mut cur = attrs.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

impl Condition {
    /// Evaluates this condition against event attributes or a session context, with no profile.
    pub fn eval(&self, attrs: &Map<String, Value>) -> bool {
        self.eval_in(attrs, None)
    }

    /// Whether the condition reads the user's profile (its attribute starts with `profile.`).
    pub fn reads_profile(&self) -> bool {
        self.attribute.starts_with(PROFILE_PREFIX)
    }

    /// Evaluates this condition against event attributes or a session context and the user's
    /// profile.
    pub fn eval_in(
        &self,
        attrs: &Map<String, Value>,
        profile: Option<&Map<String, Value>>,
    ) -> bool {
        let v = match lookup_in(attrs, profile, &self.attribute) {
            Some(v) => v,
            None => return matches!(self.op, Op::NotExists),
        };
        match &self.op {
            Op::Exists => true,
            Op::NotExists => false,
            Op::Eq(s) => s.equals(v) == Some(true),
            Op::Ne(s) => s.equals(v) == Some(false),
            Op::Gt(x) => num(v).is_some_and(|a| a > *x),
            Op::Gte(x) => num(v).is_some_and(|a| a >= *x),
            Op::Lt(x) => num(v).is_some_and(|a| a < *x),
            Op::Lte(x) => num(v).is_some_and(|a| a <= *x),
            Op::Between(lo, hi) => num(v).is_some_and(|a| a >= *lo && a <= *hi),
            Op::In(list) => list.iter().any(|s| s.equals(v) == Some(true)),
            Op::NotIn(list) => {
                let mut comparable = false;
                for s in list {
                    match s.equals(v) {
                        Some(true) => return false,
                        Some(false) => comparable = true,
                        None => {}
                    }
                }
                comparable
            }
            Op::Contains(s) => contains(v, s) == Some(true),
            Op::NotContains(s) => contains(v, s) == Some(false),
            Op::StartsWith(p) => v.as_str().is_some_and(|a| a.starts_with(p.as_str())),
        }
    }
}

/// `contains`: substring of a string, element of an array; `None` for a type mismatch.
fn contains(v: &Value, s: &Scalar) -> Option<bool> {
    match (v, s) {
        (Value::String(a), Scalar::Str(b)) => Some(a.contains(b.as_str())),
        (Value::Array(items), _) => Some(items.iter().any(|i| s.equals(i) == Some(true))),
        _ => None,
    }
}

pub const OPERATORS: &[&str] = &[
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "between",
    "in",
    "not_in",
    "contains",
    "not_contains",
    "starts_with",
    "exists",
    "not_exists",
];

/// Compiles `conditions` (and the sibling `match`) of the object at `path`; problems go to `p`.
pub fn compile_conditions(obj: &Map<String, Value>, path: &str, p: &mut Problems) -> Conditions {
    let any = match obj.get("match") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "all" => false,
        Some(Value::String(s)) if s == "any" => true,
        Some(other) => {
            p.add(
                format!("{path}.match"),
                format!("match must be \"all\" or \"any\", found {other}"),
            );
            false
        }
    };
    let mut list = Vec::new();
    match obj.get("conditions") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(c) = compile_condition(item, &format!("{path}.conditions[{i}]"), p) {
                    list.push(c);
                }
            }
        }
        Some(other) => p.add(
            format!("{path}.conditions"),
            format!("conditions must be an array, found {}", kind(other)),
        ),
    }
    Conditions { any, list }
}

/// The JSON type name of a value, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn compile_condition(v: &Value, path: &str, p: &mut Problems) -> Option<Condition> {
    let obj = match v.as_object() {
        Some(o) => o,
        None => {
            p.add(
                path,
                format!("a condition must be an object, found {}", kind(v)),
            );
            return None;
        }
    };
    p.unknown_keys(obj, path, &["attribute", "operator", "value"]);
    let attribute = match obj.get("attribute") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            p.add(
                format!("{path}.attribute"),
                format!("attribute must be a non-empty string, found {other}"),
            );
            None
        }
        None => {
            p.add(path, "missing attribute");
            None
        }
    };
    let op_name = match obj.get("operator") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            p.add(
                format!("{path}.operator"),
                format!("operator must be a string, found {other}"),
            );
            return None;
        }
        None => {
            p.add(path, "missing operator");
            return None;
        }
    };
    let vpath = format!("{path}.value");
    let value = obj.get("value");
    let scalar = |p: &mut Problems| -> Option<Scalar> {
        match value {
            None => {
                p.add(path, format!("operator {op_name} needs a value"));
                None
            }
            Some(v) => {
                let s = Scalar::from_json(v);
                if s.is_none() {
                    p.add(
                        &vpath,
                        format!(
                            "operator {op_name} takes a string, number or boolean, found {}",
                            kind(v)
                        ),
                    );
                }
                s
            }
        }
    };
    let number = |p: &mut Problems| -> Option<f64> {
        match value {
            None => {
                p.add(path, format!("operator {op_name} needs a value"));
                None
            }
            Some(Value::Number(n)) => n.as_f64(),
            Some(v) => {
                p.add(
                    &vpath,
                    format!("operator {op_name} takes a number, found {}", kind(v)),
                );
                None
            }
        }
    };
    let list = |p: &mut Problems| -> Option<Vec<Scalar>> {
        match value {
            None => {
                p.add(path, format!("operator {op_name} needs a value"));
                None
            }
            Some(Value::Array(items)) if items.is_empty() => {
                p.add(
                    &vpath,
                    format!("operator {op_name} needs at least one value"),
                );
                None
            }
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match Scalar::from_json(item) {
                        Some(s) => out.push(s),
                        None => p.add(
                            format!("{vpath}[{i}]"),
                            format!(
                                "operator {op_name} takes strings, numbers or booleans, found {}",
                                kind(item)
                            ),
                        ),
                    }
                }
                (out.len() == items.len()).then_some(out)
            }
            Some(v) => {
                p.add(
                    &vpath,
                    format!(
                        "operator {op_name} takes an array of values, found {}",
                        kind(v)
                    ),
                );
                None
            }
        }
    };
    let op = match op_name {
        "eq" => Op::Eq(scalar(p)?),
        "ne" => Op::Ne(scalar(p)?),
        "gt" => Op::Gt(number(p)?),
        "gte" => Op::Gte(number(p)?),
        "lt" => Op::Lt(number(p)?),
        "lte" => Op::Lte(number(p)?),
        "between" => {
            let bounds = match value {
                Some(Value::Array(b)) if b.len() == 2 => (b[0].as_f64(), b[1].as_f64()),
                _ => (None, None),
            };
            match bounds {
                (Some(lo), Some(hi)) if lo <= hi => Op::Between(lo, hi),
                (Some(lo), Some(hi)) => {
                    p.add(
                        &vpath,
                        format!("between bounds are reversed: low {lo} is above high {hi}"),
                    );
                    return None;
                }
                _ => {
                    p.add(
                        if value.is_some() { &vpath } else { path },
                        format!(
                            "between takes two numeric bounds [low, high], found {}",
                            value
                                .map(|v| v.to_string())
                                .unwrap_or_else(|| "nothing".into())
                        ),
                    );
                    return None;
                }
            }
        }
        "in" => Op::In(list(p)?),
        "not_in" => Op::NotIn(list(p)?),
        "contains" => Op::Contains(scalar(p)?),
        "not_contains" => Op::NotContains(scalar(p)?),
        "starts_with" => match value {
            Some(Value::String(s)) => Op::StartsWith(s.clone()),
            Some(v) => {
                p.add(
                    &vpath,
                    format!("operator starts_with takes a string, found {}", kind(v)),
                );
                return None;
            }
            None => {
                p.add(path, "operator starts_with needs a value");
                return None;
            }
        },
        "exists" | "not_exists" => {
            if let Some(v) = value {
                if !v.is_null() {
                    p.add(
                        &vpath,
                        format!("operator {op_name} takes no value, found {v}"),
                    );
                    return None;
                }
            }
            if op_name == "exists" {
                Op::Exists
            } else {
                Op::NotExists
            }
        }
        other => {
            p.add(
                format!("{path}.operator"),
                format!(
                    "unknown operator {other:?}; expected one of {}",
                    OPERATORS.join(", ")
                ),
            );
            return None;
        }
    };
    Some(Condition {
        attribute: attribute?,
        op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(c: Value) -> Condition {
        let mut p = Problems::new("t.json");
        let c = compile_condition(&c, "$.c", &mut p);
        assert!(p.is_empty(), "{:?}", p.list);
        c.unwrap()
    }

    fn holds(c: Value, attrs: Value) -> bool {
        cond(c).eval(attrs.as_object().unwrap())
    }

    fn problems(c: Value) -> Vec<String> {
        let mut p = Problems::new("t.json");
        compile_condition(&c, "$.c", &mut p);
        p.list
            .iter()
            .map(|e| format!("{} {}", e.path, e.message))
            .collect()
    }

    #[test]
    fn numbers_compare_numerically() {
        let c = json!({"attribute":"n","operator":"eq","value":10});
        assert!(holds(c.clone(), json!({"n":10.0})));
        assert!(holds(c.clone(), json!({"n":10})));
        assert!(
            !holds(c.clone(), json!({"n":"10"})),
            "a string is not a number"
        );
        assert!(holds(
            json!({"attribute":"n","operator":"eq","value":10.0}),
            json!({"n":10})
        ));
        assert!(holds(
            json!({"attribute":"n","operator":"gte","value":10}),
            json!({"n":10})
        ));
        assert!(!holds(
            json!({"attribute":"n","operator":"gt","value":10}),
            json!({"n":10})
        ));
        assert!(holds(
            json!({"attribute":"n","operator":"lt","value":10}),
            json!({"n":9.5})
        ));
        assert!(holds(
            json!({"attribute":"n","operator":"lte","value":10}),
            json!({"n":10})
        ));
        assert!(!holds(
            json!({"attribute":"n","operator":"gt","value":1}),
            json!({"n":"5"})
        ));
    }

    #[test]
    fn strings_compare_exactly() {
        let c = json!({"attribute":"s","operator":"eq","value":"Gold"});
        assert!(holds(c.clone(), json!({"s":"Gold"})));
        assert!(!holds(c.clone(), json!({"s":"gold"})));
        assert!(!holds(c, json!({"s":"Gold "})));
    }

    #[test]
    fn wrong_type_is_false_even_for_negations() {
        assert!(!holds(
            json!({"attribute":"s","operator":"ne","value":"x"}),
            json!({"s":5})
        ));
        assert!(holds(
            json!({"attribute":"s","operator":"ne","value":"x"}),
            json!({"s":"y"})
        ));
        assert!(!holds(
            json!({"attribute":"s","operator":"not_in","value":["a"]}),
            json!({"s":5})
        ));
        assert!(holds(
            json!({"attribute":"s","operator":"not_in","value":["a"]}),
            json!({"s":"b"})
        ));
        assert!(!holds(
            json!({"attribute":"s","operator":"not_contains","value":"a"}),
            json!({"s":5})
        ));
        assert!(!holds(
            json!({"attribute":"s","operator":"contains","value":"a"}),
            json!({"s":5})
        ));
        assert!(!holds(
            json!({"attribute":"s","operator":"starts_with","value":"a"}),
            json!({"s":5})
        ));
        assert!(!holds(
            json!({"attribute":"s","operator":"between","value":[1,2]}),
            json!({"s":"1"})
        ));
    }

    #[test]
    fn absent_satisfies_only_not_exists() {
        let empty = json!({});
        for (op, value) in [
            ("eq", json!(1)),
            ("ne", json!(1)),
            ("gt", json!(1)),
            ("gte", json!(1)),
            ("lt", json!(1)),
            ("lte", json!(1)),
            ("between", json!([1, 2])),
            ("in", json!([1])),
            ("not_in", json!([1])),
            ("contains", json!("a")),
            ("not_contains", json!("a")),
            ("starts_with", json!("a")),
        ] {
            assert!(
                !holds(
                    json!({"attribute":"x","operator":op,"value":value}),
                    empty.clone()
                ),
                "{op} must be false for an absent attribute"
            );
        }
        assert!(!holds(
            json!({"attribute":"x","operator":"exists"}),
            empty.clone()
        ));
        assert!(holds(
            json!({"attribute":"x","operator":"not_exists"}),
            empty
        ));
        assert!(holds(
            json!({"attribute":"x","operator":"exists"}),
            json!({"x": null})
        ));
    }

    #[test]
    fn contains_on_strings_and_arrays() {
        let c = json!({"attribute":"v","operator":"contains","value":"ell"});
        assert!(holds(c.clone(), json!({"v":"hello"})));
        assert!(!holds(c, json!({"v":"help"})));
        let c = json!({"attribute":"v","operator":"contains","value":2});
        assert!(holds(c.clone(), json!({"v":[1,2.0,3]})));
        assert!(!holds(c.clone(), json!({"v":[1,3]})));
        assert!(!holds(c, json!({"v":["2"]})));
        let c = json!({"attribute":"v","operator":"not_contains","value":"x"});
        assert!(holds(c.clone(), json!({"v":["a","b"]})));
        assert!(!holds(c.clone(), json!({"v":["x"]})));
        assert!(holds(c, json!({"v":"abc"})));
    }

    #[test]
    fn between_is_inclusive_and_in_uses_numeric_equality() {
        let c = json!({"attribute":"n","operator":"between","value":[10, 20]});
        assert!(holds(c.clone(), json!({"n":10})));
        assert!(holds(c.clone(), json!({"n":20.0})));
        assert!(!holds(c.clone(), json!({"n":20.5})));
        assert!(!holds(c, json!({"n":9})));
        let c = json!({"attribute":"n","operator":"in","value":[1, "a", true]});
        assert!(holds(c.clone(), json!({"n":1.0})));
        assert!(holds(c.clone(), json!({"n":"a"})));
        assert!(holds(c.clone(), json!({"n":true})));
        assert!(!holds(c, json!({"n":"1"})));
    }

    #[test]
    fn dotted_paths_reach_nested_objects_after_exact_keys() {
        let c = json!({"attribute":"a.b","operator":"eq","value":1});
        assert!(holds(c.clone(), json!({"a":{"b":1}})));
        assert!(holds(c.clone(), json!({"a.b":1, "a":{"b":2}})));
        assert!(!holds(c, json!({"a":{"c":1}})));
    }

    #[test]
    fn match_any_and_empty_lists() {
        let mut p = Problems::new("t.json");
        let obj = json!({"match":"any","conditions":[
            {"attribute":"a","operator":"eq","value":1},
            {"attribute":"b","operator":"eq","value":1}]});
        let cs = compile_conditions(obj.as_object().unwrap(), "$", &mut p);
        assert!(cs.eval(json!({"b":1}).as_object().unwrap()));
        assert!(!cs.eval(json!({"b":2}).as_object().unwrap()));
        let none = compile_conditions(json!({"match":"any"}).as_object().unwrap(), "$", &mut p);
        assert!(none.eval(&Map::new()));
        assert!(p.is_empty());
    }

    #[test]
    fn operators_refuse_values_they_cannot_take() {
        assert_eq!(
            problems(json!({"attribute":"a","operator":"gt","value":"x"})),
            ["$.c.value operator gt takes a number, found a string"]
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"between","value":[1]})).len(),
            1
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"between","value":[3, 1]})).len(),
            1
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"between"})).len(),
            1
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"in","value":"x"})).len(),
            1
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"in","value":[]})).len(),
            1
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"in","value":[[1]]})).len(),
            1
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"starts_with","value":1})).len(),
            1
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"eq","value":{"x":1}})).len(),
            1
        );
        assert_eq!(problems(json!({"attribute":"a","operator":"eq"})).len(), 1);
        assert_eq!(
            problems(json!({"attribute":"a","operator":"exists","value":1})).len(),
            1
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"like","value":1})).len(),
            1
        );
        assert_eq!(
            problems(json!({"attribute":"a","operator":"eq","value":1,"extra":1})).len(),
            1
        );
        assert_eq!(problems(json!({"operator":"eq","value":1})).len(), 1);
    }
}
