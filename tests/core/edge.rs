//! The HTTP edge under abuse: oversized bodies refused from the header, cross-site requests
//! refused, the token's scheme in any case, readiness probes that do not cost a query each.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use spool::api::{self, AppState, AttachLimits, EdgePolicy};
use spool::executor::Metrics;
use spool::Registry;

use crate::common::process::{Binary, SpoolProcess};
use crate::common::TestDb;

/// Serves the API on 127.0.0.1 (port 0) with the loopback defaults; returns its address.
async fn serve(db: &TestDb, token: Option<&str>) -> (std::net::SocketAddr, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let state = AppState {
        pool: db.pool.clone(),
        registry: Registry::with_builtins(),
        api_token: token.map(Arc::from),
        metrics: metrics.clone(),
        max_body_bytes: 4096,
        live: None,
        readiness: Default::default(),
        edge: Arc::new(EdgePolicy::loopback()),
        attach: Arc::new(AttachLimits::new(10, 10, Duration::from_secs(15))),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    (addr, metrics)
}

async fn runs(db: &TestDb) -> i64 {
    db.scalar_i64("select count(*) from spool.runs").await
}

#[tokio::test]
async fn a_content_length_above_the_limit_is_refused_before_the_body_is_sent() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db, None).await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/runs HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 5000000000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // no body follows: the answer must come from the header alone
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut head))
        .await
        .expect("an answer without the body")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    assert_eq!(runs(&db).await, 0);
}

