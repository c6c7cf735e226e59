//! The Lambda MicroVMs service model (botocore's `lambda-microvms/2025-09-09/service-2.json`,
//! documentation stripped, in `model/`), used *as data*: requests are routed by its
//! operations' methods and path templates, and every input is checked against its shapes —
//! types, required members, lengths, ranges, patterns, enums, unions, and members the model
//! does not have (a ValidationException naming them, never silently ignored). Handlers
//! then read a plain JSON object whose shape the model guarantees. Their answers are
//! checked against the operations' output shapes the same way ([`Model::check_output`]).
//!
//! Refresh the file with `scripts/update-api-model.sh` (downloads botocore from PyPI).

use crate::error::ApiError;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

const MODEL_JSON: &str = include_str!("../model/lambda-microvms-2025-09-09.json");

/// One operation of the model.
#[derive(Debug)]
pub struct Operation {
    /// Its name (`RunMicrovm`).
    pub name: String,
    /// HTTP method.
    pub method: http::Method,
    segments: Vec<Segment>,
    /// Status code of a success.
    pub status: u16,
    /// Input shape name.
    pub input: Option<String>,
    /// Output shape name (none: the answer has no body).
    pub output: Option<String>,
}

#[derive(Debug)]
enum Segment {
    Literal(String),
    Param(String),
}

/// The parsed model.
#[derive(Debug)]
pub struct Model {
    ops: Vec<Operation>,
    shapes: Map<String, Value>,
    patterns: std::sync::Mutex<BTreeMap<String, regex::Regex>>,
}

/// The embedded model, parsed once.
pub fn model() -> &'static Model {
    static M: std::sync::OnceLock<Model> = std::sync::OnceLock::new();
    M.get_or_init(|| Model::parse(MODEL_JSON).expect("the embedded service model parses"))
}

/// Most bytes of a request body the API accepts.
pub const MAX_BODY: usize = 1 << 20;

