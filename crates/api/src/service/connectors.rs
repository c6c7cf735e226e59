//! Named egress connectors, Hearth's counterpart of the service's VPC connectors: allow
//! lists of CIDRs and domains ([`ConnectorRecord`]) that a microvm names by ARN in
//! `egressNetworkConnectors` (`arn:aws-hearth:lambda:hh-local-1:<account>:egress-connector:<name>`;
//! the operator's, visible to every account, under the account `hearth`).
//!
//! A microvm's egress is the union of what it names: `INTERNET_EGRESS` (public addresses
//! over TCP) and each connector's CIDRs and domains. It is worked out whenever its network
//! is set up (launch, pooled claim, resume) from the connectors as they are then, and
//! again for running microvms when a connector changes ([`Service::refresh_connectors`]:
//! at once for changes through the API, on the next policy pass for the operator's
//! `hearth connectors` and after a restart). A microvm whose egress was set through the
//! `/egress` extension keeps that policy instead.

use super::{valid_name, Service, PARTITION, REGION};
use crate::clock::now;
use crate::error::ApiError;
use crate::lifecycle::MicrovmState;
use crate::store::{ConnectorRecord, MicrovmRecord, OPERATOR};
use hearth_vmm::net::{normalize_domain, Ceiling, Egress, Rule, MAX_DOMAINS};
use serde_json::{json, Value};
use std::collections::HashMap;

/// Most CIDR rules in one connector.
pub const MAX_CIDRS: usize = 64;

/// Most connectors one account (or the operator) may have.
pub const MAX_CONNECTORS: usize = 100;

/// The connectors' current policies, by owner and name, and the lock that keeps refreshes
/// in turn.
#[derive(Default)]
pub struct Connectors {
    cache: std::sync::RwLock<HashMap<(String, String), Egress>>,
    refresh: tokio::sync::Mutex<()>,
}

/// A connector's ARN.
pub fn connector_arn(owner: &str, name: &str) -> String {
    format!("arn:{PARTITION}:lambda:{REGION}:{owner}:egress-connector:{name}")
}

/// The owner and name in a connector ARN.
fn parse_arn(arn: &str) -> Option<(&str, &str)> {
    let rest = arn.strip_prefix(&format!("arn:{PARTITION}:lambda:{REGION}:"))?;
    let (owner, name) = rest.split_once(":egress-connector:")?;
    Some((owner, name))
}

/// True for the service's internet connector, by name or ARN.
fn is_internet(c: &str) -> bool {
    c == "INTERNET_EGRESS" || c.ends_with(":INTERNET_EGRESS") || c.ends_with("/INTERNET_EGRESS")
}

/// A connector's policy.
fn egress_of(c: &ConnectorRecord) -> Egress {
    Egress { allow: c.allow_cidrs.iter().filter_map(|r| Rule::parse(r).ok()).collect(), domains: c.allow_domains.clone(), ..Egress::none() }
}

/// Connector `name` of `owner` from a request body `{"allowCidrs": […], "allowDomains": […]}`,
/// checked and bounded; tenants' CIDRs are held to `ceiling` (the operator's own are not:
/// the namespace still cuts what reaches past the host's ceiling).
///
/// # Errors
///
/// A ValidationException naming the field, entry or limit.
pub fn connector_from(owner: &str, name: &str, body: &Value, ceiling: Option<&Ceiling>) -> Result<ConnectorRecord, ApiError> {
    if !valid_name(name) {
        return Err(ApiError::validation(format!("connector name {name:?} must be 1-64 letters, digits, '-' or '_'")));
    }
    let obj = body.as_object().ok_or_else(|| ApiError::validation("the body must be a JSON object {allowCidrs, allowDomains}"))?;
    if let Some(k) = obj.keys().find(|k| !["allowCidrs", "allowDomains"].contains(&k.as_str())) {
        return Err(ApiError::validation(format!("unknown connector field {k:?} (allowCidrs, allowDomains)")));
    }
    let list = |k: &str, max: usize| -> Result<Vec<String>, ApiError> {
        let items = match obj.get(k) {
            None => return Ok(Vec::new()),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(ApiError::validation(format!("{k} must be a list of strings"))),
        };
        if items.len() > max {
            return Err(ApiError::validation(format!(
                "{k} has {} entries, over the limit of {max}; split it into connectors",
                items.len()
            )));
        }
        items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| ApiError::validation(format!("{k} must be a list of strings"))))
            .collect()
    };
    let mut cidrs = Vec::new();
    for s in list("allowCidrs", MAX_CIDRS)? {
        if s.len() > 64 {
            return Err(ApiError::validation(format!("allowCidrs entry {:?}… is too long", &s[..32])));
        }
        cidrs.push(Rule::parse(&s).map_err(|e| ApiError::validation(e.to_string()))?.to_string());
    }
    let mut domains = Vec::new();
    for d in list("allowDomains", MAX_DOMAINS)? {
        let d = normalize_domain(&d).map_err(|e| ApiError::validation(e.to_string()))?;
        if !domains.contains(&d) {
            domains.push(d);
        }
    }
    if cidrs.is_empty() && domains.is_empty() {
        return Err(ApiError::validation("a connector needs at least one of allowCidrs, allowDomains"));
    }
    let t = now();
    let c = ConnectorRecord {
        account: owner.into(),
        name: name.into(),
        allow_cidrs: cidrs,
        allow_domains: domains,
        created_at: t,
        updated_at: t,
    };
    if let Some(ceiling) = ceiling {
        egress_of(&c).within(ceiling).map_err(|e| ApiError::validation(e.to_string()))?;
    }
    Ok(c)
}

