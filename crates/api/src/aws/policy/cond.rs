//! The Condition element: the operators and keys Hearth evaluates, each exactly as AWS
//! documents it; any other is refused when the policy is written.
//!
//! Within a Condition every operator must hold, within an operator every key, and a key
//! holds when any of its values matches (for the negated operators, when none does). A key
//! absent from the request: the positive operators do not hold (`…IfExists` ones do), the
//! negated ones do, `Null: true` does.

use super::{bad, eval::wildcard_match, Malformed, MAX_ELEMENT, MAX_LIST};
use serde_json::Value;
use std::collections::BTreeMap;

/// The operators Hearth evaluates; each also in its `…IfExists` form (but `Null`).
pub const SUPPORTED_OPERATORS: [&str; 12] = [
    "StringEquals",
    "StringNotEquals",
    "StringEqualsIgnoreCase",
    "StringNotEqualsIgnoreCase",
    "StringLike",
    "StringNotLike",
    "ArnEquals",
    "ArnLike",
    "ArnNotEquals",
    "ArnNotLike",
    "Bool",
    "Null",
];

/// The condition keys Hearth sets in a request's context (compared without regard to case).
pub const SUPPORTED_KEYS: [&str; 8] = [
    "aws:PrincipalArn",
    "aws:PrincipalAccount",
    "aws:PrincipalType",
    "aws:RequestedRegion",
    "aws:userid",
    "hearth:SourceMicrovm",
    "secretsmanager:SecretId",
    "kms:CallerAccount",
];

/// An operator, without its `IfExists`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    StringEquals,
    StringEqualsIgnoreCase,
    StringLike,
    ArnLike,
    Bool,
    Null,
}

/// One operator on one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    op: Op,
    negated: bool,
    if_exists: bool,
    /// The key, lowercase.
    key: String,
    values: Vec<String>,
}

/// The request's condition keys (names lowercase).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context(BTreeMap<String, String>);

impl Context {
    /// Sets key `k` (any case).
    pub fn set(&mut self, k: &str, v: impl Into<String>) -> &mut Self {
        self.0.insert(k.to_ascii_lowercase(), v.into());
        self
    }

    /// Key `k` (any case).
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(&k.to_ascii_lowercase()).map(String::as_str)
    }
}

fn operator(name: &str) -> Option<(Op, bool, bool)> {
    let (base, if_exists) = match name.strip_suffix("IfExists") {
        Some(b) if b != "Null" => (b, true),
        _ => (name, false),
    };
    let (op, negated) = match base {
        "StringEquals" => (Op::StringEquals, false),
        "StringNotEquals" => (Op::StringEquals, true),
        "StringEqualsIgnoreCase" => (Op::StringEqualsIgnoreCase, false),
        "StringNotEqualsIgnoreCase" => (Op::StringEqualsIgnoreCase, true),
        "StringLike" => (Op::StringLike, false),
        "StringNotLike" => (Op::StringLike, true),
        // AWS evaluates ArnEquals as ArnLike: both match `*` and `?` in each part.
        "ArnEquals" | "ArnLike" => (Op::ArnLike, false),
        "ArnNotEquals" | "ArnNotLike" => (Op::ArnLike, true),
        "Bool" => (Op::Bool, false),
        "Null" => (Op::Null, false),
        _ => return None,
    };
    Some((op, negated, if_exists))
}

/// Parses a Condition element.
pub(super) fn parse(v: &Value) -> Result<Vec<Condition>, Malformed> {
    let Value::Object(ops) = v else {
        return bad("Condition must be an object of operators");
    };
    let mut out = Vec::new();
    for (name, keys) in ops {
        let Some((op, negated, if_exists)) = operator(name) else {
            return bad(format!(
                "condition operator {name:?} is not supported (supported: {}, each also …IfExists but Null; no ForAnyValue:/ForAllValues:)",
                SUPPORTED_OPERATORS.join(", ")
            ));
        };
        let Value::Object(keys) = keys else {
            return bad(format!("Condition {name} must be an object of keys"));
        };
        if keys.is_empty() {
            return bad(format!("Condition {name} names no key"));
        }
        for (key, vals) in keys {
            if !SUPPORTED_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                return bad(format!("condition key {key:?} is not supported (supported: {})", SUPPORTED_KEYS.join(", ")));
            }
            let list: Vec<&Value> = match vals {
                Value::Array(a) => a.iter().collect(),
                one => vec![one],
            };
            if list.is_empty() || list.len() > MAX_LIST {
                return bad(format!("Condition {name} {key}: 1 to {MAX_LIST} values"));
            }
            let mut values = Vec::with_capacity(list.len());
            for x in list {
                let s = match x {
                    Value::String(s) => s.clone(),
                    Value::Bool(b) => b.to_string(),
                    Value::Number(n) => n.to_string(),
                    other => return bad(format!("Condition {name} {key}: values are strings, not {other}")),
                };
                if s.len() > MAX_ELEMENT || s.contains("${") {
                    return bad(format!("Condition {name} {key}: a value over {MAX_ELEMENT} characters or with a policy variable"));
                }
                if matches!(op, Op::Bool | Op::Null) && !s.eq_ignore_ascii_case("true") && !s.eq_ignore_ascii_case("false") {
                    return bad(format!("Condition {name} {key}: values are true or false, not {s:?}"));
                }
                values.push(s);
            }
            out.push(Condition { op, negated, if_exists, key: key.to_ascii_lowercase(), values });
        }
    }
    Ok(out)
}

impl Condition {
    /// Whether the condition holds for `ctx`.
    pub fn holds(&self, ctx: &Context) -> bool {
        let Some(actual) = ctx.get(&self.key) else {
            return match self.op {
                Op::Null => self.values.iter().any(|v| v.eq_ignore_ascii_case("true")),
                _ => self.negated || self.if_exists,
            };
        };
        let matches = |want: &str| match self.op {
            Op::StringEquals => actual == want,
            Op::StringEqualsIgnoreCase => actual.eq_ignore_ascii_case(want),
            Op::StringLike | Op::ArnLike => wildcard_match(want, actual, false),
            Op::Bool => actual.eq_ignore_ascii_case(want),
            Op::Null => want.eq_ignore_ascii_case("false"),
        };
        let any = self.values.iter().any(|v| matches(v));
        if self.negated {
            !any
        } else {
            any
        }
    }
}
