//! Result tables of the bench commands: Markdown for people, JSON for scripts.

/// One measured quantity and its samples.
pub struct Row {
    /// What was measured.
    pub name: String,
    /// The samples (any order).
    pub samples: Vec<f64>,
    /// Their unit.
    pub unit: &'static str,
}

/// Milliseconds of a duration, as a float.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A `key:  N kB` field of `/proc/<pid>/<file>` (status, smaps_rollup), in KiB.
pub fn proc_kib(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The `p`-quantile (0..=1) of sorted samples, nearest rank.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() as f64) - 1.0) * p).round() as usize]
}

/// Prints `rows` as a Markdown table, or as one JSON object with `extra` fields merged in.
pub fn print(mut rows: Vec<Row>, json: bool, extra: serde_json::Value) {
    for r in &mut rows {
        r.samples.sort_by(|a, b| a.total_cmp(b));
    }
    if json {
        let results: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "unit": r.unit, "n": r.samples.len(),
                    "p50": pct(&r.samples, 0.5), "p90": pct(&r.samples, 0.9), "p99": pct(&r.samples, 0.99),
                    "min": r.samples.first(), "max": r.samples.last(),
                })
            })
            .collect();
        let mut out = serde_json::json!({ "results": results });
        if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        println!("{out}");
        return;
    }
    println!("| measurement | n | p50 | p90 | p99 | min | max | unit |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let s = &r.samples;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r.name,
            s.len(),
            pct(s, 0.5),
            pct(s, 0.9),
            pct(s, 0.99),
            s.first().copied().unwrap_or(f64::NAN),
            s.last().copied().unwrap_or(f64::NAN),
            r.unit
        );
    }
}
