//! IAM roles and their inline policies, and STS sessions (temporary credentials).

use super::Service;
use crate::error::ApiError;

impl Service {
    /// Whether role `role_arn` of `account` allows `action` on `resource`: some statement of
    /// its policies allows it and none denies it.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn role_allows(&self, _account: &str, _role_arn: &str, _action: &str, _resource: &str) -> Result<bool, ApiError> {
        Ok(false)
    }
}