#[tokio::test]
async fn cross_site_requests_are_refused_and_enqueue_nothing() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db, None).await;
    let base = format!("http://{addr}");
    let body = json!({"workflow": "noop", "input": {}}).to_string();
    let client = reqwest::Client::new();

    // a page may send text/plain across sites without asking: refused
    let res = client
        .post(format!("{base}/v1/runs"))
        .header("content-type", "text/plain")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // a foreign page's origin: refused
    let res = client
        .post(format!("{base}/v1/runs"))
        .header("content-type", "application/json")
        .header("origin", "http://evil.example")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);

    // DNS rebinding: the page's own host name pointing at 127.0.0.1 — reading runs is refused
    let res = client
        .get(format!("{base}/v1/runs"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(runs(&db).await, 0, "nothing was enqueued");

    // the server's own origin, and clients that send none, are served
    let res = client
        .post(format!("{base}/v1/runs"))
        .header("content-type", "application/json")
        .header("origin", base.clone())
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "{:?}", res.text().await);
    let res = client
        .post(format!("{base}/v1/runs"))
        .json(&json!({"workflow": "noop", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(runs(&db).await, 2);
}

#[tokio::test]
async fn the_bearer_scheme_is_accepted_in_any_case() {
    let db = TestDb::new().await;
    let token = "0123456789abcdef0123456789abcdef";
    let (addr, _) = serve(&db, Some(token)).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let res = reqwest::Client::new()
            .get(format!("http://{addr}/v1/runs"))
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{scheme}");
    }
    for wrong in [
        format!("Basic {token}"),
        format!("Bearer {token}x"),
        "Bearer".to_string(),
    ] {
        let res = reqwest::Client::new()
            .get(format!("http://{addr}/v1/runs"))
            .header("authorization", wrong.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{wrong}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_readiness_probes_shares_one_database_check() {
    let db = TestDb::new().await;
    let (addr, metrics) = serve(&db, None).await;
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/readyz");
    let mut answered = 0;
    for _ in 0..10 {
        let batch = (0..100).map(|_| {
            let (client, url) = (client.clone(), url.clone());
            async move { client.get(url).send().await.unwrap().status() }
        });
        for status in futures::future::join_all(batch).await {
            assert_eq!(status, StatusCode::OK);
            answered += 1;
        }
    }
    let checks = metrics.readiness_checks.load(Ordering::Relaxed);
    // one check a second is shared by every probe: 1,000 probes take far less than 10 s here
    assert!(
        checks <= 10,
        "{answered} probes made {checks} database checks"
    );
}

/// An API-only `spool serve` (no executor) with `env`, started with a soft open-file limit of
/// `files` when set.
async fn api_process(db: &TestDb, env: &[(&str, &str)], files: Option<u64>) -> SpoolProcess {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let before = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if let Some(n) = files {
        // the child inherits the soft limit (restored for this process right after)
        setrlimit(Resource::RLIMIT_NOFILE, n, before.1).unwrap();
    }
    let p = SpoolProcess::spawn_with_args(Binary::Spool, db, "api", env, &["--api-only"]);
    setrlimit(Resource::RLIMIT_NOFILE, before.0, before.1).unwrap();
    p.wait_http().await;
    p
}

/// Reads until the server closes the connection; false if it is still open at the deadline.
async fn closed_by_server(conn: &mut tokio::net::TcpStream, deadline: Duration) -> bool {
    let mut sink = [0u8; 1024];
    tokio::time::timeout(deadline, async {
        loop {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_no_whole_head_in_time_are_closed_but_attach_streams_are_not() {
    let db = TestDb::new().await;
    let nats = crate::common::nats::NatsServer::start().await;
    let env = [
        ("SPOOL_HEADER_TIMEOUT_MS", "300"),
        ("SPOOL_KEEPALIVE_MS", "700"),
        ("NATS_URL", &nats.url()),
        ("SPOOL_NATS_STREAM", &format!("S_{}", db.name)),
        ("SPOOL_NATS_SUBJECT_PREFIX", &format!("out_{}", db.name)),
    ];
    let api = api_process(&db, &env, None).await;
    let addr = api.url("").trim_start_matches("http://").to_string();
    db.exec("insert into spool.runs (id, workflow, status, executor_id, claim_epoch, attempt) values ('long', 'ticker', 'running', 'gone', 1, 1)").await;

    let mut partial = tokio::net::TcpStream::connect(&addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut attach = tokio::net::TcpStream::connect(&addr).await.unwrap();
    attach
        .write_all(b"GET /v1/runs/long/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();

    assert!(
        closed_by_server(&mut partial, Duration::from_secs(20)).await,
        "a connection stuck in its head is closed"
    );
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(20)).await,
        "a connection that never sends a request is closed"
    );
    // the attach stream outlives many header timeouts: three keep-alive comments arrive
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        while seen
            .windows(3)
            .filter(|w| w == b"\n:\n" || w == b"\n: ")
            .count()
            < 3
        {
            let n = attach.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the attach stream was closed: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("keep-alive comments on the open attach stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_health_and_the_api_keep_answering() {
    let db = TestDb::new().await;
    // started with 256 open files (fewer than the connections below) and a cap of 64
    let env = [
        ("SPOOL_HEADER_TIMEOUT_MS", "600000"),
        ("SPOOL_MAX_CONNECTIONS", "64"),
    ];
    let api = api_process(&db, &env, Some(256)).await;
    let addr = api.url("").trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for i in 0..400 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if i % 4 != 0 {
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .await
                .unwrap();
        }
        held.push(c);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let health = client
        .get(api.url("/healthz"))
        .send()
        .await
        .expect("health answers");
    assert_eq!(health.status(), StatusCode::OK);
    let enqueued = client
        .post(api.url("/v1/runs"))
        .json(&json!({"workflow": "noop", "input": {}}))
        .send()
        .await
        .expect("enqueue answers");
    assert_eq!(enqueued.status(), StatusCode::CREATED);
    assert_eq!(runs(&db).await, 1);
    let metrics = client
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let evicted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("spool_http_connections_evicted_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(evicted > 0, "{metrics}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_in_nats_url_and_database_url_never_reach_the_log() {
    let db = TestDb::new().await;
    // nothing listens on port 1: the NATS client keeps reconnecting, and logs each attempt
    let nats_url = "nats://spool:NATS-PASSWORD-1@127.0.0.1:1";
    let database_url = db.url.replacen("postgres@", "postgres:DB-PASSWORD-2@", 1);
    assert_ne!(database_url, db.url);
    let env = [
        ("RUST_LOG", "debug"),
        ("NATS_URL", nats_url),
        ("DATABASE_URL", database_url.as_str()),
    ];
    let api = api_process(&db, &env, None).await;
    crate::common::wait_until(
        "reconnect attempts to be logged",
        Duration::from_secs(30),
        || async { (api.log_text().matches("127.0.0.1:1").count() >= 3).then_some(()) },
    )
    .await;
    let log = api.log_text();
    for secret in ["NATS-PASSWORD-1", "DB-PASSWORD-2"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// The compose example refuses to start without a token and publishes the API on loopback only.
#[test]
fn the_compose_file_needs_a_token_and_publishes_on_loopback() {
    let compose =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
            .unwrap();
    let token = compose
        .lines()
        .find(|l| l.trim_start().starts_with("SPOOL_API_TOKEN:"))
        .expect("a token setting");
    assert!(token.contains("${SPOOL_API_TOKEN:?"), "{token}");
    let ports: Vec<&str> = compose
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("- \"") && l.ends_with(":8080\""))
        .collect();
    assert_eq!(ports.len(), 3, "{ports:?}");
    for port in ports {
        assert!(port.starts_with("- \"127.0.0.1:"), "{port}");
    }
    // and spool itself refuses the value the file used to default to
    assert!(spool::config::check_token("change-me").is_err());
}
