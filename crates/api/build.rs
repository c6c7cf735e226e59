//! Generates the operations' input types from the service model
//! (`model/lambda-microvms-2025-09-09.json`), so handlers read typed fields and the model
//! stays the single source of shapes: one struct per operation's input shape, a field per
//! member. Strings, integers and booleans are typed; lists and maps of strings are
//! `Vec<String>` and `BTreeMap<String, String>`; nested structures stay JSON values (they
//! are kept as given, in the records' `spec`). The model's validator has checked every
//! input before it is read into these, so reading one cannot fail on a valid request.

use serde_json::Value;
use std::fmt::Write;

const MODEL: &str = "model/lambda-microvms-2025-09-09.json";

fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The Rust type of shape `name`.
fn rust_type(shapes: &serde_json::Map<String, Value>, name: &str) -> String {
    let s = &shapes[name];
    let is_string = |n: &Value| n.as_str().is_some_and(|n| shapes[n]["type"] == "string");
    match s["type"].as_str().unwrap_or_default() {
        "string" => "String".into(),
        "integer" | "long" => "i64".into(),
        "boolean" => "bool".into(),
        "list" if is_string(&s["member"]["shape"]) => "Vec<String>".into(),
        "map" if is_string(&s["key"]["shape"]) && is_string(&s["value"]["shape"]) => "std::collections::BTreeMap<String, String>".into(),
        _ => "serde_json::Value".into(),
    }
}

fn main() {
    println!("cargo:rerun-if-changed={MODEL}");
    let model: Value = serde_json::from_str(&std::fs::read_to_string(MODEL).expect("the service model")).expect("the model is JSON");
    let shapes = model["shapes"].as_object().expect("shapes");
    let mut out = String::new();
    let mut ops: Vec<(&String, &Value)> = model["operations"].as_object().expect("operations").iter().collect();
    ops.sort_by_key(|(n, _)| n.as_str());
    for (op, o) in ops {
        let Some(input) = o["input"]["shape"].as_str() else { continue };
        let shape = &shapes[input];
        let required: Vec<&str> = shape["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        writeln!(out, "/// The input of {op} (the model's `{input}`).").unwrap();
        writeln!(out, "#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]").unwrap();
        writeln!(out, "pub struct {input} {{").unwrap();
        let mut members: Vec<(&String, &Value)> = shape["members"].as_object().expect("members").iter().collect();
        members.sort_by_key(|(n, _)| n.as_str());
        for (name, m) in members {
            let ty = rust_type(shapes, m["shape"].as_str().expect("member shape"));
            let field = snake(name);
            writeln!(out, "    /// `{name}`{}.", if required.contains(&name.as_str()) { "" } else { " (optional)" }).unwrap();
            if required.contains(&name.as_str()) {
                writeln!(out, "    #[serde(rename = \"{name}\")]").unwrap();
                writeln!(out, "    pub {field}: {ty},").unwrap();
            } else {
                writeln!(out, "    #[serde(rename = \"{name}\", default, skip_serializing_if = \"Option::is_none\")]").unwrap();
                writeln!(out, "    pub {field}: Option<{ty}>,").unwrap();
            }
        }
        writeln!(out, "}}\n").unwrap();
        writeln!(out, "impl super::Input for {input} {{\n    const OPERATION: &'static str = \"{op}\";\n}}\n").unwrap();
    }
    let dest = std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("inputs.rs");
    std::fs::write(dest, out).expect("write inputs.rs");
}
