//! Image names, version references and version states: one rule for every side that names
//! an image (the API, the operator's local store under `$HEARTH_HOME/images`, `FROM
//! hearth/NAME` in a Dockerfile).
//!
//! The rule is the service model's `ImageName` shape (`[a-zA-Z0-9-_]+`, 1-64 characters),
//! matched against the *whole* name: the model's pattern is unanchored, and a name becomes a
//! directory name, so `-/../x` must not pass because it contains a valid run of characters.
//! A version reference is `NAME` (the newest successful version) or `NAME:vN`.

use serde::{Deserialize, Serialize};

/// Fewest characters in an image name (the model's `ImageName.min`).
pub const MIN_IMAGE_NAME_LEN: usize = 1;
/// Most characters in an image name (the model's `ImageName.max`).
pub const MAX_IMAGE_NAME_LEN: usize = 64;

/// A name or reference that breaks the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    /// The name is empty, too long, or has a character outside `[A-Za-z0-9_-]`.
    #[error("image name {0:?} must be 1-64 letters, digits, '-' or '_'")]
    Name(String),
    /// The part after `:v` is not a version number.
    #[error("bad version in image reference {0:?}: use NAME or NAME:vN")]
    Version(String),
}

/// Whether `name` is a valid image name (see the module docs).
///
/// ```
/// assert!(hearth_proto::image::valid_name("web-app_2"));
/// assert!(!hearth_proto::image::valid_name("web.app"));
/// ```
pub fn valid_name(name: &str) -> bool {
    (MIN_IMAGE_NAME_LEN..=MAX_IMAGE_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks an image name.
///
/// # Errors
///
/// [`ImageRefError::Name`] when [`valid_name`] is false.
pub fn check_name(name: &str) -> Result<(), ImageRefError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ImageRefError::Name(name.to_owned()))
    }
}

/// A parsed `NAME` or `NAME:vN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The image name (checked).
    pub name: String,
    /// The version, or `None` for the newest successful one.
    pub version: Option<u32>,
}

impl std::str::FromStr for ImageRef {
    type Err = ImageRefError;

    /// Parses `NAME` or `NAME:vN`; the name is checked too.
    ///
    /// ```
    /// use hearth_proto::image::ImageRef;
    /// let r: ImageRef = "web:v3".parse().unwrap();
    /// assert_eq!((r.name.as_str(), r.version), ("web", Some(3)));
    /// assert!("web:vx".parse::<ImageRef>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, ImageRefError> {
        let (name, version) = match s.rsplit_once(":v") {
            Some((n, v)) => (n, Some(v.parse().map_err(|_| ImageRefError::Version(s.to_owned()))?)),
            None => (s, None),
        };
        check_name(name)?;
        Ok(ImageRef { name: name.to_owned(), version })
    }
}

/// State of an image version: the model's `MicrovmImageVersionState`, on the wire and on
/// disk in the same `SCREAMING_SNAKE_CASE` spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ImageVersionState {
    /// Accepted, not started.
    Pending,
    /// Building.
    InProgress,
    /// Built; launchable.
    Successful,
    /// The build failed; the record says why.
    Failed,
    /// Being deleted.
    Deleting,
    /// Deleted.
    Deleted,
    /// The deletion failed; it may be retried.
    DeleteFailed,
}

impl ImageVersionState {
    /// Every state, in lifecycle order.
    pub const ALL: [ImageVersionState; 7] =
        [Self::Pending, Self::InProgress, Self::Successful, Self::Failed, Self::Deleting, Self::Deleted, Self::DeleteFailed];

    /// The model's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::InProgress => "IN_PROGRESS",
            Self::Successful => "SUCCESSFUL",
            Self::Failed => "FAILED",
            Self::Deleting => "DELETING",
            Self::Deleted => "DELETED",
            Self::DeleteFailed => "DELETE_FAILED",
        }
    }

    /// Whether a build is still running or about to (the version cannot be deleted yet).
    pub fn is_building(self) -> bool {
        matches!(self, Self::Pending | Self::InProgress)
    }

    /// The one table of which state may follow which. A build goes PENDING → IN_PROGRESS →
    /// SUCCESSFUL or FAILED (a build interrupted by a restart fails from either of the first
    /// two); a finished version is deleted in one step. DELETING and DELETE_FAILED are the
    /// model's names and never entered: Hearth deletes a version at once or not at all.
    pub fn valid_transition(self, to: ImageVersionState) -> bool {
        use ImageVersionState::*;
        matches!((self, to), (Pending, InProgress | Failed) | (InProgress, Successful | Failed) | (Successful | Failed, Deleted))
    }
}

impl std::fmt::Display for ImageVersionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A state name the model does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown image version state {0:?}")]
pub struct UnknownState(pub String);

impl std::str::FromStr for ImageVersionState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, UnknownState> {
        Self::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_model_matched_whole() {
        for ok in ["a", "web", "Web-App_2", &"x".repeat(MAX_IMAGE_NAME_LEN)] {
            assert!(valid_name(ok), "{ok:?}");
        }
        for bad in ["", "web.app", ".hidden", "-/../x", "a b", "é", "a/b", "a:b", &"x".repeat(MAX_IMAGE_NAME_LEN + 1)] {
            assert!(!valid_name(bad), "{bad:?}");
            assert_eq!(check_name(bad), Err(ImageRefError::Name(bad.to_owned())));
        }
    }

    #[test]
    fn references_parse() {
        assert_eq!("web".parse(), Ok(ImageRef { name: "web".into(), version: None }));
        assert_eq!("web:v12".parse(), Ok(ImageRef { name: "web".into(), version: Some(12) }));
        assert_eq!("web:vx".parse::<ImageRef>(), Err(ImageRefError::Version("web:vx".into())));
        assert_eq!("../x:v1".parse::<ImageRef>(), Err(ImageRefError::Name("../x".into())));
        assert!(":v1".parse::<ImageRef>().is_err());
    }

    #[test]
    fn states_round_trip_in_the_model_spelling() {
        for st in ImageVersionState::ALL {
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{st}\""));
            assert_eq!(format!("{st:<14}|").len(), 15, "Display pads (tables line up)");
            assert_eq!(serde_json::from_str::<ImageVersionState>(&json).unwrap(), st);
            assert_eq!(st.as_str().parse::<ImageVersionState>(), Ok(st));
        }
        assert!("RUNNING".parse::<ImageVersionState>().is_err());
    }

    #[test]
    fn the_transition_table_is_exactly_the_lifecycle() {
        use ImageVersionState::*;
        let allowed = [
            (Pending, InProgress),
            (Pending, Failed),
            (InProgress, Successful),
            (InProgress, Failed),
            (Successful, Deleted),
            (Failed, Deleted),
        ];
        for from in ImageVersionState::ALL {
            for to in ImageVersionState::ALL {
                assert_eq!(from.valid_transition(to), allowed.contains(&(from, to)), "{from} → {to}");
            }
        }
    }
}