/// A connector as the API shows it.
pub fn connector_json(c: &ConnectorRecord) -> Value {
    json!({
        "connectorArn": connector_arn(&c.account, &c.name),
        "name": c.name,
        "owner": if c.account == OPERATOR { "operator" } else { "account" },
        "allowCidrs": c.allow_cidrs,
        "allowDomains": c.allow_domains,
        "createdAt": c.created_at,
        "updatedAt": c.updated_at,
    })
}

/// The connector names a microvm's record carries.
fn named(m: &MicrovmRecord) -> Vec<&str> {
    m.spec.get("egressNetworkConnectors").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect()
}

impl Service {
    /// Creates or replaces `account`'s connector `name` (PUT), and re-polices the running
    /// microvms that name it.
    ///
    /// # Errors
    ///
    /// ValidationException for a bad body or a CIDR past the host's ceiling;
    /// ServiceQuotaExceededException-like refusal (ValidationException) past [`MAX_CONNECTORS`].
    pub async fn put_connector(&self, account: &str, name: &str, body: &Value) -> Result<Value, ApiError> {
        let ceiling = hearth_vmm::net::host_ceiling().unwrap_or_default();
        let mut c = connector_from(account, name, body, Some(&ceiling))?;
        match self.store.connector(account, name).await? {
            Some(old) => c.created_at = old.created_at,
            None if self.store.connectors(Some(account)).await?.len() >= MAX_CONNECTORS => {
                return Err(ApiError::validation(format!(
                    "the account has {MAX_CONNECTORS} egress connectors, the most it may; delete one first"
                )));
            }
            None => {}
        }
        self.store.put_connector(&c).await?;
        self.refresh_connectors().await;
        Ok(connector_json(&c))
    }

    /// `account`'s connector `name`, or the operator's of that name.
    ///
    /// # Errors
    ///
    /// ResourceNotFoundException.
    pub async fn get_connector(&self, account: &str, name: &str) -> Result<Value, ApiError> {
        for owner in [account, OPERATOR] {
            if let Some(c) = self.store.connector(owner, name).await? {
                return Ok(connector_json(&c));
            }
        }
        Err(ApiError::not_found("EgressConnector", name))
    }

