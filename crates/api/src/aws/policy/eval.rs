//! Evaluation as AWS documents it for one account's identity policies: a statement applies
//! when its action, resource (or principal) and conditions match; an applicable Deny wins
//! over everything, an applicable Allow grants, and nothing applicable is the implicit deny.

use super::{Context, Effect, Kind, Patterns, Policy, Principal, Statement};

/// The outcome of evaluating policies for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Some statement allows it and none denies it.
    Allow,
    /// A statement denies it.
    ExplicitDeny,
    /// No statement allows it.
    ImplicitDeny,
}

/// `pattern` (with `*`: any run of characters, `?`: any one) against `s`, the whole of it;
/// `ignore_case` for actions. Iterative with one backtrack point: linear-ish, no recursion.
pub fn wildcard_match(pattern: &str, s: &str, ignore_case: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = s.chars().collect();
    let eq = |a: char, b: char| if ignore_case { a.eq_ignore_ascii_case(&b) } else { a == b };
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && eq(p[pi], t[ti]))) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn matches(list: &Patterns, value: &str, ignore_case: bool) -> bool {
    let any = list.items.iter().any(|p| wildcard_match(p, value, ignore_case));
    any != list.negated
}

/// The principals a caller is, for a trust policy: its ARNs (`arn:aws:iam::<a>:root` for
/// the root; the role's and the assumed-role ARN for a role session), from `ctx`'s
/// `aws:PrincipalArn` and the role in `hearth:role` (set by the caller of [`Policy::evaluate`]).
fn principal_matches(p: &Principal, ctx: &Context) -> bool {
    match p {
        Principal::Any => true,
        Principal::Service(_) => false,
        Principal::Aws(arns) => {
            let caller: Vec<&str> = ["aws:PrincipalArn", "hearth:RoleArn"].iter().filter_map(|k| ctx.get(k)).collect();
            let account = ctx.get("aws:PrincipalAccount").unwrap_or_default();
            arns.iter().any(|a| {
                // The account's root names every principal of the account (whose own
                // identity policy must then allow the call too: the caller checks that).
                caller.contains(&a.as_str()) || *a == format!("arn:aws:iam::{account}:root")
            })
        }
    }
}

fn applies(s: &Statement, kind: Kind, action: &str, resource: &str, ctx: &Context) -> bool {
    matches(&s.actions, action, true)
        && match kind {
            Kind::Permissions => s.resources.as_ref().is_some_and(|r| matches(r, resource, false)),
            Kind::Trust => s.principals.iter().any(|p| principal_matches(p, ctx)),
        }
        && s.conditions.iter().all(|c| c.holds(ctx))
}

impl Policy {
    /// This policy's decision on `action` (`service:Operation`) on `resource` in `ctx`.
    pub fn evaluate(&self, action: &str, resource: &str, ctx: &Context) -> Decision {
        let mut allowed = false;
        for s in &self.statements {
            if applies(s, self.kind, action, resource, ctx) {
                match s.effect {
                    Effect::Deny => return Decision::ExplicitDeny,
                    Effect::Allow => allowed = true,
                }
            }
        }
        if allowed {
            Decision::Allow
        } else {
            Decision::ImplicitDeny
        }
    }
}

/// The decision of several policies together (a role's inline policies): any explicit
/// Deny wins, else any Allow.
pub fn evaluate_all<'a>(policies: impl IntoIterator<Item = &'a Policy>, action: &str, resource: &str, ctx: &Context) -> Decision {
    let mut allowed = false;
    for p in policies {
        match p.evaluate(action, resource, ctx) {
            Decision::ExplicitDeny => return Decision::ExplicitDeny,
            Decision::Allow => allowed = true,
            Decision::ImplicitDeny => {}
        }
    }
    if allowed {
        Decision::Allow
    } else {
        Decision::ImplicitDeny
    }
}
