//! The lifecycles of microvms, images and image versions: each a state enum with the
//! service model's names (as stored and as sent) and one table, [`Lifecycle::valid_transition`],
//! that says which state may follow which (as Cloud Hypervisor's `VmState::valid_transition`).
//! Every change of state is checked against it ([`Lifecycle::check`]); an illegal one is an
//! [`InvalidTransition`], which clients get as a 409 ConflictException. No I/O here: the
//! service's `transition` checks, then writes the record and the usage meter together.
//!
//! Microvms:
//! ```text
//!   PENDING ──▶ RUNNING ──▶ SUSPENDING ──▶ SUSPENDED
//!                 ▲ ▲           │              │
//!                 │ └───────────┘ suspend      │
//!                 │               failed       │
//!                 └────────────────────────────┘ resume
//!   PENDING, RUNNING, SUSPENDING, SUSPENDED ──▶ TERMINATING ──▶ TERMINATED
//!   any state but TERMINATED ──▶ TERMINATED   (a failed launch, a VM that died, reconcile)
//! ```
//! Image versions (a version's build is its state, seen through [`BuildState`]):
//! ```text
//!   PENDING ──▶ IN_PROGRESS ──▶ SUCCESSFUL | FAILED ──▶ DELETED
//!   PENDING ──▶ FAILED   (a build cut off by a restart)
//! ```
//! Images: `CREATING ──▶ CREATED | CREATE_FAILED`; a new version (UpdateMicrovmImage) makes
//! any image `UPDATING` (builds may overlap, as they always could), then `UPDATED | UPDATE_FAILED`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A lifecycle: a state enum and its transition table.
pub trait Lifecycle: Copy + Eq + fmt::Debug + 'static {
    /// The model's resource type, named in errors (`Microvm`).
    const RESOURCE: &'static str;
    /// Every state, in the model's order.
    const ALL: &'static [Self];

    /// The model's name of the state (`RUNNING`).
    fn as_str(self) -> &'static str;

    /// True when `to` may follow `self`: the one table of this lifecycle.
    fn valid_transition(self, to: Self) -> bool;

    /// What the caller may do instead, for an error about the move from `self` to `to`.
    fn hint(self, to: Self) -> Option<&'static str> {
        let _ = to;
        None
    }

    /// Checks the move of resource `id` from `self` to `to` against the table.
    ///
    /// # Errors
    ///
    /// [`InvalidTransition`] when the table does not allow it.
    fn check(self, id: &str, to: Self) -> Result<(), InvalidTransition<Self>> {
        if self.valid_transition(to) {
            Ok(())
        } else {
            Err(InvalidTransition { id: id.to_owned(), from: self, to })
        }
    }
}

/// A move the lifecycle's table does not allow (a 409 ConflictException to clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTransition<S: Lifecycle> {
    /// The resource (a microvm id, an image name, a version).
    pub id: String,
    /// Its state.
    pub from: S,
    /// The state asked for.
    pub to: S,
}

impl<S: Lifecycle> fmt::Display for InvalidTransition<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} is {}; it cannot become {}", S::RESOURCE, self.id, self.from.as_str(), self.to.as_str())?;
        match self.from.hint(self.to) {
            Some(h) => write!(f, " ({h})"),
            None => Ok(()),
        }
    }
}

impl<S: Lifecycle> std::error::Error for InvalidTransition<S> {}

macro_rules! states {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $wire:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $wire)] $variant,)+
        }

        impl $name {
            /// Every state, in the model's order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The model's name of the state.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(UnknownState(s.to_owned())),
                }
            }
        }
    };
}

/// A state name no lifecycle of the model has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a state of the model")]
pub struct UnknownState(pub String);

states! {
    /// The model's `MicrovmState`.
    MicrovmState {
        /// Being launched.
        Pending = "PENDING",
        /// Its VM runs.
        Running = "RUNNING",
        /// Its VM is being written to disk.
        Suspending = "SUSPENDING",
        /// On disk, no process.
        Suspended = "SUSPENDED",
        /// Being stopped.
        Terminating = "TERMINATING",
        /// Gone (the record stays).
        Terminated = "TERMINATED",
    }
}

impl MicrovmState {
    /// Terminating or terminated: no new work may start on it.
    pub fn is_ending(self) -> bool {
        matches!(self, MicrovmState::Terminating | MicrovmState::Terminated)
    }
}

