//! The OpenAPI description (`src/api/openapi.json`) against the real service:
//! every endpoint is called for every documented status, and each answer's
//! status, content type, required headers and JSON body are checked against
//! the schema the spec gives for that operation and status. The spec and the
//! service cannot drift apart: every documented operation must be exercised,
//! every route in the router must be documented, undocumented methods get
//! 405 and undocumented paths 404.
//!
//! The validator covers the subset of OpenAPI 3.0 schemas the spec uses
//! (type, nullable, enum, required, properties, additionalProperties, items,
//! oneOf, $ref, pattern, minimum/maximum, min/maxItems, min/maxLength and
//! format date-time, which must be RFC 3339 UTC).

mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};

use support::*;

const TOKEN: &str = "openapi-t0ken";
const MAX_BODY: usize = 1024;
/// Sources the service keeps: the test fills them up at its end.
const MAX_SOURCES: usize = 50;

fn spec() -> Value {
    let text = include_str!("../src/api/openapi.json");
    serde_json::from_str(text).expect("src/api/openapi.json is not JSON")
}

/// Validates JSON values against the spec's schemas.
struct Validator<'a> {
    spec: &'a Value,
}

impl Validator<'_> {
    fn resolve<'v>(&'v self, value: &'v Value) -> &'v Value {
        let mut value = value;
        // References may chain (a response referring to a schema...).
        for _ in 0..8 {
            let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
                return value;
            };
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local references are supported: {reference}"));
            value = self
                .spec
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling reference {reference}"));
        }
        panic!("reference chain too long");
    }

    /// Every way `value` breaks `schema`, each with its JSON path.
    fn errors(&self, schema: &Value, value: &Value, at: &str) -> Vec<String> {
        let schema = self.resolve(schema);
        let mut errors = Vec::new();
        let Some(schema_object) = schema.as_object() else {
            return vec![format!("{at}: schema is not an object: {schema}")];
        };
        for key in schema_object.keys() {
            let known = [
                "type",
                "nullable",
                "enum",
                "required",
                "properties",
                "additionalProperties",
                "items",
                "oneOf",
                "pattern",
                "minimum",
                "maximum",
                "minItems",
                "maxItems",
                "minLength",
                "maxLength",
                "format",
                "description",
                "example",
                "default",
            ];
            assert!(
                known.contains(&key.as_str()),
                "{at}: the spec uses {key}, which this validator does not know"
            );
        }
        let nullable = schema["nullable"].as_bool() == Some(true);
        if value.is_null() && nullable {
            return errors;
        }
        if let Some(options) = schema["enum"].as_array() {
            if !options.contains(value) {
                errors.push(format!("{at}: {value} is not one of {options:?}"));
            }
        }
        if let Some(choices) = schema["oneOf"].as_array() {
            let matching: Vec<usize> = choices
                .iter()
                .enumerate()
                .filter(|(_, choice)| self.errors(choice, value, at).is_empty())
                .map(|(i, _)| i)
                .collect();
            if matching.len() != 1 {
                let details: Vec<String> = choices
                    .iter()
                    .flat_map(|choice| self.errors(choice, value, at))
                    .collect();
                errors.push(format!(
                    "{at}: matches {} of oneOf's choices, not exactly one ({})",
                    matching.len(),
                    details.join("; ")
                ));
            }
        }
        let Some(kind) = schema["type"].as_str() else {
            return errors;
        };
        let type_ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            other => panic!("{at}: unknown type {other}"),
        };
        if !type_ok {
            errors.push(format!("{at}: expected {kind}, found {value}"));
            return errors;
        }
        match value {
            Value::Object(object) => {
                for name in schema["required"].as_array().into_iter().flatten() {
                    let name = name.as_str().unwrap_or_default();
                    if !object.contains_key(name) {
                        errors.push(format!("{at}: required property {name} is missing"));
                    }
                }
                let properties = schema["properties"].as_object();
                for (name, item) in object {
                    let path = format!("{at}.{name}");
                    match properties.and_then(|p| p.get(name)) {
                        Some(property) => errors.extend(self.errors(property, item, &path)),
                        None => match &schema["additionalProperties"] {
                            Value::Bool(false) => {
                                errors.push(format!("{at}: property {name} is not allowed"))
                            }
                            Value::Object(_) => errors.extend(self.errors(
                                &schema["additionalProperties"],
                                item,
                                &path,
                            )),
                            _ => {}
                        },
                    }
                }
            }
            Value::Array(items) => {
                if let Some(min) = schema["minItems"].as_u64() {
                    if (items.len() as u64) < min {
                        errors.push(format!("{at}: fewer than {min} items"));
                    }
                }
                if let Some(max) = schema["maxItems"].as_u64() {
                    if items.len() as u64 > max {
                        errors.push(format!("{at}: more than {max} items"));
                    }
                }
                if schema.get("items").is_some() {
                    for (i, item) in items.iter().enumerate() {
                        errors.extend(self.errors(&schema["items"], item, &format!("{at}[{i}]")));
                    }
                }
            }
            Value::String(text) => {
                let length = text.chars().count() as u64;
                if schema["minLength"].as_u64().is_some_and(|min| length < min) {
                    errors.push(format!("{at}: {text:?} is too short"));
                }
                if schema["maxLength"].as_u64().is_some_and(|max| length > max) {
                    errors.push(format!("{at}: {text:?} is too long"));
                }
                if let Some(pattern) = schema["pattern"].as_str() {
                    let regex = regex::Regex::new(pattern).expect("a valid pattern");
                    if !regex.is_match(text) {
                        errors.push(format!("{at}: {text:?} does not match {pattern}"));
                    }
                }
                if schema["format"].as_str() == Some("date-time") {
                    let utc = text.ends_with('Z');
                    if chrono::DateTime::parse_from_rfc3339(text).is_err() || !utc {
                        errors.push(format!("{at}: {text:?} is not an RFC 3339 UTC time"));
                    }
                }
            }
            Value::Number(number) => {
                let n = number.as_f64().unwrap_or(f64::NAN);
                if schema["minimum"].as_f64().is_some_and(|min| n < min) {
                    errors.push(format!("{at}: {n} is below the minimum"));
                }
                if schema["maximum"].as_f64().is_some_and(|max| n > max) {
                    errors.push(format!("{at}: {n} is above the maximum"));
                }
            }
            _ => {}
        }
        errors
    }

    fn check(&self, schema: &Value, value: &Value, what: &str) {
        let errors = self.errors(schema, value, "$");
        assert!(
            errors.is_empty(),
            "{what} does not match the spec:\n  {}\nvalue: {value}",
            errors.join("\n  ")
        );
    }
}