    /// The connectors `account` may name: its own, then the operator's.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn list_connectors(&self, account: &str) -> Result<Value, ApiError> {
        let mut all = self.store.connectors(Some(account)).await?;
        all.extend(self.store.connectors(Some(OPERATOR)).await?);
        Ok(json!({ "connectors": all.iter().map(connector_json).collect::<Vec<_>>() }))
    }

    /// Deletes `account`'s connector `name`.
    ///
    /// # Errors
    ///
    /// ResourceNotFoundException; ConflictException while a microvm that is not TERMINATED
    /// names it.
    pub async fn delete_connector(&self, account: &str, name: &str) -> Result<(), ApiError> {
        let arn = connector_arn(account, name);
        if let Some(m) = self.store.live_microvms().await?.into_iter().find(|m| m.account == account && named(m).contains(&arn.as_str())) {
            return Err(ApiError::conflict(
                "EgressConnector",
                name,
                format!("microvm {} ({}) names {arn}; terminate it first", m.microvm_id, m.state),
            ));
        }
        if !self.store.delete_connector(account, name).await? {
            return Err(ApiError::not_found("EgressConnector", name));
        }
        self.refresh_connectors().await;
        Ok(())
    }

    /// Checks the `egressNetworkConnectors` of a RunMicrovm or an image: each is
    /// `INTERNET_EGRESS` or the ARN of a connector of `account` or the operator.
    ///
    /// # Errors
    ///
    /// ResourceNotFoundException for a connector ARN that names none the account may use;
    /// ValidationException for anything else.
    pub async fn check_connectors(&self, account: &str, connectors: Option<&Value>) -> Result<(), ApiError> {
        for c in connectors.and_then(Value::as_array).into_iter().flatten() {
            let c = c.as_str().ok_or_else(|| ApiError::validation("egressNetworkConnectors must be strings"))?;
            if is_internet(c) {
                continue;
            }
            let Some((owner, name)) = parse_arn(c) else {
                return Err(ApiError::validation(format!(
                    "egress network connector {c:?} is neither INTERNET_EGRESS nor an egress connector ARN ({}); see /hearth/v1/egress-connectors",
                    connector_arn(account, "NAME")
                )));
            };
            let visible = owner == account || owner == OPERATOR;
            if !visible || self.store.connector(owner, name).await?.is_none() {
                return Err(ApiError::not_found("EgressNetworkConnector", c));
            }
        }
        Ok(())
    }

    /// The egress of a microvm of `account` naming `connectors`, from the connectors as
    /// last loaded: a connector that is gone (or another account's) adds nothing.
    pub(super) fn connectors_egress(&self, account: &str, connectors: &[&str]) -> Egress {
        let mut e = Egress::none();
        let cache = self.connectors.cache.read().unwrap_or_else(|p| p.into_inner());
        for c in connectors {
            if is_internet(c) {
                e.internet = true;
                continue;
            }
            let Some((owner, name)) = parse_arn(c).filter(|(o, _)| *o == account || *o == OPERATOR) else { continue };
            if let Some(x) = cache.get(&(owner.to_owned(), name.to_owned())) {
                e.allow.extend(x.allow.iter().filter(|r| !e.allow.contains(r)).cloned().collect::<Vec<_>>());
                e.domains.extend(x.domains.iter().filter(|d| !e.domains.contains(d)).cloned().collect::<Vec<_>>());
            }
        }
        // Several connectors together stay within the per-policy bound.
        e.domains.truncate(MAX_DOMAINS);
        e
    }

    /// Loads the connectors from the store and re-polices every running microvm whose
    /// egress they change (skipping, until the next pass, one whose lock is held). The
    /// daemon calls it on start, on each policy pass and after each API change.
    pub async fn refresh_connectors(&self) {
        let _in_turn = self.connectors.refresh.lock().await;
        let all = match self.store.connectors(None).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "could not load the egress connectors");
                return;
            }
        };
        *self.connectors.cache.write().unwrap_or_else(|p| p.into_inner()) =
            all.iter().map(|c| ((c.account.clone(), c.name.clone()), egress_of(c))).collect();
        let Ok(live) = self.store.live_microvms().await else { return };
        for m in live {
            let names = named(&m);
            if m.state != MicrovmState::Running || m.spec.get("hearthEgress").is_some() || !names.iter().any(|n| parse_arn(n).is_some()) {
                continue;
            }
            let want = self.connectors_egress(&m.account, &names);
            let slot = self.slot(&m.microvm_id);
            let Ok(guard) = slot.try_lock() else { continue };
            let Some(vm) = guard.vm.as_ref() else { continue };
            if vm.egress().is_some_and(|have| have != want) {
                match vm.set_egress(&want) {
                    Ok(()) => tracing::info!(microvm = %m.microvm_id, "egress connectors changed: policy replaced"),
                    Err(e) => tracing::warn!(microvm = %m.microvm_id, error = %e, "egress connectors changed, policy not replaced"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_validated_and_bounded() {
        let ok = connector_from(
            "123456789012",
            "web",
            &json!({ "allowCidrs": ["93.184.0.0/16:443/tcp"], "allowDomains": ["Example.com."] }),
            None,
        )
        .unwrap();
        assert_eq!((ok.allow_cidrs[0].as_str(), ok.allow_domains[0].as_str()), ("93.184.0.0/16:443/tcp", "example.com"));
        let refused = |body: Value| connector_from("123456789012", "web", &body, Some(&Ceiling::default())).unwrap_err().message;
        assert!(refused(json!({})).contains("at least one"));
        assert!(refused(json!({ "allowCidrs": ["10.0.0.0/8"] })).contains("--egress-allow-private"), "CIDR past the ceiling");
        assert!(refused(json!({ "allowDomains": ["*"] })).contains("egress domain"));
        assert!(refused(json!({ "allowCidrs": vec!["1.2.3.4"; MAX_CIDRS + 1] })).contains("limit"));
        assert!(refused(json!({ "allowDomains": "example.com" })).contains("list of strings"));
        assert!(refused(json!({ "deny": [] })).contains("unknown connector field"));
        assert!(connector_from("123456789012", "../x", &json!({ "allowDomains": ["a.com"] }), None).is_err());
    }

    #[test]
    fn arns_name_owner_and_connector() {
        let arn = connector_arn("123456789012", "web");
        assert_eq!(arn, "arn:aws-hearth:lambda:hh-local-1:123456789012:egress-connector:web");
        assert_eq!(parse_arn(&arn), Some(("123456789012", "web")));
        assert_eq!(parse_arn(&connector_arn(OPERATOR, "pypi")), Some((OPERATOR, "pypi")));
        assert!(parse_arn("arn:aws-hearth:lambda:hh-local-1:123456789012:microvm-image:web").is_none());
        assert!(is_internet("INTERNET_EGRESS") && !is_internet(&arn));
    }
}