impl Lifecycle for MicrovmState {
    const RESOURCE: &'static str = "Microvm";
    const ALL: &'static [Self] = MicrovmState::ALL;

    fn as_str(self) -> &'static str {
        MicrovmState::as_str(self)
    }

    fn valid_transition(self, to: Self) -> bool {
        use MicrovmState::*;
        matches!(
            (self, to),
            (Pending, Running)
                | (Running, Suspending)
                | (Suspending, Suspended | Running)
                | (Suspended, Running)
                | (Pending | Running | Suspending | Suspended, Terminating)
                | (Pending | Running | Suspending | Suspended | Terminating, Terminated)
        )
    }

    fn hint(self, to: Self) -> Option<&'static str> {
        use MicrovmState::*;
        match (self, to) {
            (Terminated, _) => Some("it has ended; run another"),
            (_, Suspending) => Some("only a RUNNING microvm can be suspended"),
            (_, Running) => Some("only a SUSPENDED microvm can be resumed"),
            _ => None,
        }
    }
}

/// The model's `MicrovmImageVersionState`: a version and its build. One type for the API's
/// versions and the operator's local image store (`hearth_proto::image`).
pub use hearth_proto::image::ImageVersionState as MicrovmImageVersionState;

/// The state of a version's build (GetMicrovmImageBuild).
pub fn build_state(v: MicrovmImageVersionState) -> BuildState {
    use MicrovmImageVersionState::*;
    match v {
        Pending => BuildState::Pending,
        InProgress => BuildState::InProgress,
        Failed => BuildState::Failed,
        // A version past its build was built.
        Successful | Deleting | Deleted | DeleteFailed => BuildState::Successful,
    }
}

impl Lifecycle for MicrovmImageVersionState {
    const RESOURCE: &'static str = "MicrovmImageVersion";
    const ALL: &'static [Self] = &MicrovmImageVersionState::ALL;

    fn as_str(self) -> &'static str {
        MicrovmImageVersionState::as_str(self)
    }

    /// The one table, kept beside the type in `hearth_proto::image`.
    fn valid_transition(self, to: Self) -> bool {
        MicrovmImageVersionState::valid_transition(self, to)
    }

    fn hint(self, to: Self) -> Option<&'static str> {
        (self.is_building() && to == MicrovmImageVersionState::Deleted).then_some("its build is in progress")
    }
}

states! {
    /// The model's `BuildState`: a version's build, as GetMicrovmImageBuild shows it. It is
    /// the version's state seen from the build ([`build_state`]),
    /// so the version's table governs it.
    BuildState {
        /// Not started.
        Pending = "PENDING",
        /// Running.
        InProgress = "IN_PROGRESS",
        /// Done.
        Successful = "SUCCESSFUL",
        /// Failed.
        Failed = "FAILED",
    }
}

states! {
    /// The model's `MicrovmImageVersionStatus`: whether new microvms may run the version.
    /// Either may follow either (UpdateMicrovmImageVersion), so it has no table.
    MicrovmImageVersionStatus {
        /// New microvms may run it.
        Active = "ACTIVE",
        /// They may not.
        Inactive = "INACTIVE",
    }
}

states! {
    /// The model's `MicrovmImageState`.
    MicrovmImageState {
        /// Its first version is building.
        Creating = "CREATING",
        /// Its first version was built.
        Created = "CREATED",
        /// Its first version failed.
        CreateFailed = "CREATE_FAILED",
        /// A new version is building.
        Updating = "UPDATING",
        /// The newest build succeeded.
        Updated = "UPDATED",
        /// The newest build failed.
        UpdateFailed = "UPDATE_FAILED",
        /// A name of the model (Hearth deletes in one step).
        Deleting = "DELETING",
        /// A name of the model (unused).
        DeleteFailed = "DELETE_FAILED",
        /// A name of the model (unused).
        Deleted = "DELETED",
    }
}

impl Lifecycle for MicrovmImageState {
    const RESOURCE: &'static str = "MicrovmImage";
    const ALL: &'static [Self] = MicrovmImageState::ALL;

