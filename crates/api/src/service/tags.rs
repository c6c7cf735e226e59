//! Tags on images: ListTags, TagResource, UntagResource.

use super::{Service, PARTITION, REGION};
use crate::error::ApiError;
use crate::inputs::{ListTagsRequest, TagResourceRequest, UntagResourceRequest};
use serde_json::{json, Map, Value};

impl Service {
    pub(super) async fn taggable(&self, account: &str, arn: &str) -> Result<String, ApiError> {
        let prefix = format!("arn:{PARTITION}:lambda:{REGION}:{account}:microvm-image:");
        let name = arn.strip_prefix(&prefix).ok_or_else(|| ApiError::not_found("Resource", arn))?;
        self.store.image(account, name).await?.ok_or_else(|| ApiError::not_found("Resource", arn))?;
        Ok(arn.to_owned())
    }

    /// ListTags.
    pub async fn list_tags(&self, account: &str, input: &ListTagsRequest) -> Result<Value, ApiError> {
        let arn = self.taggable(account, &input.resource).await?;
        let tags: Map<String, Value> = self.store.tags(&arn).await?.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
        Ok(json!({ "Tags": tags }))
    }

    /// TagResource.
    pub async fn tag(&self, account: &str, input: &TagResourceRequest) -> Result<Value, ApiError> {
        let arn = self.taggable(account, &input.resource).await?;
        let pairs: Vec<(String, String)> = input.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        // Tags that set build timeouts must be valid ones (builds.rs).
        super::builds::timeouts(&input.tags)?;
        super::pools::check_size_tag(&input.tags)?;
        let existing = self.store.tags(&arn).await?;
        let total = existing.iter().map(|(k, _)| k).chain(pairs.iter().map(|(k, _)| k)).collect::<std::collections::BTreeSet<_>>().len();
        if total > 50 {
            return Err(ApiError::validation("a resource has at most 50 tags"));
        }
        self.store.tag(&arn, &pairs).await?;
        Ok(Value::Null)
    }

    /// UntagResource.
    pub async fn untag(&self, account: &str, input: &UntagResourceRequest) -> Result<Value, ApiError> {
        let arn = self.taggable(account, &input.resource).await?;
        self.store.untag(&arn, &input.tag_keys).await?;
        Ok(Value::Null)
    }
}
