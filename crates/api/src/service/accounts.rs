//! What the HTTP side asks of the store, through the service: tenants' access keys (for
//! SigV4), `clientToken` claims (idempotency), and microvm counts (metrics).

use super::Service;
use crate::error::ApiError;
use crate::store::AccessKey;

impl Service {
    /// The access key a request's signature names, with its secret opened; `None` when the
    /// request names none, or one that is unknown or unusable (the store failing included:
    /// the request is then refused).
    /// Role sessions' temporary credentials (`HSIA…`) included: their token is checked
    /// after the signature ([`Service::caller_of`]).
    pub async fn claimed_key(&self, headers: &http::HeaderMap) -> Option<AccessKey> {
        let id = crate::sigv4::claimed_access_key(headers)?;
        if id.starts_with(super::SESSION_PREFIX) {
            return self.session_key(id).await;
        }
        self.store.key(id).await.ok().flatten()
    }

    /// A tenant's own access key `id` (never a role session's), with its secret opened;
    /// `None` when there is none (or the store fails). For the MCP route
    /// ([`crate::mcp_route`]), whose hubs sign with the key a token was minted with.
    pub async fn access_key(&self, id: &str) -> Option<AccessKey> {
        if id.starts_with(super::SESSION_PREFIX) {
            return None;
        }
        self.store.key(id).await.ok().flatten()
    }

    /// The caller of a request whose body is streamed after its headers are checked (an
    /// upload, a streamed file write): its SigV4 signature over the body hash it claims, its
    /// account (a role session's authorized for the call, [`crate::auth::extension_action`]),
    /// and one call from that account's request bucket. Returns the account and
    /// the claimed body hash, which the caller checks once the body has arrived.
    ///
    /// # Errors
    ///
    /// The signature's refusals, an unknown key, ThrottlingException.
    pub async fn streamed_caller(&self, parts: &http::request::Parts) -> Result<(String, String), ApiError> {
        let key = self.claimed_key(&parts.headers).await;
        let signed = crate::sigv4::verify_streamed(&parts.method, &parts.uri, &parts.headers, crate::clock::system(), |k| {
            key.as_ref().filter(|x| x.access_key == k).map(|x| x.secret.clone())
        })?;
        if signed.service != crate::sigv4::SERVICE {
            return Err(ApiError::new(crate::error::Kind::InvalidSignature, "uploads and file writes sign as \"lambda\""));
        }
        let key = key
            .filter(|k| k.access_key == signed.access_key)
            .ok_or_else(|| ApiError::new(crate::error::Kind::UnrecognizedClient, "unknown access key"))?;
        let caller = self.caller_of(&parts.headers, &key).await.map_err(super::SessionRefusal::into_api)?;
        self.throttle(&caller.account).await?;
        // A role session may only do what its role allows.
        let (action, resource) = crate::auth::extension_action(&parts.method, parts.uri.path(), &caller.account);
        crate::auth::authorize(self, &caller, &action, &resource).await?;
        Ok((caller.account, signed.payload_hash))
    }

    /// On the first start (no key at all): a new tenant and its access key, to be shown
    /// once.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn first_key(&self) -> Result<Option<AccessKey>, ApiError> {
        if self.store.has_keys().await? {
            return Ok(None);
        }
        let k = crate::keys::new_key(&crate::keys::new_account());
        self.store.add_key(&k).await?;
        Ok(Some(k))
    }

    /// Claims `token` of operation `op` for a call with parameters `hash`: `None` when this
    /// call now owns it, else the earlier call's hash and response (empty while it runs).
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn claim(&self, account: &str, op: &str, token: &str, hash: &str) -> Result<Option<(String, String)>, ApiError> {
        Ok(self.store.claim(account, op, token, hash).await?)
    }

    /// Releases a claim whose call failed (a retry runs it again).
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn unclaim(&self, account: &str, op: &str, token: &str) -> Result<(), ApiError> {
        Ok(self.store.unclaim(account, op, token).await?)
    }

    /// Records the response of the call that holds `token`, for its retries.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn remember(&self, account: &str, op: &str, token: &str, hash: &str, response: &str) -> Result<(), ApiError> {
        Ok(self.store.remember(account, op, token, hash, response).await?)
    }

    /// Microvms by state, all tenants (none when the store cannot say).
    pub async fn microvm_counts(&self) -> Vec<(String, i64)> {
        self.store.count_by_state().await.unwrap_or_default()
    }
}
