//! Domain allow lists: the names an [`Egress`](super::Egress) lets a guest resolve and
//! reach (`example.com`, `*.example.org`), normalised and matched the same way by the DNS
//! guard and the SNI / Host check ([`super::guard`]).

use super::NetError;

/// Most domains in one policy.
pub const MAX_DOMAINS: usize = 64;

/// Longest domain, as DNS allows (without the trailing dot).
pub const MAX_DOMAIN_LEN: usize = 253;

/// `s` as an allow-list entry: lower case, without a trailing dot; `*.` only as its first
/// label (any name under the rest, not the rest itself); at least two labels of letters,
/// digits and hyphens, each 1-63 characters, not starting or ending with a hyphen.
///
/// # Errors
///
/// [`NetError::Domain`] saying what is wrong.
///
/// # Example
///
/// ```
/// use hearth_vmm::net::normalize_domain;
/// assert_eq!(normalize_domain("API.Example.com.").unwrap(), "api.example.com");
/// assert!(normalize_domain("*.example.org").is_ok());
/// assert!(normalize_domain("ex*ample.org").is_err());
/// ```
pub fn normalize_domain(s: &str) -> Result<String, NetError> {
    let bad = |why: &str| NetError::Domain(format!("{s:?}: {why} (expected a name such as example.com or *.example.com)"));
    let d = s.trim_end_matches('.').to_ascii_lowercase();
    if d.len() > MAX_DOMAIN_LEN {
        return Err(bad("longer than 253 characters"));
    }
    let rest = d.strip_prefix("*.").unwrap_or(&d);
    let labels: Vec<&str> = rest.split('.').collect();
    if labels.len() < 2 {
        return Err(bad("needs at least two labels"));
    }
    for l in &labels {
        if l.is_empty() || l.len() > 63 {
            return Err(bad("each label is 1-63 characters"));
        }
        if !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || l.starts_with('-') || l.ends_with('-') {
            return Err(bad("labels are letters, digits and inner hyphens (a wildcard only as `*.` in front)"));
        }
    }
    Ok(d)
}

/// True when `name` (as a guest wrote it, any case, with or without the trailing dot) is on
/// `list`: equal to an entry, or under a `*.` entry.
pub fn domain_allowed(list: &[String], name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    list.iter().any(|d| match d.strip_prefix("*.") {
        Some(parent) => name.len() > parent.len() + 1 && name.ends_with(parent) && name.as_bytes()[name.len() - parent.len() - 1] == b'.',
        None => *d == name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_normalised_and_bounded() {
        assert_eq!(normalize_domain("Example.COM.").unwrap(), "example.com");
        for bad in ["com", "", "*.com", "a..b", "-a.com", "a-.com", "a.*.com", "*", "ex ample.com", "a_b.com", &"a".repeat(64)] {
            assert!(normalize_domain(bad).is_err(), "{bad}");
        }
        assert!(normalize_domain(&format!("{}.com", ["a"; 130].join("."))).is_err());
    }

    #[test]
    fn wildcards_match_names_below_only() {
        let list = vec!["example.com".to_owned(), "*.example.org".to_owned()];
        for ok in ["example.com", "EXAMPLE.com.", "a.example.org", "a.b.example.org"] {
            assert!(domain_allowed(&list, ok), "{ok}");
        }
        for no in ["a.example.com", "example.org", "badexample.org", "example.com.evil.net", "xexample.com"] {
            assert!(!domain_allowed(&list, no), "{no}");
        }
    }
}
