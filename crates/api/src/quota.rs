//! Per-account quotas: what one tenant may hold at once. Each has the service's documented
//! default where it has one (1,000 concurrent microvms, 1,000 images, code artifacts up
//! to 32 GB) and Hearth's own elsewhere; the operator overrides any of them per account
//! with `hearth accounts set ACCOUNT --quota NAME=VALUE`. Over a quota a call is refused
//! with the model's ServiceQuotaExceededException before anything is created.
//!
//! Quotas bound a tenant; the host's own limits (memory, disk, CPU) are
//! [`crate::capacity`]'s, and bind all tenants together.

use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quota {
    /// Microvms not TERMINATED (running and suspended alike).
    Microvms,
    /// vCPUs of the microvms that hold a VM (every state but SUSPENDED and TERMINATED).
    Vcpus,
    /// Memory (MiB) of the microvms that hold a VM.
    MemoryMib,
    /// Image builds not ended (queued or running).
    Builds,
    /// Images.
    Images,
    /// Image versions, all images together.
    ImageVersions,
    /// Snapshot disk (GiB): image versions' snapshots and suspended microvms' state.
    SnapshotGib,
    /// The size of one code artifact (bytes), uploaded or downloaded.
    ArtifactBytes,
}

impl Quota {
    /// Every quota, in the order they are shown.
    pub const ALL: [Quota; 8] = [
        Quota::Microvms,
        Quota::Vcpus,
        Quota::MemoryMib,
        Quota::Builds,
        Quota::Images,
        Quota::ImageVersions,
        Quota::SnapshotGib,
        Quota::ArtifactBytes,
    ];

    /// Its name (the CLI's and the `quotaCode` of its errors).
    pub fn name(self) -> &'static str {
        match self {
            Quota::Microvms => "microvms",
            Quota::Vcpus => "vcpus",
            Quota::MemoryMib => "memory-mib",
            Quota::Builds => "builds",
            Quota::Images => "images",
            Quota::ImageVersions => "image-versions",
            Quota::SnapshotGib => "snapshot-gib",
            Quota::ArtifactBytes => "artifact-bytes",
        }
    }

    /// What it counts, for messages and `hearth accounts show`.
    pub fn describe(self) -> &'static str {
        match self {
            Quota::Microvms => "microvms not terminated (running and suspended)",
            Quota::Vcpus => "vCPUs of microvms not suspended",
            Quota::MemoryMib => "memory (MiB) of microvms not suspended",
            Quota::Builds => "image builds queued or running",
            Quota::Images => "images",
            Quota::ImageVersions => "image versions",
            Quota::SnapshotGib => "snapshot disk (GiB) of image versions and suspended microvms",
            Quota::ArtifactBytes => "bytes in one code artifact",
        }
    }

    /// The default: the service's documented one (microvms, images, artifacts), else
    /// Hearth's, sized so that on a small host the host's capacity binds first.
    pub fn default_limit(self) -> u64 {
        match self {
            Quota::Microvms => 1_000,
            Quota::Vcpus => 2_000,
            Quota::MemoryMib => 4 * 1024 * 1024,
            Quota::Builds => 5,
            Quota::Images => 1_000,
            Quota::ImageVersions => 10_000,
            Quota::SnapshotGib => 2_048,
            Quota::ArtifactBytes => 32 * (1 << 30),
        }
    }

    /// The quota named `s`.
    pub fn parse(s: &str) -> Option<Quota> {
        Self::ALL.into_iter().find(|q| q.name() == s)
    }
}

/// The operator's overrides of one account's quotas (absent: the default).
pub type Overrides = BTreeMap<Quota, u64>;

/// The quota `q` of an account with `overrides`.
pub fn limit(overrides: &Overrides, q: Quota) -> u64 {
    overrides.get(&q).copied().unwrap_or_else(|| q.default_limit())
}

/// Parses the CLI's `NAME=VALUE` (VALUE a count, or `default` to drop the override).
///
/// # Errors
///
/// A message naming the quotas there are.
pub fn parse_setting(s: &str) -> Result<(Quota, Option<u64>), String> {
    let names = || Quota::ALL.map(Quota::name).join(", ");
    let (name, value) = s.split_once('=').ok_or_else(|| format!("{s:?}: give NAME=VALUE, NAME one of {}", names()))?;
    let q = Quota::parse(name.trim()).ok_or_else(|| format!("{name:?} is not a quota; the quotas are {}", names()))?;
    match value.trim() {
        "default" => Ok((q, None)),
        v => v
            .replace('_', "")
            .parse::<u64>()
            .map(|n| (q, Some(n)))
            .map_err(|_| format!("{name}={v}: the value must be a whole number or `default`")),
    }
}

