//! The web view in a real browser: Debian's Chromium, headless, driven over the Chrome DevTools
//! Protocol (the `chromiumoxide` client), against real `spool serve` processes, a real
//! nats-server and PostgreSQL. Accessibility is checked by axe-core (npm), a checker nobody here
//! wrote. Each test saves screenshots under `target/spool-test/screenshots/`.

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod chat;
mod views;

use std::path::PathBuf;
use std::time::Duration;

use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::network::EventRequestWillBeSent;
use chromiumoxide::cdp::js_protocol::runtime::EvaluateParams;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig, Page};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::{Arc, Mutex};

use common::nats::NatsServer;
use common::process::{Binary, SpoolProcess};
use common::{wait_until, TestDb};

/// A headless Chromium of this test's own (own profile, so own cookies and storage).
pub struct Chrome {
    browser: Browser,
    handler: tokio::task::JoinHandle<()>,
    profile: PathBuf,
}

impl Chrome {
    pub async fn launch() -> Chrome {
        let exe =
            std::env::var("SPOOL_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            std::path::Path::new(&exe).exists(),
            "{exe} is missing: `just test` installs Debian's chromium package"
        );
        let profile = std::env::temp_dir().join(format!("spool-ui-{}", uuid::Uuid::new_v4()));
        let config = BrowserConfig::builder()
            .chrome_executable(exe)
            .no_sandbox()
            .new_headless_mode()
            .user_data_dir(&profile)
            .window_size(1280, 900)
            .viewport(None)
            .arg("--disable-gpu")
            .arg("--disable-dev-shm-usage")
            .launch_timeout(Duration::from_secs(60))
            .request_timeout(Duration::from_secs(60))
            .build()
            .expect("browser config");
        let (browser, mut handler) = Browser::launch(config).await.expect("launch chromium");
        // the protocol's messages are read by this task; a message this client cannot decode (a
        // newer Chromium's) is skipped, not fatal
        let handler = tokio::spawn(async move { while handler.next().await.is_some() {} });
        Chrome {
            browser,
            handler,
            profile,
        }
    }

    pub async fn page(&self, url: &str) -> Page {
        let page = self.browser.new_page(url).await.expect("open page");
        page.wait_for_navigation().await.expect("page loads");
        page
    }

    /// A blank page, to listen to before navigating.
    pub async fn browser_page(&self) -> Page {
        self.browser
            .new_page("about:blank")
            .await
            .expect("open page")
    }

    pub async fn close(mut self) {
        let _ = self.browser.close().await;
        let _ = self.browser.wait().await;
        self.handler.abort();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Evaluates `js` (an expression; a promise is awaited) and returns its JSON value.
pub async fn eval<T: DeserializeOwned>(page: &Page, js: &str) -> T {
    let params = EvaluateParams::builder()
        .expression(js)
        .await_promise(true)
        .return_by_value(true)
        .build()
        .expect("evaluate params");
    let result = page
        .evaluate_expression(params)
        .await
        .unwrap_or_else(|e| panic!("evaluate {js}: {e}"));
    // `undefined` comes back as no value: read it as null
    let value = result.value().cloned().unwrap_or(Value::Null);
    serde_json::from_value(value).unwrap_or_else(|e| panic!("value of {js}: {e}"))
}

/// Polls `js` until it yields something other than `null` (or `false`), failing after 30 s.
pub async fn wait_js(page: &Page, what: &str, js: &str) -> Value {
    wait_until(what, Duration::from_secs(30), || async {
        let v: Value = eval(page, js).await;
        (!v.is_null() && v != Value::Bool(false)).then_some(v)
    })
    .await
}

/// The page's text content of the first element matching `selector` ("" when none).
pub async fn text_of(page: &Page, selector: &str) -> String {
    eval(
        page,
        &format!(
            "document.querySelector({})?.textContent ?? ''",
            serde_json::to_string(selector).unwrap()
        ),
    )
    .await
}

/// Saves a full-page screenshot as `target/spool-test/screenshots/{name}.png`.
pub async fn screenshot(page: &Page, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/spool-test/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    page.save_screenshot(ScreenshotParams::builder().full_page(true).build(), &path)
        .await
        .expect("screenshot");
    path
}

/// Renders the page as a phone would (390 CSS px wide).
pub async fn phone_width(page: &Page) {
    page.execute(SetDeviceMetricsOverrideParams::new(390, 844, 2.0, true))
        .await
        .expect("device metrics");
}

/// Every URL the page requests from now on.
pub async fn record_requests(page: &Page) -> Arc<Mutex<Vec<String>>> {
    let urls = Arc::new(Mutex::new(Vec::new()));
    let mut events = page
        .event_listener::<EventRequestWillBeSent>()
        .await
        .expect("network events");
    let sink = urls.clone();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            sink.lock().unwrap().push(e.request.url.clone());
        }
    });
    urls
}