impl Model {
    fn parse(text: &str) -> Result<Model, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let shapes = v["shapes"].as_object().ok_or("no shapes")?.clone();
        let mut ops = Vec::new();
        for (name, op) in v["operations"].as_object().ok_or("no operations")? {
            let http = &op["http"];
            let method = http["method"].as_str().ok_or("no method")?.parse().map_err(|_| "bad method")?;
            let uri = http["requestUri"].as_str().ok_or("no requestUri")?;
            let path = uri.split('?').next().unwrap_or(uri);
            let segments = path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(p) => Segment::Param(p.trim_end_matches('+').to_owned()),
                    None => Segment::Literal(s.to_owned()),
                })
                .collect();
            ops.push(Operation {
                name: name.clone(),
                method,
                segments,
                status: http["responseCode"].as_u64().unwrap_or(200) as u16,
                input: op["input"]["shape"].as_str().map(str::to_owned),
                output: op["output"]["shape"].as_str().map(str::to_owned),
            });
        }
        Ok(Model { ops, shapes, patterns: Default::default() })
    }

    /// Every operation.
    pub fn operations(&self) -> &[Operation] {
        &self.ops
    }

    /// The operation for `method` and `path` (raw, percent-encoded), with its decoded path
    /// parameters. Empty segments count: `/2025-09-09/microvms/` is GetMicrovm (or
    /// TerminateMicrovm) with an empty `microvmIdentifier`, refused as the service refuses
    /// it, never ListMicrovms.
    pub fn route(&self, method: &http::Method, path: &str) -> Result<(&Operation, BTreeMap<String, String>), ApiError> {
        let parts: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        let mut path_known = false;
        for op in &self.ops {
            if op.segments.len() != parts.len() {
                continue;
            }
            let mut params = BTreeMap::new();
            let matched = op.segments.iter().zip(&parts).all(|(seg, part)| match seg {
                Segment::Literal(l) => l == part,
                Segment::Param(p) => match percent_encoding::percent_decode_str(part).decode_utf8() {
                    Ok(v) => {
                        params.insert(p.clone(), v.into_owned());
                        true
                    }
                    Err(_) => false,
                },
            });
            if !matched {
                continue;
            }
            path_known = true;
            if op.method == *method {
                if let Some((label, _)) = params.iter().find(|(_, v)| v.is_empty()) {
                    return Err(ApiError::validation(format!("{}: the path label {label} must not be empty", op.name)));
                }
                return Ok((op, params));
            }
        }
        Err(if path_known {
            ApiError::new(crate::error::Kind::MethodNotAllowed, format!("{method} is not supported on {path}"))
        } else {
            ApiError::new(crate::error::Kind::UnknownOperation, format!("no operation at {method} {path}"))
        })
    }

    /// Checks an operation's answer against its output shape, as a client reading it
    /// with the model would: members the shape does not have, required members, types,
    /// enums, lengths and ranges. `Err` says where it parts from the model (a defect of
    /// Hearth's, never the caller's).
    pub fn check_output(&self, op: &Operation, v: &Value) -> Result<(), String> {
        match &op.output {
            Some(shape) => self.check(shape, v, shape).map_err(|e| e.message),
            None if v.as_object().is_some_and(Map::is_empty) || v.is_null() => Ok(()),
            None => Err(format!("{} has no output, but the answer is {v}", op.name)),
        }
    }

    fn shape(&self, name: &str) -> &Value {
        self.shapes.get(name).unwrap_or(&Value::Null)
    }

    /// The HTTP status the model gives an error shape (500 when it has none).
    pub fn error_status(&self, name: &str) -> Option<u16> {
        self.shapes.get(name)?.get("error")?.get("httpStatusCode")?.as_u64().map(|s| s as u16)
    }

    /// Builds and validates an operation's input from its path parameters, query string
    /// (decoded pairs) and JSON body: an object keyed by member name.
    pub fn parse_input(
        &self,
        op: &Operation,
        path: &BTreeMap<String, String>,
        query: &[(String, String)],
        body: &[u8],
    ) -> Result<Map<String, Value>, ApiError> {
        let Some(input) = &op.input else { return Ok(Map::new()) };
        let shape = self.shape(input);
        let members = shape["members"].as_object().cloned().unwrap_or_default();
        let mut out = Map::new();
        let mut body_members = Map::new();
        for (name, m) in &members {
            let loc = m["location"].as_str().unwrap_or("body");
            let wire = m["locationName"].as_str().unwrap_or(name);
            match loc {
                "uri" => {
                    if let Some(v) = path.get(wire) {
                        out.insert(name.clone(), Value::String(v.clone()));
                    }
                }
                "querystring" => {
                    let target = self.shape(m["shape"].as_str().unwrap_or_default());
                    let mut vals = query.iter().filter(|(k, _)| k == wire).map(|(_, v)| v.clone());
                    if target["type"] == "list" {
                        let all: Vec<Value> = vals.map(Value::String).collect();
                        if !all.is_empty() {
                            out.insert(name.clone(), Value::Array(all));
                        }
                    } else if let Some(v) = vals.next() {
                        if vals.next().is_some() {
                            return Err(ApiError::validation(format!("query parameter {wire} given more than once")));
                        }
                        out.insert(
                            name.clone(),
                            scalar_from_text(target, &v).map_err(|e| ApiError::validation(format!("query parameter {wire}: {e}")))?,
                        );
                    }
                }
                "header" => {}
                _ => {
                    body_members.insert(wire.to_owned(), Value::String(name.clone()));
                }
            }
        }
        let known_query: Vec<&str> =
            members.values().filter(|m| m["location"] == "querystring").filter_map(|m| m["locationName"].as_str()).collect();
        if let Some((k, _)) = query.iter().find(|(k, _)| !known_query.contains(&k.as_str())) {
            return Err(ApiError::validation(format!("{} has no query parameter {k:?}", op.name)));
        }
        if !body.iter().all(u8::is_ascii_whitespace) {
            let v: Value =
                serde_json::from_slice(body).map_err(|e| ApiError::serialization(format!("the request body is not valid JSON: {e}")))?;
            let obj = v.as_object().ok_or_else(|| ApiError::serialization("the request body must be a JSON object"))?;
            for (k, v) in obj {
                let Some(Value::String(member)) = body_members.get(k) else {
                    return Err(ApiError::validation(format!("{} does not take a field {k:?} (unknown or unsupported field)", op.name)));
                };
                out.insert(member.clone(), v.clone());
            }
        }
        self.check(input, &Value::Object(out.clone()), input)?;
        Ok(out)
    }

    /// Checks `v` against shape `name`; `at` names the place for messages.
    fn check(&self, name: &str, v: &Value, at: &str) -> Result<(), ApiError> {
        let s = self.shape(name);
        let bad = |what: String| Err(ApiError::validation(format!("{at}: {what}")));
        match s["type"].as_str().unwrap_or("") {
            "structure" => {
                let Some(obj) = v.as_object() else { return bad("must be an object".into()) };
                let members = s["members"].as_object().cloned().unwrap_or_default();
                for (k, _) in obj {
                    if !members.contains_key(k) {
                        return bad(format!("unknown field {k:?}"));
                    }
                }
                for r in s["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                    if obj.get(r).is_none_or(Value::is_null) {
                        return bad(format!("missing required field {r:?}"));
                    }
                }
                if s["union"].as_bool() == Some(true) {
                    let set = obj.values().filter(|v| !v.is_null()).count();
                    if set != 1 {
                        return bad(format!("exactly one of {} must be set", members.keys().cloned().collect::<Vec<_>>().join(", ")));
                    }
                }
                for (k, m) in &members {
                    if let Some(x) = obj.get(k).filter(|x| !x.is_null()) {
                        self.check(m["shape"].as_str().unwrap_or_default(), x, &format!("{at}.{k}"))?;
                    }
                }
                Ok(())
            }
            "list" => {
                let Some(a) = v.as_array() else { return bad("must be a list".into()) };
                self.check_len(s, a.len(), at, "items")?;
                let member = s["member"]["shape"].as_str().unwrap_or_default();
                for (i, x) in a.iter().enumerate() {
                    self.check(member, x, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            "map" => {
                let Some(o) = v.as_object() else { return bad("must be an object (map)".into()) };
                self.check_len(s, o.len(), at, "entries")?;
                let (ks, vs) = (s["key"]["shape"].as_str().unwrap_or_default(), s["value"]["shape"].as_str().unwrap_or_default());
                for (k, x) in o {
                    self.check(ks, &Value::String(k.clone()), &format!("{at} key {k:?}"))?;
                    self.check(vs, x, &format!("{at}.{k}"))?;
                }
                Ok(())
            }
            "string" => {
                let Some(text) = v.as_str() else { return bad("must be a string".into()) };
                self.check_len(s, text.chars().count(), at, "characters")?;
                if let Some(values) = s["enum"].as_array() {
                    if !values.iter().any(|e| e.as_str() == Some(text)) {
                        let all: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
                        return bad(format!("{text:?} is not one of {}", all.join(", ")));
                    }
                }
                if let Some(p) = s["pattern"].as_str() {
                    if !self.matches(p, text) {
                        return bad(format!("{text:?} does not match the pattern {p}"));
                    }
                }
                Ok(())
            }
            "integer" | "long" => {
                let Some(n) = v.as_i64() else { return bad("must be an integer".into()) };
                // The model's `integer` is 32-bit; its `long`, 64-bit.
                if s["type"] == "integer" && i32::try_from(n).is_err() {
                    return bad(format!("{n} is outside the 32-bit integer range"));
                }
                if let Some(min) = s["min"].as_i64().filter(|m| n < *m) {
                    return bad(format!("{n} is below the minimum {min}"));
                }
                if let Some(max) = s["max"].as_i64().filter(|m| n > *m) {
                    return bad(format!("{n} is above the maximum {max}"));
                }
                Ok(())
            }
            "boolean" => v.is_boolean().then_some(()).map_or_else(|| bad("must be true or false".into()), Ok),
            "timestamp" | "double" | "float" => v.is_number().then_some(()).map_or_else(|| bad("must be a number".into()), Ok),
            "blob" => v.is_string().then_some(()).map_or_else(|| bad("must be a base64 string".into()), Ok),
            _ => Ok(()),
        }
    }

    fn check_len(&self, s: &Value, n: usize, at: &str, unit: &str) -> Result<(), ApiError> {
        if let Some(min) = s["min"].as_u64().filter(|m| (n as u64) < *m) {
            return Err(ApiError::validation(format!("{at}: at least {min} {unit} required, got {n}")));
        }
        if let Some(max) = s["max"].as_u64().filter(|m| (n as u64) > *m) {
            return Err(ApiError::validation(format!("{at}: at most {max} {unit} allowed, got {n}")));
        }
        Ok(())
    }

    /// Model patterns are ECMA-262 regexes matched anywhere in the value (not anchored).
    fn matches(&self, pattern: &str, text: &str) -> bool {
        let mut cache = self.patterns.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(pattern) {
            match regex::Regex::new(pattern) {
                Ok(r) => {
                    cache.insert(pattern.to_owned(), r);
                }
                // A pattern this engine cannot read is not enforced (none in the model today).
                Err(_) => return true,
            }
        }
        cache[pattern].is_match(text)
    }
}

fn scalar_from_text(shape: &Value, text: &str) -> Result<Value, String> {
    match shape["type"].as_str().unwrap_or("string") {
        "integer" | "long" => text.parse::<i64>().map(Value::from).map_err(|_| format!("{text:?} is not an integer")),
        "boolean" => text.parse::<bool>().map(Value::from).map_err(|_| format!("{text:?} is not true or false")),
        _ => Ok(Value::String(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_op() -> &'static Operation {
        model().operations().iter().find(|o| o.name == "RunMicrovm").unwrap()
    }

    #[test]
    fn every_operation_routes_to_itself() {
        let m = model();
        assert_eq!(m.operations().len(), 24);
        let (op, p) = m.route(&http::Method::GET, "/2025-09-09/microvms/mvm-123").unwrap();
        assert_eq!(op.name, "GetMicrovm");
        assert_eq!(p["microvmIdentifier"], "mvm-123");
        let (op, p) = m.route(&http::Method::GET, "/2017-03-31/tags/arn%3Aaws%3Alambda%3Ax").unwrap();
        assert_eq!(op.name, "ListTags");
        assert_eq!(p["Resource"], "arn:aws:lambda:x");
        assert_eq!(m.route(&http::Method::DELETE, "/2025-09-09/microvms").unwrap_err().kind, crate::error::Kind::MethodNotAllowed);
        assert_eq!(m.route(&http::Method::GET, "/nothing").unwrap_err().kind, crate::error::Kind::UnknownOperation);
        assert_eq!(m.route(&http::Method::POST, "/2025-09-09/microvm-images").unwrap().0.status, 201);
    }

    #[test]
    fn empty_path_labels_are_refused_not_routed_elsewhere() {
        let m = model();
        let e = m.route(&http::Method::GET, "/2025-09-09/microvms/").unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Validation, "{}", e.message);
        assert!(e.message.contains("microvmIdentifier"), "{}", e.message);
        let e = m.route(&http::Method::GET, "/2025-09-09/microvm-images//versions").unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Validation, "{}", e.message);
        assert_eq!(m.route(&http::Method::GET, "/2025-09-09/microvms//").unwrap_err().kind, crate::error::Kind::UnknownOperation);
        assert_eq!(m.route(&http::Method::GET, "//2025-09-09/microvms").unwrap_err().kind, crate::error::Kind::UnknownOperation);
        assert_eq!(m.route(&http::Method::GET, "/2025-09-09/microvms").unwrap().0.name, "ListMicrovms");
    }

    #[test]
    fn integers_are_held_to_the_models_width() {
        let m = model();
        let op = m.operations().iter().find(|o| o.name == "CreateMicrovmShellAuthToken").unwrap();
        let mut p = BTreeMap::new();
        p.insert("microvmIdentifier".to_owned(), "m".to_owned());
        let body = |n: i64| format!(r#"{{"expirationInMinutes":{n}}}"#);
        assert!(m.parse_input(op, &p, &[], body(i64::from(i32::MAX)).as_bytes()).is_ok());
        let e = m.parse_input(op, &p, &[], body(i64::from(i32::MAX) + 1).as_bytes()).unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Validation);
        assert!(e.message.contains("32-bit"), "{}", e.message);
        let e = m.parse_input(op, &p, &[], br#"{"expirationInMinutes":18446744073709551616}"#).unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Validation);
        let op = m.operations().iter().find(|o| o.name == "ListMicrovms").unwrap();
        let q = vec![("maxResults".to_owned(), "4294967297".to_owned())];
        assert_eq!(m.parse_input(op, &BTreeMap::new(), &q, b"").unwrap_err().kind, crate::error::Kind::Validation);
    }

    #[test]
    fn outputs_are_checked_against_the_model() {
        let m = model();
        let op = |n: &str| m.operations().iter().find(|o| o.name == n).unwrap();
        let arn = "arn:aws-hearth:lambda:hh-local-1:123456789012:microvm-image:web";
        let vm = serde_json::json!({
            "microvmId": "mvm-1", "state": "RUNNING", "endpoint": "http://x/microvms/mvm-1", "imageArn": arn,
            "imageVersion": "1", "maximumDurationInSeconds": 60, "startedAt": 1.5, "egressNetworkConnectors": ["INTERNET_EGRESS"],
        });
        m.check_output(op("GetMicrovm"), &vm).unwrap();
        let mut extra = vm.clone();
        extra["hearthEgress"] = serde_json::json!({});
        assert!(m.check_output(op("GetMicrovm"), &extra).unwrap_err().contains("hearthEgress"));
        let mut missing = vm.clone();
        missing.as_object_mut().unwrap().remove("endpoint");
        assert!(m.check_output(op("RunMicrovm"), &missing).unwrap_err().contains("endpoint"));
        let mut state = vm.clone();
        state["state"] = "ACTIVE".into();
        assert!(m.check_output(op("GetMicrovm"), &state).is_err());
        let managed = serde_json::json!({ "items": [{ "imageArn": arn, "imageVersion": "1", "createdAt": 0, "status": "ACTIVE" }] });
        assert!(m.check_output(op("ListManagedMicrovmImageVersions"), &managed).unwrap_err().contains("AVAILABLE"));
        let build = serde_json::json!({ "items": [{
            "imageArn": arn, "imageVersion": "1", "buildId": "b", "buildState": "SUCCESSFUL", "architecture": "X86_64",
            "chipset": "INTEL", "chipsetGeneration": "x86-64", "createdAt": 0, "snapshotBuild": {},
        }] });
        assert!(m.check_output(op("ListMicrovmImageBuilds"), &build).unwrap_err().contains("snapshotBuild"));
        m.check_output(op("TagResource"), &serde_json::json!({})).unwrap();
        m.check_output(op("SuspendMicrovm"), &serde_json::json!({})).unwrap();
    }

    #[test]
    fn inputs_are_checked_against_the_model() {
        let m = model();
        let op = run_op();
        let none = BTreeMap::new();
        let ok = m.parse_input(op, &none, &[], br#"{"imageIdentifier":"img","maximumDurationInSeconds":60,"clientToken":"t1"}"#).unwrap();
        assert_eq!(ok["maximumDurationInSeconds"], 60);
        let e = |body: &str| m.parse_input(op, &none, &[], body.as_bytes()).unwrap_err().message;
        assert!(e(r#"{"maximumDurationInSeconds":60}"#).contains("missing required field \"imageIdentifier\""));
        assert!(e(r#"{"imageIdentifier":"i","maximumDurationInSeconds":28801}"#).contains("above the maximum 28800"));
        assert!(e(r#"{"imageIdentifier":"i","maximumDurationInSeconds":"60"}"#).contains("must be an integer"));
        assert!(e(r#"{"imageIdentifier":"i","colour":"blue"}"#).contains("unknown or unsupported field"));
        assert!(e(r#"{"imageIdentifier":"i","idlePolicy":{"maxIdleDurationSeconds":5}}"#).contains("missing required field"));
        assert!(e(r#"{"imageIdentifier":"i","idlePolicy":{"maxIdleDurationSeconds":5,"suspendedDurationSeconds":1,"autoResumeEnabled":true,"x":1}}"#).contains("unknown field \"x\""));
        assert!(e(r#"{"imageIdentifier":""}"#).contains("at least 1"));
        assert!(e("[1]").contains("JSON object"));
        assert!(e("{").contains("not valid JSON"));
        // Unions: exactly one member.
        let op = m.operations().iter().find(|o| o.name == "CreateMicrovmAuthToken").unwrap();
        let mut p = BTreeMap::new();
        p.insert("microvmIdentifier".to_owned(), "m".to_owned());
        assert!(m.parse_input(op, &p, &[], br#"{"expirationInMinutes":5,"allowedPorts":[{"port":8080}]}"#).is_ok());
        let err = m.parse_input(op, &p, &[], br#"{"expirationInMinutes":5,"allowedPorts":[{"port":8080,"allPorts":{}}]}"#).unwrap_err();
        assert!(err.message.contains("exactly one of"), "{}", err.message);
    }

    #[test]
    fn query_parameters_are_typed_and_known() {
        let m = model();
        let op = m.operations().iter().find(|o| o.name == "ListMicrovms").unwrap();
        let none = BTreeMap::new();
        let q = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert_eq!(m.parse_input(op, &none, &q("maxResults", "7"), b"").unwrap()["maxResults"], 7);
        assert!(m.parse_input(op, &none, &q("maxResults", "seven"), b"").is_err());
        assert!(m.parse_input(op, &none, &q("maxResults", "51"), b"").is_err());
        assert!(m.parse_input(op, &none, &q("colour", "blue"), b"").unwrap_err().message.contains("no query parameter"));
    }

    proptest::proptest! {
        /// Whatever the body, parsing answers with a value or a client error: never a panic,
        /// never a server error.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let m = model();
            if let Err(e) = m.parse_input(run_op(), &BTreeMap::new(), &[], &body) {
                proptest::prop_assert!(e.status() < 500);
            }
        }

        #[test]
        fn arbitrary_json_never_panics(k in "[a-zA-Z]{1,12}", n in proptest::prelude::any::<i64>(), s in ".{0,40}") {
            let m = model();
            for body in [
                serde_json::json!({ "imageIdentifier": s.clone(), k.clone(): n }),
                serde_json::json!({ "imageIdentifier": n, "idlePolicy": { k.clone(): s.clone() } }),
                serde_json::json!({ "imageIdentifier": "x", "maximumDurationInSeconds": n }),
            ] {
                if let Err(e) = m.parse_input(run_op(), &BTreeMap::new(), &[], body.to_string().as_bytes()) {
                    proptest::prop_assert!(e.status() < 500);
                }
            }
        }
    }
}