/// What an account holds now, per quota.
pub type Held = BTreeMap<Quota, u64>;

/// Refuses `adding` more of `q` when the account, holding `held`, would pass its quota.
///
/// # Errors
///
/// ServiceQuotaExceededException saying what is held, what the quota is and what to do.
pub fn admit(account: &str, overrides: &Overrides, held: &Held, q: Quota, adding: u64) -> Result<(), ApiError> {
    let limit = limit(overrides, q);
    let used = held.get(&q).copied().unwrap_or(0);
    if used.saturating_add(adding) <= limit {
        return Ok(());
    }
    let free = match q {
        Quota::Microvms => "terminate microvms you no longer need",
        Quota::Vcpus | Quota::MemoryMib => "suspend or terminate running microvms",
        Quota::Builds => "wait for a build to end",
        Quota::Images => "delete images you no longer need",
        Quota::ImageVersions => "delete image versions you no longer need",
        Quota::SnapshotGib => "terminate suspended microvms or delete image versions",
        Quota::ArtifactBytes => "make the artifact smaller",
    };
    if q == Quota::ArtifactBytes {
        return Err(ApiError::quota(
            q.name(),
            format!(
                "the code artifact is over account {account}'s quota of {limit} bytes ({}: at least {adding}); {free}, \
                 or ask the operator to raise it (hearth accounts set {account} --quota {}=N)",
                q.name(),
                q.name()
            ),
        ));
    }
    Err(ApiError::quota(
        q.name(),
        format!(
            "quota {} of account {account} exceeded: {} {used} held, {adding} more asked, quota {limit}; {free}, \
             or ask the operator to raise it (hearth accounts set {account} --quota {}=N)",
            q.name(),
            q.describe(),
            q.name()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_services_and_overrides_win() {
        let mut o = Overrides::new();
        assert_eq!(limit(&o, Quota::Microvms), 1_000);
        assert_eq!(limit(&o, Quota::Images), 1_000);
        assert_eq!(limit(&o, Quota::ArtifactBytes), 32 << 30);
        o.insert(Quota::Microvms, 2);
        assert_eq!(limit(&o, Quota::Microvms), 2);
    }

    #[test]
    fn admission_counts_what_is_held_plus_what_is_asked() {
        let o = Overrides::from([(Quota::MemoryMib, 1024)]);
        let held = Held::from([(Quota::MemoryMib, 512)]);
        assert!(admit("123456789012", &o, &held, Quota::MemoryMib, 512).is_ok());
        let e = admit("123456789012", &o, &held, Quota::MemoryMib, 513).unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Quota);
        assert_eq!(e.status(), 402);
        assert_eq!(e.quota_code, Some("memory-mib"));
        assert!(e.message.contains("512 held, 513 more asked, quota 1024"), "{}", e.message);
        assert!(e.message.contains("--quota memory-mib=N"), "{}", e.message);
        // A quota of 0 refuses everything; nothing held and nothing asked passes.
        let zero = Overrides::from([(Quota::Builds, 0)]);
        assert!(admit("123456789012", &zero, &Held::new(), Quota::Builds, 1).is_err());
        assert!(admit("123456789012", &zero, &Held::new(), Quota::Builds, 0).is_ok());
    }

    #[test]
    fn settings_parse_with_clear_refusals() {
        assert_eq!(parse_setting("microvms=10").unwrap(), (Quota::Microvms, Some(10)));
        assert_eq!(parse_setting("memory-mib=1_024").unwrap(), (Quota::MemoryMib, Some(1024)));
        assert_eq!(parse_setting("images=default").unwrap(), (Quota::Images, None));
        assert!(parse_setting("microvms").unwrap_err().contains("NAME=VALUE"));
        assert!(parse_setting("cpus=3").unwrap_err().contains("the quotas are microvms, vcpus"));
        assert!(parse_setting("vcpus=-1").unwrap_err().contains("whole number"));
        for q in Quota::ALL {
            assert_eq!(Quota::parse(q.name()), Some(q));
        }
    }

    #[test]
    fn overrides_round_trip_as_json_with_names() {
        let o = Overrides::from([(Quota::SnapshotGib, 5), (Quota::Microvms, 3)]);
        let s = serde_json::to_string(&o).unwrap();
        assert_eq!(s, r#"{"microvms":3,"snapshot-gib":5}"#);
        assert_eq!(serde_json::from_str::<Overrides>(&s).unwrap(), o);
    }
}
