//! `GET /v1/openapi.json` held to the server that serves it:
//!
//! - the document is valid OpenAPI, by `openapi-spec-validator` (PyPI; `just test` installs it),
//!   a validator nobody here wrote;
//! - every route the router serves is in it (the list below, which a scan of the router's source
//!   keeps complete), and every operation in it is served;
//! - the token check and the host check answer exactly where the document says they do;
//! - real responses — successes and errors, JSON and Server-Sent Events — have a status the
//!   document lists for that operation, its content type, and validate against its schema (by
//!   the `jsonschema` crate, with every object closed to fields the document does not name).

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use spool::api::{self, AppState, AttachLimits};
use spool::executor::Metrics;
use spool::live::LiveOutput;
use spool::Registry;

use crate::common::TestDb;

mod check;
mod responses;

/// Every route of `api::router` (with `ui::routes` and `openapi::routes`), as the document
/// names it. A route added to the router belongs here: the source scan below fails until it is.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/runs"),
    ("GET", "/v1/runs"),
    ("GET", "/v1/runs/{id}"),
    ("GET", "/v1/runs/{id}/steps"),
    ("POST", "/v1/runs/{id}/cancel"),
    ("GET", "/v1/runs/{id}/stream"),
    ("GET", "/v1/keys/{key}/stream"),
    ("GET", "/v1/counts"),
    ("GET", "/v1/executors"),
    ("GET", "/v1/queues"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/"),
    ("GET", "/ui"),
    ("GET", "/ui/"),
    ("GET", "/ui/app.js"),
    ("GET", "/ui/app.css"),
    ("GET", "/ui/session"),
    ("POST", "/ui/session"),
    ("DELETE", "/ui/session"),
];

const TOKEN: &str = "openapi-test-token-0123456789";

async fn serve(db: &TestDb, token: Option<&str>, live: Option<Arc<LiveOutput>>) -> String {
    let state = AppState {
        pool: db.pool.clone(),
        registry: Registry::with_builtins(),
        api_token: token.map(Arc::from),
        metrics: Arc::new(Metrics::default()),
        max_body_bytes: 64 * 1024,
        live,
        readiness: Default::default(),
        edge: Arc::new(api::EdgePolicy::loopback()),
        attach: Arc::new(AttachLimits::new(100, 100, Duration::from_secs(15))),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    format!("http://{addr}")
}

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The document, fetched without any credentials (it needs none, even from a server with a
/// token).
async fn fetch_document(base: &str) -> Value {
    let res = client()
        .get(format!("{base}{}", api::openapi::PATH))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "served without a token");
    assert_eq!(essence(&res), "application/json");
    res.json().await.unwrap()
}

fn essence(res: &reqwest::Response) -> String {
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    ct.split(';').next().unwrap().trim().to_ascii_lowercase()
}

/// Every (method, path) the document describes.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    ops
}

fn operation<'d>(doc: &'d Value, method: &str, path: &str) -> &'d Value {
    let op = &doc["paths"][path][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {path} is not in the document");
    op
}

#[tokio::test]
async fn the_document_is_valid_openapi_by_an_outside_validator() {
    let db = TestDb::new().await;
    let base = serve(&db, Some(TOKEN), None).await;
    let doc = fetch_document(&base).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("openapi-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = Command::new("openapi-spec-validator")
        .arg(&file)
        .output()
        .expect("openapi-spec-validator (pip install openapi-spec-validator; `just test` does)");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_file(&file);
    let report: String = report.chars().take(4000).collect();
    assert!(out.status.success(), "openapi-spec-validator: {report}");
    assert!(report.contains("OK"), "{report}");
}

/// The route paths the router's source declares: every `.route("…"` (or `.route(PATH`).
fn routes_in_source() -> BTreeSet<String> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut paths = BTreeSet::new();
    for file in ["src/api/mod.rs", "src/ui/mod.rs", "src/api/openapi.rs"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (_, rest) in text
            .match_indices(".route(")
            .map(|(i, _)| text.split_at(i + 7))
        {
            let rest = rest.trim_start();
            if let Some(literal) = rest.strip_prefix('"') {
                paths.insert(literal[..literal.find('"').unwrap()].to_string());
            } else if rest.starts_with("PATH") {
                paths.insert(api::openapi::PATH.to_string());
            } else {
                panic!(
                    "{file}: a route whose path this scan cannot read: {}",
                    &rest[..40]
                );
            }
        }
    }
    paths
}

/// An operation's path with its parameters filled in, so that the request reaches the handler.
fn concrete(path: &str, run_id: &str) -> String {
    path.replace("{id}", run_id).replace("{key}", "k1")
}

/// Sends `method` to `path`, with a JSON body for the methods that take one.
async fn request(
    base: &str,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client().request(method.clone(), format!("{base}{path}"));
    if method == Method::POST {
        req = req.header("content-type", "application/json").body("{}");
    }
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented_and_every_documented_route_is_served_as_documented() {
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let listed: BTreeSet<String> = routes.iter().map(|(_, p)| p.clone()).collect();
    for path in routes_in_source() {
        assert!(
            listed.contains(&path),
            "the router serves {path}: add it to ROUTES"
        );
    }

    let db = TestDb::new().await;
    let base = serve(&db, Some(TOKEN), None).await;
    let doc = fetch_document(&base).await;
    let ops = documented(&doc);
    let missing: Vec<_> = routes.difference(&ops).collect();
    assert!(
        missing.is_empty(),
        "served but not in the document: {missing:?}"
    );

    let auth = format!("Bearer {TOKEN}");
    let enqueued = request(&base, "POST", "/v1/runs", &[("authorization", &auth)]).await;
    assert_eq!(
        enqueued.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "no workflow"
    );
    db.exec("insert into spool.runs (id, workflow) values ('oa-1', 'noop')")
        .await;

    for (method, path) in &ops {
        let op = operation(&doc, method, path);
        let url = concrete(path, "oa-1");
        // served: neither the fallback's 404 nor a 405
        let res = request(&base, method, &url, &[("authorization", &auth)]).await;
        let status = res.status();
        let body = res.bytes().await.unwrap_or_default();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !String::from_utf8_lossy(&body).contains("no such endpoint"),
            "{method} {path} is documented but not served"
        );
        // the token: asked for exactly where the document has a security requirement
        let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
        let res = request(&base, method, &url, &[]).await;
        if secured {
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
            assert!(
                op["responses"]["401"].is_object(),
                "{method} {path}: 401 listed"
            );
        } else {
            assert_ne!(
                res.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} needs no token"
            );
        }
        // the host check: wherever the document lists 421, and nowhere else
        let res = request(
            &base,
            method,
            &url,
            &[("authorization", &auth), ("host", "evil.example")],
        )
        .await;
        if op["responses"]["421"].is_object() {
            assert_eq!(
                res.status(),
                StatusCode::MISDIRECTED_REQUEST,
                "{method} {path}"
            );
        } else {
            assert_ne!(
                res.status(),
                StatusCode::MISDIRECTED_REQUEST,
                "{method} {path}"
            );
        }
    }
}
