//! Checks a response against the document: its status is one the operation lists, its content
//! type is the listed one, and its JSON validates against the listed schema.

use reqwest::Method;
use serde_json::{json, Value};

use super::{client, essence, operation};

/// Validates real responses against the document.
pub(super) struct Checker {
    pub(super) base: String,
    pub(super) doc: Value,
    /// The document's components with every object closed (`additionalProperties: false`
    /// wherever it names properties and says nothing of others): a field a response carries
    /// that the document does not name fails the check, as does one it names as required.
    components: Value,
}

fn close_objects(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.get("properties").is_some_and(Value::is_object)
                && !map.contains_key("additionalProperties")
            {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

impl Checker {
    pub(super) fn new(base: &str, doc: Value) -> Self {
        let mut components = doc["components"].clone();
        close_objects(&mut components);
        Self {
            base: base.to_string(),
            doc,
            components,
        }
    }

    /// `value` against `schema` (which may `$ref` the components); panics naming every error.
    pub(super) fn validate(&self, what: &str, schema: &Value, value: &Value) {
        let mut schema = schema.clone();
        close_objects(&mut schema);
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.components,
            "allOf": [schema],
        });
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("{what}: the schema does not compile: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{what}: {errors:#?}\nin {value:#}");
    }

    /// Checks a response of `method path` (the document's path template): its status is
    /// listed, its content type is the listed one, a JSON body validates. Returns the body.
    pub(super) async fn check(&self, method: &str, path: &str, res: reqwest::Response) -> Value {
        let what = format!("{method} {path} → {}", res.status().as_u16());
        let op = operation(&self.doc, method, path);
        let response = &op["responses"][res.status().as_str()];
        assert!(
            response.is_object(),
            "{what}: the document does not list this status"
        );
        let essence = essence(&res);
        let body = res.bytes().await.unwrap();
        let Some(content) = response["content"].as_object() else {
            assert!(
                body.is_empty(),
                "{what}: a body the document does not describe"
            );
            return Value::Null;
        };
        let media = content.get(&essence).unwrap_or_else(|| {
            panic!(
                "{what}: content type {essence:?}, documented: {:?}",
                content.keys()
            )
        });
        if essence != "application/json" {
            return Value::String(String::from_utf8(body.to_vec()).unwrap());
        }
        let value: Value = serde_json::from_slice(&body).unwrap();
        self.validate(&what, &media["schema"], &value);
        value
    }

    /// Sends `op` ("METHOD /path/{template}") to `url` with a JSON `body`, asserts it answers
    /// `status`, checks the response and returns its body.
    pub(super) async fn call(
        &self,
        status: u16,
        op: &str,
        url: &str,
        body: Option<Value>,
    ) -> Value {
        let (method, path) = op.split_once(' ').unwrap();
        let mut req = client().request(
            Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{url}", self.base),
        );
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        let got = res.status();
        let value = self.check(method, path, res).await;
        assert_eq!(got.as_u16(), status, "{op} ({url}): {value}");
        value
    }
}

/// One Server-Sent Event: its id, name and data line.
pub(super) fn sse_events(text: &str) -> Vec<(String, String, String)> {
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
        for line in block.lines().filter(|l| !l.starts_with(':')) {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_string();
            match field {
                "id" => id = value,
                "event" => event = value,
                "data" => data = value,
                _ => {}
            }
        }
        if !event.is_empty() {
            events.push((id, event, data));
        }
    }
    events
}