/// Sends requests to the service and checks each answer against the spec,
/// remembering which operations and statuses were exercised.
struct Exerciser<'a> {
    validator: Validator<'a>,
    base: String,
    seen: BTreeSet<(String, String, String)>,
}

struct Call<'a> {
    method: &'a str,
    path: &'a str,
    /// The spec's path template the call belongs to.
    template: &'a str,
    body: Option<&'a str>,
    token: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn get(path: &'a str) -> Call<'a> {
        Call {
            method: "GET",
            path,
            template: path.split('?').next().unwrap_or(path),
            body: None,
            token: Some(TOKEN),
        }
    }

    fn post(path: &'a str, body: &'a str) -> Call<'a> {
        Call {
            method: "POST",
            body: Some(body),
            ..Call::get(path)
        }
    }

    fn method(mut self, method: &'a str) -> Call<'a> {
        self.method = method;
        self
    }

    fn template(mut self, template: &'a str) -> Call<'a> {
        self.template = template;
        self
    }

    fn token(mut self, token: Option<&'a str>) -> Call<'a> {
        self.token = token;
        self
    }
}

fn send(base: &str, call: &Call) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let mut builder = ureq::http::Request::builder()
        .method(call.method)
        .uri(format!("{base}{}", call.path));
    if let Some(token) = call.token {
        builder = builder.header("Authorization", format!("Bearer {token}"));
    }
    let response = match call.body {
        Some(body) => agent.run(
            builder
                .header("Content-Type", "application/json")
                .body(body.to_string())
                .expect("request"),
        ),
        None => agent.run(builder.body(()).expect("request")),
    }
    .unwrap_or_else(|err| panic!("{} {}: {err}", call.method, call.path));
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = response.into_body().read_to_string().unwrap_or_default();
    Answer {
        status,
        body,
        headers,
    }
}

impl<'a> Exerciser<'a> {
    /// Sends `call`, asserts the status is `expected`, and checks the answer
    /// against the spec's response for that operation and status.
    fn expect(&mut self, call: Call, expected: u16) -> Answer {
        let answer = send(&self.base, &call);
        let what = format!("{} {} -> {}", call.method, call.path, answer.status);
        assert_eq!(answer.status, expected, "{what}: {}", answer.body);
        let template = call.template;
        // A wrong method is documented under the path's own operation.
        let operations = self.validator.spec["paths"][template]
            .as_object()
            .unwrap_or_else(|| panic!("{what}: path {template} is not in the spec"));
        let method = call.method.to_ascii_lowercase();
        let (method, operation) = match operations.get(&method) {
            Some(operation) => (method, operation),
            None if answer.status == 405 => {
                let (own, operation) = operations.iter().next().expect("an operation");
                (own.clone(), operation)
            }
            None => panic!("{what}: {method} {template} is not in the spec"),
        };
        let status = answer.status.to_string();
        let response = operation["responses"]
            .get(&status)
            .map(|r| self.validator.resolve(r))
            .unwrap_or_else(|| panic!("{what}: status {status} is not documented"));
        self.seen
            .insert((template.to_string(), method.clone(), status.clone()));

        for (name, header) in response["headers"].as_object().into_iter().flatten() {
            let value = answer.header(name);
            if header["required"].as_bool() == Some(true) {
                assert!(value.is_some(), "{what}: header {name} is missing");
            }
            if let Some(value) = value {
                // Header values are text; integers are checked as numbers.
                let schema = &header["schema"];
                let parsed = match schema["type"].as_str() {
                    Some("integer") => value
                        .parse::<i64>()
                        .map(Value::from)
                        .unwrap_or(Value::String(value.to_string())),
                    _ => Value::String(value.to_string()),
                };
                self.validator
                    .check(schema, &parsed, &format!("{what}: header {name}"));
            }
        }

        let content = response["content"].as_object();
        let content_type = answer
            .header("Content-Type")
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let Some(media) = content.and_then(|c| c.get(&content_type)) else {
            panic!(
                "{what}: content type {content_type:?} is not documented (documented: {:?})",
                content.map(|c| c.keys().collect::<Vec<_>>())
            );
        };
        if content_type == "application/json" {
            let body: Value = serde_json::from_str(&answer.body)
                .unwrap_or_else(|err| panic!("{what}: body is not JSON ({err}): {}", answer.body));
            self.validator
                .check(&media["schema"], &body, &format!("{what}: body"));
        }
        answer
    }

    /// An undocumented path answers 404 with the common error shape.
    fn expect_unknown(&mut self, method: &str, path: &str) {
        let call = Call {
            method,
            path,
            template: path,
            body: None,
            token: Some(TOKEN),
        };
        let answer = send(&self.base, &call);
        assert_eq!(answer.status, 404, "{method} {path}: {}", answer.body);
        assert!(answer
            .header("Content-Type")
            .unwrap_or("")
            .starts_with("application/json"));
        let error = self.validator.spec["components"]["schemas"]["Error"].clone();
        self.validator
            .check(&error, &answer.json(), &format!("{method} {path} -> 404"));
    }
}

/// The paths the router matches, read from its source: string literals that
/// start with a slash in `src/api/mod.rs`'s `route`, plus the `/sources/`
/// prefix, which the spec spells `/sources/{name}`.
fn routed_paths() -> BTreeSet<String> {
    let source = include_str!("../src/api/mod.rs");
    let start = source
        .find("fn route(")
        .expect("src/api/mod.rs has a route function");
    let body = &source[start..];
    let end = body.find("\n}\n").unwrap_or(body.len());
    let body = &body[..end];
    let mut paths = BTreeSet::new();
    for piece in body.split('"').skip(1).step_by(2) {
        if piece.starts_with('/') && !piece.contains(' ') {
            let path = if piece == "/sources/" {
                "/sources/{name}".to_string()
            } else {
                piece.to_string()
            };
            paths.insert(path);
        }
    }
    paths
}

#[test]
fn every_endpoint_answers_as_the_openapi_spec_says() {
    let spec = spec();
    assert_eq!(spec["openapi"], "3.0.3");
    let pool = populated_service(&format!(
        "api_token = {TOKEN}\nmax_body_bytes = {MAX_BODY}\n[state]\nmax_sources = {MAX_SOURCES}"
    ));
    let service = &pool.service;
    let mut ex = Exerciser {
        validator: Validator { spec: &spec },
        base: format!("http://{}", service.addr),
        seen: BTreeSet::new(),
    };

    // get-proxy: one, several, text, nothing eligible, bad parameters.
    let one = ex
        .expect(Call::get("/get-proxy?source=openapi"), 200)
        .json();
    let proxy = one["proxy"].as_str().expect("a proxy URL").to_string();
    let several = ex
        .expect(Call::get("/get-proxy?source=openapi&count=5"), 200)
        .json();
    assert_eq!(several["proxies"].as_array().map(Vec::len), Some(5));
    let text = ex.expect(
        Call::get("/get-proxy?source=openapi&count=3&format=text"),
        200,
    );
    assert_eq!(text.body.lines().count(), 3, "{}", text.body);
    ex.expect(
        Call::get("/get-proxy?source=openapi&protocol=socks5&https=true&max_latency_ms=5000"),
        200,
    );
    let none = ex.expect(Call::get("/get-proxy?source=openapi&country=ZZ"), 503);
    assert_eq!(none.json()["reason"], "no_match");
    ex.expect(Call::get("/get-proxy?source=openapi&count=0"), 400);
    ex.expect(Call::get("/get-proxy?count=2"), 400);
    ex.expect(Call::get("/get-proxy?source=bad%20name"), 400);
    ex.expect(Call::get("/get-proxy?source=openapi&colour=red"), 400);

    // feedback: object, array, unknown proxy, malformed, too large.
    let request_schema = json!({"$ref": "#/components/schemas/FeedbackRequest"});
    let item = json!({"source": "openapi", "proxy": proxy, "success": true});
    let batch =
        json!([item, {"source": "openapi", "proxy": "http://127.0.0.1:1", "success": false}]);
    for body in [&item, &batch] {
        ex.validator
            .check(&request_schema, body, "a valid feedback request");
        ex.expect(Call::post("/feedback", &body.to_string()), 200);
    }
    let answers = ex
        .expect(Call::post("/feedback", &batch.to_string()), 200)
        .json();
    assert!(answers[1]["error"].is_string(), "{answers}");
    let unknown = json!({"source": "openapi", "proxy": "http://127.0.0.1:1", "success": true});
    ex.expect(Call::post("/feedback", &unknown.to_string()), 404);
    for bad in [
        json!({"source": "openapi", "proxy": proxy}),
        json!({"source": "openapi", "proxy": proxy, "success": "yes"}),
        json!([]),
        json!("true"),
    ] {
        assert!(
            !ex.validator.errors(&request_schema, &bad, "$").is_empty(),
            "the spec accepts {bad}, which the service refuses"
        );
        ex.expect(Call::post("/feedback", &bad.to_string()), 400);
    }
    ex.expect(Call::post("/feedback", "{not json"), 400);
    // max_body_bytes holds for /feedback as for every endpoint.
    let huge = format!(
        r#"{{"source":"openapi","proxy":"{proxy}","success":true,"pad":"{}"}}"#,
        "x".repeat(MAX_BODY)
    );
    ex.expect(Call::post("/feedback", &huge), 413);

    // Figures and the rest.
    ex.expect(Call::get("/health"), 200);
    let stats = ex.expect(Call::get("/stats"), 200).json();
    assert!(stats["validation"]["last_cycle"].is_object(), "{stats}");
    assert!(!stats["lists"].as_array().unwrap().is_empty());
    ex.expect(Call::get("/stats?verbose=1"), 400);
    let view = ex
        .expect(
            Call::get("/sources/openapi?limit=3").template("/sources/{name}"),
            200,
        )
        .json();
    assert!(!view["proxies"].as_array().unwrap().is_empty(), "{view}");
    ex.expect(
        Call::get("/sources/never-asked").template("/sources/{name}"),
        404,
    );
    ex.expect(
        Call::get("/sources/openapi?limit=0").template("/sources/{name}"),
        400,
    );
    for bad in ["/sources/bad%20name", "/sources/"] {
        ex.expect(Call::get(bad).template("/sources/{name}"), 400);
    }
    let metrics = ex.expect(Call::get("/metrics"), 200);
    assert!(metrics.body.contains("# TYPE"), "{}", metrics.body);
    let judge = ex.expect(Call::get("/judge?a=1&a=2&b=x"), 200).json();
    assert_eq!(judge["args"]["a"], json!(["1", "2"]), "{judge}");
    ex.expect(Call::post("/admin/snapshot", ""), 202);
    ex.expect(Call::post("/admin/fetch", ""), 202);
    ex.expect(Call::post("/admin/validate", ""), 202);
    let page = ex.expect(Call::get("/"), 200);
    assert!(page.body.contains("<title>proxy-pool</title>"));
    let served = ex.expect(Call::get("/openapi.json"), 200).json();
    assert_eq!(served, spec, "GET /openapi.json serves another document");

    let paths: Vec<(String, Vec<String>)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, ops)| {
            (
                path.clone(),
                ops.as_object().unwrap().keys().cloned().collect(),
            )
        })
        .collect();
    let concrete = |template: &str| template.replace("{name}", "openapi");

    // The token: documented as public (`security: []`) exactly when the
    // service answers without it.
    for (template, methods) in &paths {
        for method in methods {
            let operation = &spec["paths"][template][method];
            let public = operation["security"].as_array().is_some_and(Vec::is_empty);
            let path = concrete(template);
            let call = Call::get(&path)
                .template(template)
                .method(if method == "post" { "POST" } else { "GET" })
                .token(None);
            if public {
                let answer = send(&ex.base, &call);
                assert_ne!(answer.status, 401, "{template} is documented as public");
            } else {
                let answer = ex.expect(call, 401);
                assert_eq!(answer.header("WWW-Authenticate"), Some("Bearer"));
                let wrong = Call::get(&path)
                    .template(template)
                    .method(if method == "post" { "POST" } else { "GET" })
                    .token(Some("wrong"));
                ex.expect(wrong, 401);
            }
        }
    }

    // Undocumented methods on documented paths: 405, with the allowed one.
    for (template, methods) in &paths {
        let path = concrete(template);
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if methods.contains(&method.to_ascii_lowercase()) {
                continue;
            }
            let body = (method != "GET").then_some("{}");
            let call = Call {
                method,
                path: &path,
                template,
                body,
                token: Some(TOKEN),
            };
            let answer = ex.expect(call, 405);
            let allow = answer.header("Allow").unwrap_or("").to_ascii_lowercase();
            assert!(
                methods.contains(&allow),
                "{method} {template}: Allow is {allow:?}, the spec has {methods:?}"
            );
        }
    }

    // Undocumented paths: 404.
    for path in [
        "/nope",
        "/admin",
        "/admin/restart",
        "/sources",
        "/get-proxy/x",
        "/stats/x",
        "/favicon.ico",
        "/docs",
    ] {
        ex.expect_unknown("GET", path);
    }
    ex.expect_unknown("POST", "/admin/");

    // New sources past max_sources: 503 on get-proxy and on feedback.
    let mut refused = None;
    for i in 0..=MAX_SOURCES {
        let path = format!("/get-proxy?source=filler{i}");
        let answer = send(&ex.base, &Call::get(&path).template("/get-proxy"));
        if answer.status == 503 {
            refused = Some(i);
            break;
        }
    }
    let refused = refused.expect("a new source past max_sources is refused");
    let path = format!("/get-proxy?source=filler{refused}");
    let answer = ex.expect(Call::get(&path).template("/get-proxy"), 503);
    assert_eq!(
        answer.json()["reason"],
        "too_many_sources",
        "{}",
        answer.body
    );
    let body = format!(r#"{{"source":"filler{refused}","proxy":"{proxy}","success":true}}"#);
    ex.expect(Call::post("/feedback", &body), 503);

    // The router's paths and the spec's are the same set.
    let documented: BTreeSet<String> = paths.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(
        routed_paths(),
        documented,
        "src/api/mod.rs routes and openapi.json paths differ"
    );

    // Every documented operation and status was exercised, except the 503s
    // a healthy service with every component running cannot give.
    let cannot_happen: &[(&str, &str, &str)] = &[
        ("/admin/snapshot", "post", "503"),
        ("/admin/fetch", "post", "503"),
        ("/admin/validate", "post", "503"),
    ];
    let mut missing = Vec::new();
    for (template, methods) in &paths {
        for method in methods {
            let responses = spec["paths"][template][method]["responses"]
                .as_object()
                .unwrap();
            for status in responses.keys() {
                let key = (template.clone(), method.clone(), status.clone());
                let excused = cannot_happen
                    .iter()
                    .any(|(p, m, s)| p == template && m == method && s == status);
                if !ex.seen.contains(&key) && !excused {
                    missing.push(format!("{method} {template} {status}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "documented but never exercised: {missing:?}"
    );
}

#[test]
fn the_validator_rejects_what_the_spec_forbids() {
    // Guards the test above: a checker that accepts everything proves nothing.
    let spec = spec();
    let validator = Validator { spec: &spec };
    let pick = json!({"$ref": "#/components/schemas/Pick"});
    let good = json!({"source": "a", "proxy": "http://1.2.3.4:80", "protocol": "http",
        "ip": "1.2.3.4", "port": 80, "latency_ms": null, "anonymity": null, "country": null,
        "score": 0, "last_validated_at": "2026-11-22T12:00:00Z"});
    assert!(validator.errors(&pick, &good, "$").is_empty());
    let mut bad = good.clone();
    bad["port"] = json!(0);
    assert!(!validator.errors(&pick, &bad, "$").is_empty());
    let mut bad = good.clone();
    bad["protocol"] = json!("ftp");
    assert!(!validator.errors(&pick, &bad, "$").is_empty());
    let mut bad = good.clone();
    bad["last_validated_at"] = json!("2026-11-22 12:00:00");
    assert!(!validator.errors(&pick, &bad, "$").is_empty());
    let mut bad = good.clone();
    bad["last_validated_at"] = json!("2026-11-22T12:00:00+01:00");
    assert!(!validator.errors(&pick, &bad, "$").is_empty());
    let mut bad = good.clone();
    bad.as_object_mut().unwrap().remove("score");
    assert!(!validator.errors(&pick, &bad, "$").is_empty());
    let mut bad = good.clone();
    bad["latency_ms"] = json!(1.5);
    assert!(!validator.errors(&pick, &bad, "$").is_empty());
    let mut bad = good;
    bad["source"] = json!("has space");
    assert!(!validator.errors(&pick, &bad, "$").is_empty());
    let answer = json!({"$ref": "#/components/schemas/FeedbackBatchAnswer"});
    assert!(validator
        .errors(
            &answer,
            &json!([{"error": "unknown proxy", "source": "a"}]),
            "$"
        )
        .is_empty());
    assert!(!validator
        .errors(&answer, &json!([{"score": 1}]), "$")
        .is_empty());
}
