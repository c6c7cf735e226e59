//! Tokens for a microvm's endpoint (CreateMicrovmAuthToken) and shell
//! (CreateMicrovmShellAuthToken), and the cap on concurrent ingress connections.

use super::Service;
use crate::clock::now;
use crate::error::ApiError;
use crate::inputs::{CreateMicrovmAuthTokenRequest, CreateMicrovmShellAuthTokenRequest};
use crate::store::MicrovmRecord;
use serde_json::{json, Value};
use std::sync::Arc;

/// Most concurrent ingress connections to one microvm (below the agent's 256 HTTP/2
/// streams, so execs, files and hooks always have streams left).
pub const MAX_INGRESS_CONNECTIONS: usize = 192;

/// The ingress connector that enables shells (CreateMicrovmShellAuthToken).
pub const SHELL_INGRESS: &str = "SHELL_INGRESS";

impl Service {
    /// A permit for one ingress connection to microvm `id` (at most
    /// [`MAX_INGRESS_CONNECTIONS`] at once).
    pub fn ingress_permit(&self, id: &str) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::TryAcquireError> {
        let sem = self
            .ingress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_INGRESS_CONNECTIONS)))
            .clone();
        sem.try_acquire_owned()
    }

    /// CreateMicrovmAuthToken: a token for the microvm's endpoint.
    pub async fn auth_token(&self, account: &str, input: &CreateMicrovmAuthTokenRequest) -> Result<Value, ApiError> {
        let ports = crate::ingress::port_ranges(&input.allowed_ports)?;
        let m = self.load(account, &input.microvm_identifier).await?;
        self.issue_token(account, &m, input.expiration_in_minutes, ports, None)
    }

    /// CreateMicrovmShellAuthToken: a token for the microvm's shell (`/shell/<id>`), only
    /// for microvms run with the `SHELL_INGRESS` connector, as the service requires.
    pub async fn shell_token(&self, account: &str, input: &CreateMicrovmShellAuthTokenRequest) -> Result<Value, ApiError> {
        let m = self.load(account, &input.microvm_identifier).await?;
        let connectors = m.spec.get("ingressNetworkConnectors").and_then(Value::as_array);
        if !connectors.into_iter().flatten().filter_map(Value::as_str).any(|c| c.contains(SHELL_INGRESS)) {
            return Err(ApiError::validation(format!(
                "microvm {} was not run with the {SHELL_INGRESS} ingress network connector; run it with ingressNetworkConnectors=[\"{SHELL_INGRESS}\"] for shells",
                m.microvm_id
            )));
        }
        // Port 0 only: should a daemon that predates token scopes ever read this token, it
        // opens no port of the endpoint.
        self.issue_token(account, &m, input.expiration_in_minutes, vec![(0, 0)], Some(crate::ingress::SHELL_SCOPE.to_owned()))
    }

    pub(super) fn issue_token(
        &self,
        account: &str,
        m: &MicrovmRecord,
        expiration_in_minutes: i64,
        ports: Vec<(u16, u16)>,
        scope: Option<String>,
    ) -> Result<Value, ApiError> {
        if m.state.is_ending() {
            return Err(ApiError::conflict("Microvm", &m.microvm_id, format!("microvm {} is {}", m.microvm_id, m.state)));
        }
        let minutes = u64::try_from(expiration_in_minutes).unwrap_or(60);
        if minutes > crate::ingress::MAX_TOKEN_MINUTES {
            return Err(ApiError::validation(format!("expirationInMinutes is at most {}", crate::ingress::MAX_TOKEN_MINUTES)));
        }
        let claims =
            crate::ingress::Claims { a: account.to_owned(), m: m.microvm_id.clone(), e: now() as u64 + minutes * 60, p: ports, k: scope };
        Ok(json!({ "authToken": { "X-aws-proxy-auth": self.token_key.issue(&claims) } }))
    }

    /// A link a browser can open (`POST /hearth/v1/microvms/{id}/link`): the endpoint's URL
    /// with a short-lived link token that the endpoint exchanges for an
    /// HttpOnly cookie of that microvm's own host ([`crate::links`]), opening `port` for
    /// `minutes`.
    ///
    /// # Errors
    ///
    /// NotFound for an unknown microvm, Conflict for an ending one, Validation for a port or
    /// duration out of range.
    pub async fn link(&self, account: &str, ident: &str, port: u16, minutes: u64) -> Result<Value, ApiError> {
        if port == 0 {
            return Err(ApiError::validation("port must be 1-65535"));
        }
        if !(1..=crate::ingress::MAX_TOKEN_MINUTES).contains(&minutes) {
            return Err(ApiError::validation(format!("expirationInMinutes must be 1-{}", crate::ingress::MAX_TOKEN_MINUTES)));
        }
        let m = self.load(account, ident).await?;
        if m.state.is_ending() {
            return Err(ApiError::conflict("Microvm", &m.microvm_id, format!("microvm {} is {}", m.microvm_id, m.state)));
        }
        let t = now() as u64;
        let link_life = crate::links::LINK_SECONDS.min(minutes * 60);
        // The link token's scope carries the cookie's lifetime: the cookie issued for it
        // lasts `minutes` from the exchange.
        let claims = crate::ingress::Claims {
            a: account.to_owned(),
            m: m.microvm_id.clone(),
            e: t + link_life,
            p: vec![(port, port)],
            k: Some(format!("{}{minutes}", crate::links::LINK_SCOPE_PREFIX)),
        };
        let token = self.token_key.issue(&claims);
        // Endpoints are HTTPS as on the service (`"https://" + endpoint`): Hearth's TLS
        // listener, or a TLS-terminating proxy in front of the plain one.
        Ok(json!({
            "url": format!("https://{}/?{}={token}", self.endpoints.host_of(&m.microvm_id), crate::links::LINK_PARAM),
            "port": port,
            "linkExpiresAt": t + link_life,
            "cookieMinutes": minutes,
        }))
    }
}
