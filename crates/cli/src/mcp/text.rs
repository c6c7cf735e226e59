//! Text operations of the file tools, without I/O: numbered line ranges, exact-string
//! edits that refuse a missing or ambiguous match (as agents' text-editor tools do),
//! insertion at a line, and output truncation that keeps the head and the tail.

/// Longest line `read_file` shows whole.
pub const MAX_LINE_CHARS: usize = 2000;
/// Lines `read_file` shows when the call names no limit.
pub const DEFAULT_LINES: usize = 2000;

/// Lines `offset..offset+limit` (1-based) of `text`, numbered like `cat -n`, with a note
/// when more follow.
pub fn numbered(text: &str, offset: usize, limit: usize) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = offset.max(1);
    if lines.is_empty() {
        return Ok("(empty file)".into());
    }
    if start > lines.len() {
        return Err(format!("offset {start} is past the end: the file has {} lines", lines.len()));
    }
    let end = (start - 1).saturating_add(limit.max(1)).min(lines.len());
    let mut out = String::new();
    for (i, line) in lines[start - 1..end].iter().enumerate() {
        let shown: String = line.chars().take(MAX_LINE_CHARS).collect();
        let cut = if shown.len() < line.len() { " [line truncated]" } else { "" };
        out.push_str(&format!("{:>6}\t{shown}{cut}\n", start + i));
    }
    if end < lines.len() {
        out.push_str(&format!("[lines {start}-{end} of {}; read on with offset={}]\n", lines.len(), end + 1));
    }
    Ok(out)
}

/// `text` with `old` replaced by `new`: exactly one occurrence, or every one when
/// `replace_all`. Returns the new text and how many were replaced.
pub fn replace(text: &str, old: &str, new: &str, replace_all: bool) -> Result<(String, usize), String> {
    if old.is_empty() {
        return Err("old_string is empty: give the exact text to replace (or use insert_line to add text)".into());
    }
    if old == new {
        return Err("old_string and new_string are the same: nothing would change".into());
    }
    let n = text.matches(old).count();
    match n {
        0 => Err(
            "old_string was not found in the file: it must match exactly, whitespace and indentation included; read_file the lines again and copy them"
                .into(),
        ),
        1 => Ok((text.replacen(old, new, 1), 1)),
        _ if replace_all => Ok((text.replace(old, new), n)),
        _ => Err(format!(
            "old_string appears {n} times: add surrounding lines to make it unique, or set replace_all to replace every one"
        )),
    }
}

/// `text` with `new` inserted after line `line` (0: at the top).
pub fn insert(text: &str, line: usize, new: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    if line > lines.len() {
        return Err(format!("insert_line {line} is past the end: the file has {} lines", lines.len()));
    }
    let mut out: String = lines[..line].concat();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(new);
    if !new.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&lines[line..].concat());
    Ok(out)
}

/// `s` cut to its first and last `limit / 2` characters with a note in between; `None`
/// when it fits.
pub fn truncate(s: &str, limit: usize) -> Option<String> {
    let n = s.chars().count();
    if n <= limit {
        return None;
    }
    let half = limit / 2;
    let head: String = s.chars().take(half).collect();
    let tail: String = s.chars().skip(n - half).collect();
    Some(format!("{head}\n[… {} characters cut …]\n{tail}", n - 2 * half))
}

/// `path` made absolute: relative paths are beneath `/workspace`.
pub fn absolute(path: &str) -> Result<String, String> {
    let p = path.trim();
    if p.is_empty() {
        return Err("path is empty: give a file path such as /workspace/main.py".into());
    }
    if p.contains('\0') || p.len() > 4096 {
        return Err("path is not a valid Linux path (NUL byte, or longer than 4096 bytes)".into());
    }
    Ok(if p.starts_with('/') { p.to_owned() } else { format!("{}/{p}", super::hub::WORKSPACE) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_refuses_missing_and_ambiguous_strings() {
        assert_eq!(replace("a b a", "b", "c", false).unwrap(), ("a c a".into(), 1));
        assert!(replace("a b a", "x", "c", false).unwrap_err().contains("not found"));
        assert!(replace("a b a", "a", "c", false).unwrap_err().contains("appears 2 times"));
        assert_eq!(replace("a b a", "a", "c", true).unwrap(), ("c b c".into(), 2));
        assert!(replace("a", "", "c", false).is_err());
        assert!(replace("a", "a", "a", false).is_err());
    }

    #[test]
    fn insert_at_a_line() {
        assert_eq!(insert("one\ntwo\n", 0, "zero").unwrap(), "zero\none\ntwo\n");
        assert_eq!(insert("one\ntwo\n", 1, "x\n").unwrap(), "one\nx\ntwo\n");
        assert_eq!(insert("one\ntwo", 2, "three").unwrap(), "one\ntwo\nthree\n");
        assert!(insert("one\n", 3, "x").is_err());
    }

    #[test]
    fn numbered_ranges() {
        let t = "a\nb\nc\n";
        assert_eq!(numbered(t, 1, 2).unwrap(), "     1\ta\n     2\tb\n[lines 1-2 of 3; read on with offset=3]\n");
        assert_eq!(numbered(t, 3, 10).unwrap(), "     3\tc\n");
        assert!(numbered(t, 4, 1).is_err());
        assert_eq!(numbered("", 1, 1).unwrap(), "(empty file)");
    }

    #[test]
    fn truncation_keeps_head_and_tail() {
        assert_eq!(truncate("short", 10), None);
        let t = truncate(&"x".repeat(100), 10).unwrap();
        assert!(t.starts_with("xxxxx\n[… 90 characters cut …]\nxxxxx"), "{t}");
        assert_eq!(absolute("a/b.py").unwrap(), "/workspace/a/b.py");
        assert!(absolute(" ").is_err());
    }
}
