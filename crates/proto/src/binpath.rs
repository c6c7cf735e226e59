//! Binary-safe paths.
//!
//! Linux file names are bytes, not text. JSON carries a [`BinPath`] as a plain string when it
//! is valid UTF-8 and as `{"base64": "…"}` otherwise; query strings carry it percent-encoded.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest path accepted anywhere in the protocol (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// A path or file name as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BinPath(pub Vec<u8>);

/// Why a path from the other side was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// Longer than [`MAX_PATH_LEN`].
    #[error("path is {0} bytes long; the limit is {MAX_PATH_LEN}")]
    TooLong(usize),
    /// Contains a NUL byte, which no Linux path can.
    #[error("path contains a NUL byte")]
    Nul,
    /// Empty.
    #[error("path is empty")]
    Empty,
    /// The percent-encoding or base64 was malformed.
    #[error("path encoding is malformed")]
    Encoding,
}

/// Whether a byte passes through a query string unescaped (unreserved characters and `/`).
fn query_keeps(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/')
}

impl BinPath {
    /// Wraps raw bytes after checking them.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let p = BinPath(bytes.into());
        p.validate()?;
        Ok(p)
    }

    /// Checks the length and content limits.
    pub fn validate(&self) -> Result<(), PathError> {
        if self.0.is_empty() {
            return Err(PathError::Empty);
        }
        if self.0.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(self.0.len()));
        }
        if self.0.contains(&0) {
            return Err(PathError::Nul);
        }
        Ok(())
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Percent-encodes the bytes for a query string.
    pub fn to_query(&self) -> String {
        let mut out = String::with_capacity(self.0.len());
        for &b in &self.0 {
            if query_keeps(b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// Decodes a percent-encoded query value and validates it.
    pub fn from_query(s: &str) -> Result<Self, PathError> {
        let raw = s.as_bytes();
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'%' => {
                    let hex = raw.get(i + 1..i + 3).ok_or(PathError::Encoding)?;
                    let hex = std::str::from_utf8(hex).map_err(|_| PathError::Encoding)?;
                    out.push(u8::from_str_radix(hex, 16).map_err(|_| PathError::Encoding)?);
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
            if out.len() > MAX_PATH_LEN {
                return Err(PathError::TooLong(out.len()));
            }
        }
        BinPath::new(out)
    }

    /// A lossy rendering for messages.
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl From<&str> for BinPath {
    fn from(s: &str) -> Self {
        BinPath(s.as_bytes().to_vec())
    }
}

impl From<&[u8]> for BinPath {
    fn from(s: &[u8]) -> Self {
        BinPath(s.to_vec())
    }
}

impl Serialize for BinPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("base64", &base64::engine::general_purpose::STANDARD.encode(&self.0))?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for BinPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Bytes { base64: String },
        }
        let bytes = match Repr::deserialize(d)? {
            Repr::Text(t) => t.into_bytes(),
            Repr::Bytes { base64 } => {
                base64::engine::general_purpose::STANDARD.decode(base64.as_bytes()).map_err(serde::de::Error::custom)?
            }
        };
        if bytes.len() > MAX_PATH_LEN {
            return Err(serde::de::Error::custom(PathError::TooLong(bytes.len())));
        }
        Ok(BinPath(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn utf8_is_a_plain_string() {
        let p = BinPath::from("/workspace/a b");
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"/workspace/a b\"");
    }

    #[test]
    fn non_utf8_is_base64() {
        let p = BinPath(vec![b'/', 0xff, 0xfe]);
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("base64"), "{json}");
        assert_eq!(serde_json::from_str::<BinPath>(&json).unwrap(), p);
    }

    #[test]
    fn query_rejects_nul_and_bad_escapes() {
        assert_eq!(BinPath::from_query("/a%00b"), Err(PathError::Nul));
        assert_eq!(BinPath::from_query("/a%zz"), Err(PathError::Encoding));
        assert_eq!(BinPath::from_query("/a%2"), Err(PathError::Encoding));
        assert_eq!(BinPath::from_query(""), Err(PathError::Empty));
    }

    proptest! {
        #[test]
        fn query_round_trips(bytes in proptest::collection::vec(1u8..=255, 1..300)) {
            let p = BinPath(bytes);
            prop_assert_eq!(BinPath::from_query(&p.to_query()).unwrap(), p);
        }

        #[test]
        fn json_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let p = BinPath(bytes);
            let json = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(serde_json::from_str::<BinPath>(&json).unwrap(), p);
        }

        #[test]
        fn from_query_never_panics(s in ".{0,200}") {
            let _ = BinPath::from_query(&s);
        }
    }
}
