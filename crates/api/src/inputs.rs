//! The operations' inputs as types, generated at build time from the service model
//! (`build.rs`): one struct per input shape (`RunMicrovmRequest`, …), read from the input
//! the model has validated ([`parse`]). The model stays the single source of shapes and
//! limits; the handlers read fields, not string keys.

use crate::error::ApiError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

/// An operation's input type.
pub trait Input: DeserializeOwned + Serialize {
    /// The operation it is the input of.
    const OPERATION: &'static str;
}

/// The generated input types.
pub mod shapes {
    include!(concat!(env!("OUT_DIR"), "/inputs.rs"));
}

pub use shapes::*;

/// Reads a validated input (`model().parse_input`) as `T`.
///
/// # Errors
///
/// A ValidationException when it does not fit `T` (a request the validator let through
/// that the types do not: a bug of one of them).
pub fn parse<T: Input>(input: &Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(input.clone())).map_err(|e| ApiError::validation(format!("{}: {e}", T::OPERATION)))
}

/// `input` as the JSON object it was read from (members absent stay absent).
pub fn to_map<T: Input>(input: &T) -> Map<String, Value> {
    match serde_json::to_value(input) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_read_the_models_names_and_round_trip() {
        let raw = json!({
            "imageIdentifier": "web",
            "maximumDurationInSeconds": 60,
            "ingressNetworkConnectors": ["SHELL_INGRESS"],
            "idlePolicy": { "maxIdleDurationSeconds": 60 },
        });
        let m = raw.as_object().unwrap();
        let r: RunMicrovmRequest = parse(m).unwrap();
        assert_eq!(r.image_identifier, "web");
        assert_eq!(r.maximum_duration_in_seconds, Some(60));
        assert_eq!(r.image_version, None);
        assert_eq!(&to_map(&r), m);
        let t: TagResourceRequest = parse(json!({ "Resource": "arn", "Tags": { "a": "1" } }).as_object().unwrap()).unwrap();
        assert_eq!(t.tags.get("a").map(String::as_str), Some("1"));
    }

    #[test]
    fn every_operation_of_the_model_has_an_input_type() {
        let m = crate::model::model();
        let names = [
            CreateMicrovmAuthTokenRequest::OPERATION,
            CreateMicrovmImageRequest::OPERATION,
            CreateMicrovmShellAuthTokenRequest::OPERATION,
            DeleteMicrovmImageInput::OPERATION,
            DeleteMicrovmImageVersionInput::OPERATION,
            GetMicrovmRequest::OPERATION,
            GetMicrovmImageInput::OPERATION,
            GetMicrovmImageBuildInput::OPERATION,
            GetMicrovmImageVersionInput::OPERATION,
            ListManagedMicrovmImageVersionsInput::OPERATION,
            ListManagedMicrovmImagesInput::OPERATION,
            ListMicrovmImageBuildsInput::OPERATION,
            ListMicrovmImageVersionsInput::OPERATION,
            ListMicrovmImagesRequest::OPERATION,
            ListMicrovmsRequest::OPERATION,
            ListTagsRequest::OPERATION,
            ResumeMicrovmRequest::OPERATION,
            RunMicrovmRequest::OPERATION,
            SuspendMicrovmRequest::OPERATION,
            TagResourceRequest::OPERATION,
            TerminateMicrovmRequest::OPERATION,
            UntagResourceRequest::OPERATION,
            UpdateMicrovmImageRequest::OPERATION,
            UpdateMicrovmImageVersionRequest::OPERATION,
        ];
        assert_eq!(names.len(), 24);
        for n in names {
            assert!(m.operations().iter().any(|o| o.name == n), "{n}");
        }
    }
}
