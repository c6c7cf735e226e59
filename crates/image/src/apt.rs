//! The host's Debian mirror, from its apt sources (deb822 `.sources` or one-line lists).
//! Hearth never names a mirror itself: it uses the one the machine is configured with.

use std::path::Path;

/// The URI of the first apt source serving `suite` (e.g. `bookworm`).
pub fn debian_mirror(suite: &str) -> Option<String> {
    let mut files = vec![Path::new("/etc/apt/sources.list").to_path_buf()];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let found = match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => from_deb822(&text, suite),
            Some("list") | None => from_one_line(&text, suite),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Finds the URI of a stanza whose `Suites:` include `suite`.
pub fn from_deb822(text: &str, suite: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name).map(str::trim).map(str::to_owned));
        let types = field("Types:").unwrap_or_default();
        if !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        let suites = field("Suites:").unwrap_or_default();
        if suites.split_whitespace().any(|s| s == suite) {
            return field("URIs:").and_then(|u| u.split_whitespace().next().map(str::to_owned));
        }
    }
    None
}

/// Finds the URI of a `deb URI suite components` line.
pub fn from_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let words: Vec<&str> = l.split_whitespace().filter(|w| !w.starts_with('[')).collect();
        match words.as_slice() {
            ["deb", uri, s, ..] if *s == suite => Some((*uri).to_owned()),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_picks_the_matching_stanza() {
        let t = "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(from_deb822(t, "bookworm").as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(from_deb822(t, "trixie"), None);
    }

    #[test]
    fn one_line_format() {
        let t = "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main\n";
        assert_eq!(from_one_line(t, "bookworm").as_deref(), Some("http://m.example/debian"));
    }
}