    fn as_str(self) -> &'static str {
        MicrovmImageState::as_str(self)
    }

    fn valid_transition(self, to: Self) -> bool {
        use MicrovmImageState::*;
        matches!(
            (self, to),
            (Creating, Created | CreateFailed)
                // A new version may start while another builds (as it always could).
                | (Creating | Created | CreateFailed | Updating | Updated | UpdateFailed, Updating)
                | (Updating, Updated | UpdateFailed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair of a lifecycle against the expected table, written out as a list of moves.
    fn exhaustive<S: Lifecycle>(allowed: &[(S, S)]) {
        for &from in S::ALL {
            for &to in S::ALL {
                let expected = allowed.contains(&(from, to));
                assert_eq!(from.valid_transition(to), expected, "{from:?} -> {to:?}");
                match from.check("x", to) {
                    Ok(()) => assert!(expected),
                    Err(e) => {
                        assert!(!expected);
                        assert_eq!((e.from, e.to), (from, to));
                        assert!(e.to_string().starts_with(&format!("{} x is {}", S::RESOURCE, from.as_str())), "{e}");
                    }
                }
            }
        }
    }

    #[test]
    fn microvm_table() {
        use MicrovmState::*;
        exhaustive(&[
            (Pending, Running),
            (Pending, Terminating),
            (Pending, Terminated),
            (Running, Suspending),
            (Running, Terminating),
            (Running, Terminated),
            (Suspending, Suspended),
            (Suspending, Running),
            (Suspending, Terminating),
            (Suspending, Terminated),
            (Suspended, Running),
            (Suspended, Terminating),
            (Suspended, Terminated),
            (Terminating, Terminated),
        ]);
        // Nothing follows TERMINATED; nothing leads back to PENDING.
        assert!(MicrovmState::ALL.iter().all(|s| !Terminated.valid_transition(*s) && !s.valid_transition(Pending)));
    }

    #[test]
    fn version_table() {
        use MicrovmImageVersionState::*;
        exhaustive(&[
            (Pending, InProgress),
            (Pending, Failed),
            (InProgress, Successful),
            (InProgress, Failed),
            (Successful, Deleted),
            (Failed, Deleted),
        ]);
        assert_eq!(
            Pending.check("web:1", Deleted).unwrap_err().to_string(),
            "MicrovmImageVersion web:1 is PENDING; it cannot become DELETED (its build is in progress)"
        );
    }

    #[test]
    fn image_table() {
        use MicrovmImageState::*;
        let mut allowed = vec![(Creating, Created), (Creating, CreateFailed), (Updating, Updated), (Updating, UpdateFailed)];
        allowed.extend([Creating, Created, CreateFailed, Updating, Updated, UpdateFailed].map(|s| (s, Updating)));
        exhaustive(&allowed);
    }

    #[test]
    fn names_are_the_models_and_round_trip() {
        let model: serde_json::Value = serde_json::from_str(include_str!("../model/lambda-microvms-2025-09-09.json")).unwrap();
        let names = |shape: &str| -> Vec<String> {
            model["shapes"][shape]["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
        };
        fn wire<S: Serialize>(all: &[S]) -> Vec<String> {
            all.iter().map(|s| serde_json::to_value(s).unwrap().as_str().unwrap().to_owned()).collect()
        }
        assert_eq!(wire(MicrovmState::ALL), names("MicrovmState"));
        assert_eq!(wire(&MicrovmImageVersionState::ALL), names("MicrovmImageVersionState"));
        assert_eq!(wire(BuildState::ALL), names("BuildState"));
        assert_eq!(wire(MicrovmImageVersionStatus::ALL), names("MicrovmImageVersionStatus"));
        assert_eq!(wire(MicrovmImageState::ALL), names("MicrovmImageState"));
        for s in MicrovmState::ALL {
            assert_eq!(s.as_str().parse::<MicrovmState>().unwrap(), *s);
            assert_eq!(serde_json::from_value::<MicrovmState>(s.as_str().into()).unwrap(), *s);
        }
        assert!("running".parse::<MicrovmState>().is_err());
    }

    #[test]
    fn every_version_state_has_a_build_state() {
        use MicrovmImageVersionState::*;
        assert_eq!(build_state(Pending), BuildState::Pending);
        assert_eq!(build_state(InProgress), BuildState::InProgress);
        assert_eq!(build_state(Failed), BuildState::Failed);
        for s in [Successful, Deleting, Deleted, DeleteFailed] {
            assert_eq!(build_state(s), BuildState::Successful);
        }
    }
}