/// Runs axe-core (from npm, installed by `just test`) on the page and returns its WCAG 2 A/AA
/// violations as `"rule: target"` lines.
pub async fn accessibility_violations(page: &Page) -> Vec<String> {
    let dir = std::env::var("SPOOL_TEST_SSE_CLIENTS")
        .expect("SPOOL_TEST_SSE_CLIENTS: run the suite with `just test`");
    let axe = std::fs::read_to_string(format!("{dir}/node_modules/axe-core/axe.min.js"))
        .expect("axe-core is installed by `just test`");
    let _: Value = eval(page, &format!("{axe}; true")).await;
    eval(
        page,
        "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})
           .then(r => r.violations.flatMap(v => v.nodes.map(n => `${v.id}: ${n.target.join(' ')}`)))",
    )
    .await
}

/// A test's servers: an API-only process the browser talks to (it outlives executor kills) and
/// one executor, both publishing live output to a private nats-server.
pub struct Stack {
    pub db: TestDb,
    pub nats: NatsServer,
    pub api: SpoolProcess,
    pub executor: Option<SpoolProcess>,
    pub env: Vec<(String, String)>,
}

impl Stack {
    pub async fn start(extra: &[(&str, &str)]) -> Stack {
        let db = TestDb::new().await;
        let nats = NatsServer::start().await;
        let mut env = vec![
            ("NATS_URL".to_string(), nats.url()),
            ("SPOOL_NATS_STREAM".into(), format!("S_{}", db.name)),
            (
                "SPOOL_NATS_SUBJECT_PREFIX".into(),
                format!("out_{}", db.name),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let api =
            SpoolProcess::spawn_with_args(Binary::Spool, &db, "api", &refs(&env), &["--api-only"]);
        api.wait_http().await;
        let mut stack = Stack {
            db,
            nats,
            api,
            executor: None,
            env,
        };
        stack.start_executor().await;
        stack
    }

    pub async fn start_executor(&mut self) {
        let executor =
            SpoolProcess::start(Binary::Spool, &self.db, "exec-1", &refs(&self.env)).await;
        self.executor = Some(executor);
    }

    pub fn url(&self, path: &str) -> String {
        self.api.url(path)
    }
}

fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// `tick-1tick-2…tick-{n}`: what the run page shows for a ticker of `n` ticks.
pub fn ticker_text(n: usize) -> String {
    (1..=n).map(|i| format!("tick-{i}")).collect()
}

/// Opens the page of ticker run `id`, which starts only once the page is attached to it
/// (`run_at` in an hour until then): on a loaded machine a browser can take longer to attach
/// than a whole short run takes.
pub async fn open_then_start_ticker(
    stack: &Stack,
    chrome: &Chrome,
    id: &str,
    (count, interval_ms, steps): (usize, u64, usize),
) -> Page {
    stack
        .db
        .exec(&format!(
            "insert into spool.runs (id, workflow, input, run_at)
             values ('{id}', 'ticker', '{{\"count\": {count}, \"interval_ms\": {interval_ms}, \"steps\": {steps}}}',
                     now() + interval '1 hour')"
        ))
        .await;
    let page = chrome.page(&stack.url(&format!("/ui/#/run/{id}"))).await;
    wait_js(
        &page,
        "the page attached to the queued run",
        "document.getElementById('attach-status')?.textContent.startsWith('Attached')",
    )
    .await;
    stack
        .db
        .exec(&format!(
            "update spool.runs set run_at = now() where id = '{id}'"
        ))
        .await;
    page
}

pub async fn enqueue_ticker(db: &TestDb, id: &str, count: usize, interval_ms: u64, steps: usize) {
    db.exec(&format!(
        "insert into spool.runs (id, workflow, input) values ('{id}', 'ticker', '{{\"count\": {count}, \"interval_ms\": {interval_ms}, \"steps\": {steps}}}')"
    ))
    .await;
}
