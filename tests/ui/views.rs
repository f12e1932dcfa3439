//! The pages, as an operator uses them: the runs list, a run's live output across a crash and a
//! reload, cancel, executors and queues.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::common::{wait_steps, wait_terminal};
use crate::{
    accessibility_violations, enqueue_ticker, eval, open_then_start_ticker, phone_width,
    screenshot, text_of, ticker_text, wait_js, Chrome, Stack,
};

/// The ids of the runs the list shows, in order.
const LISTED: &str = "[...document.querySelectorAll('tbody tr[data-run]')].map(r => r.dataset.run)";

async fn listed(page: &chromiumoxide::Page, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    let js = format!(
        "(() => {{ const l = {LISTED}; return JSON.stringify(l) === {:?} ? l : null }})()",
        serde_json::to_string(&want).unwrap()
    );
    wait_js(page, &format!("the list shows exactly {want:?}"), &js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_list_shows_runs_enqueued_by_sql_with_counts_filters_and_live_refresh() {
    let stack = Stack::start(&[]).await;
    let db = &stack.db;
    for id in ["sql-a", "sql-b"] {
        db.exec(&format!(
            "insert into spool.runs (id, workflow) values ('{id}', 'noop')"
        ))
        .await;
    }
    enqueue_ticker(db, "sql-t", 2, 10, 1).await;
    db.exec("insert into spool.runs (id, workflow) values ('sql-x', 'nobody.runs.this')")
        .await;
    for id in ["sql-a", "sql-b", "sql-t"] {
        wait_terminal(db, id, Duration::from_secs(30)).await;
    }

    let chrome = Chrome::launch().await;
    let page = chrome.page(&stack.url("/")).await; // `/` leads to the view
    listed(&page, &["sql-x", "sql-t", "sql-b", "sql-a"]).await;
    wait_js(
        &page,
        "counts per status",
        "document.querySelector('[data-status=succeeded] strong')?.textContent === '3'
           && document.querySelector('[data-status=queued] strong')?.textContent === '1'",
    )
    .await;

    // a run inserted by SQL after the page loaded appears without a reload
    db.exec("insert into spool.runs (id, workflow) values ('sql-late', 'nobody.runs.this')")
        .await;
    listed(&page, &["sql-late", "sql-x", "sql-t", "sql-b", "sql-a"]).await;
    screenshot(&page, "runs").await;
    let violations = accessibility_violations(&page).await;
    assert!(
        violations.is_empty(),
        "axe-core on the runs list: {violations:#?}"
    );

    // filters: by workflow, by status, by id prefix; each is in the address (bookmarkable)
    let _: Value = eval(
        &page,
        "document.getElementById('f-workflow').value = 'ticker'; document.querySelector('form.filters').requestSubmit(); true",
    )
    .await;
    listed(&page, &["sql-t"]).await;
    assert!(eval::<String>(&page, "location.hash")
        .await
        .contains("workflow=ticker"));
    let _: Value = eval(&page, "location.hash = '#/runs?status=queued'; true").await;
    listed(&page, &["sql-late", "sql-x"]).await;
    let _: Value = eval(&page, "location.hash = '#/runs?id_prefix=sql-l'; true").await;
    listed(&page, &["sql-late"]).await;
    // a click on a count filters by that status
    let _: Value = eval(&page, "location.hash = '#/runs'; true").await;
    listed(&page, &["sql-late", "sql-x", "sql-t", "sql-b", "sql-a"]).await;
    let _: Value = eval(
        &page,
        "document.querySelector('[data-status=succeeded]').click(); true",
    )
    .await;
    listed(&page, &["sql-t", "sql-b", "sql-a"]).await;

    // paging: 50 runs a page, newest first; "Older" continues where the page ended
    db.exec("insert into spool.runs (id, workflow) select 'page-' || i, 'nobody.runs.this' from generate_series(1, 50) i").await;
    let _: Value = eval(&page, "location.hash = '#/runs'; true").await;
    wait_js(
        &page,
        "a full first page",
        &format!("{LISTED}.length === 50 && {LISTED}[0] === 'page-50'"),
    )
    .await;
    let _: Value = eval(&page, "[...document.querySelectorAll('.pager a')].find(a => a.textContent.startsWith('Older')).click(); true").await;
    listed(&page, &["sql-late", "sql-x", "sql-t", "sql-b", "sql-a"]).await;
    let _: Value = eval(&page, "[...document.querySelectorAll('.pager a')].find(a => a.textContent.includes('Newest')).click(); true").await;
    wait_js(
        &page,
        "the first page again",
        &format!("{LISTED}[0] === 'page-50'"),
    )
    .await;

    // a phone-width screen: nothing wider than the screen but the scrollable table itself
    phone_width(&page).await;
    let _: Value = eval(&page, "location.hash = '#/runs?id_prefix=sql-'; true").await;
    listed(&page, &["sql-late", "sql-x", "sql-t", "sql-b", "sql-a"]).await;
    let fits: bool = eval(
        &page,
        "document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await;
    assert!(fits, "the runs page fits a 390 px wide screen");
    screenshot(&page, "runs-phone").await;
    chrome.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_page_shows_chunks_as_they_arrive_then_the_end() {
    let stack = Stack::start(&[]).await;
    let chrome = Chrome::launch().await;
    let page = open_then_start_ticker(&stack, &chrome, "live", (12, 250, 3)).await;

    // mid-run: some ticks shown, the end not yet
    let partial = wait_js(
        &page,
        "some chunks before the end",
        "(() => { const o = document.getElementById('output'); return o && o.textContent.includes('tick-2') && !o.dataset.ended ? o.textContent : null })()",
    )
    .await;
    let partial = partial.as_str().unwrap().to_string();
    assert!(
        ticker_text(12).starts_with(&partial) && partial.len() < ticker_text(12).len(),
        "{partial}"
    );

    wait_js(
        &page,
        "the end",
        "document.getElementById('output').dataset.ended === 'done'",
    )
    .await;
    assert_eq!(text_of(&page, "#output").await, ticker_text(12));
    let end: Value = serde_json::from_str(&text_of(&page, "#attach-end pre").await).unwrap();
    assert_eq!(end, serde_json::json!({"ticks": 12}));
    // the fields and steps refresh to the end too
    wait_js(
        &page,
        "three steps listed",
        "document.querySelectorAll('[aria-labelledby=h-steps] tbody tr').length === 3",
    )
    .await;
    assert!(text_of(&page, "[aria-labelledby=h-steps]")
        .await
        .contains("ticks-1-4"));
    wait_js(
        &page,
        "the status badge",
        "document.querySelector('.head .badge')?.textContent === 'succeeded'",
    )
    .await;
    screenshot(&page, "run").await;
    let violations = accessibility_violations(&page).await;
    assert!(
        violations.is_empty(),
        "axe-core on the run page: {violations:#?}"
    );
    phone_width(&page).await;
    let fits: bool = eval(
        &page,
        "document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await;
    assert!(fits, "the run page fits a 390 px wide screen");
    chrome.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_output_shows_reset_then_the_whole_output_once() {
    let mut stack = Stack::start(&[]).await;
    // long enough (about 6 s) that the kill lands mid-run even when a loaded machine shows the
    // first chunks late; the end checks that it did (steps recorded under two claim epochs)
    let chrome = Chrome::launch().await;
    let page = open_then_start_ticker(&stack, &chrome, "crash", (200, 30, 20)).await;
    wait_steps(&stack.db, "crash", 1).await;
    wait_js(
        &page,
        "chunks shown",
        "document.getElementById('output')?.textContent.includes('tick-12')",
    )
    .await;

    let mut executor = stack.executor.take().unwrap();
    executor.signal(Signal::SIGKILL);
    executor.wait_exit(Duration::from_secs(10)).await;
    stack.start_executor().await;

    wait_js(
        &page,
        "the end",
        "document.getElementById('output').dataset.ended === 'done'",
    )
    .await;
    let epochs = stack
        .db
        .scalar_i64("select count(distinct claim_epoch) from spool.operation_outputs where run_id = 'crash'")
        .await;
    assert_eq!(
        epochs, 2,
        "the kill landed mid-run: steps of two claim epochs"
    );
    assert_eq!(
        text_of(&page, "#output").await,
        ticker_text(200),
        "every tick once, in order"
    );
    let resets: String = eval(&page, "document.getElementById('output').dataset.resets").await;
    assert!(
        resets.parse::<u32>().unwrap() >= 1,
        "the replay began with a reset; status {:?}, notices {:?}, claim epochs with steps {:?}",
        text_of(&page, "#attach-status").await,
        text_of(&page, "#attach-notices").await,
        stack
            .db
            .scalar_i64("select count(distinct claim_epoch) from spool.operation_outputs where run_id = 'crash'")
            .await,
    );
    assert!(text_of(&page, "#attach-notices").await.contains("reset"));
    screenshot(&page, "run-after-crash").await;
    chrome.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_reload_resumes_after_the_last_event_without_duplicates() {
    let stack = Stack::start(&[]).await;
    // (started once the page is attached, so that the reload lands mid-run also on a loaded
    // machine: a reload after the end resumes straight into the end)
    let chrome = Chrome::launch().await;
    let page = open_then_start_ticker(&stack, &chrome, "reload", (20, 250, 2)).await;
    wait_js(
        &page,
        "chunks shown",
        "document.getElementById('output')?.textContent.includes('tick-3')",
    )
    .await;

    page.reload().await.expect("reload");
    let resumed = wait_js(
        &page,
        "a resumed attach",
        "document.getElementById('output')?.dataset.resumedAfter ?? null",
    )
    .await;
    assert_ne!(
        resumed,
        Value::String("0".into()),
        "resumes after a real event"
    );
    assert!(text_of(&page, "#attach-status")
        .await
        .starts_with("Resumed after event"));
    wait_js(
        &page,
        "the end",
        "document.getElementById('output').dataset.ended === 'done'",
    )
    .await;
    assert_eq!(
        text_of(&page, "#output").await,
        ticker_text(20),
        "every tick once across the reload"
    );
    chrome.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_button_cancels_a_running_run() {
    let stack = Stack::start(&[]).await;
    enqueue_ticker(&stack.db, "long", 1000, 50, 100).await;
    let chrome = Chrome::launch().await;
    let page = chrome.page(&stack.url("/ui/#/run/long")).await;
    wait_js(
        &page,
        "chunks shown",
        "document.getElementById('output')?.textContent.includes('tick-2')",
    )
    .await;
    wait_js(
        &page,
        "the cancel button",
        "!!document.getElementById('cancel') && !document.getElementById('cancel').hidden",
    )
    .await;
    let _: Value = eval(&page, "document.getElementById('cancel').click(); true").await;
    assert_eq!(
        wait_terminal(&stack.db, "long", Duration::from_secs(30)).await,
        "cancelled"
    );
    wait_js(
        &page,
        "the cancelled end",
        "document.getElementById('output').dataset.ended === 'cancelled'",
    )
    .await;
    wait_js(
        &page,
        "the badge",
        "document.querySelector('.head .badge')?.textContent === 'cancelled'",
    )
    .await;
    let shown = text_of(&page, "#output").await;
    assert!(!shown.contains("tick-1000"), "the run stopped early");
    chrome.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executors_page_shows_liveness_queue_depth_and_runs_nobody_can_execute() {
    let mut stack = Stack::start(&[]).await;
    let db = &stack.db;
    db.exec("insert into spool.runs (id, workflow) values ('orphan', 'nobody.runs.this')")
        .await;
    db.exec("insert into spool.runs (id, workflow, concurrency_key, run_at) values ('later', 'noop', 'k-1', now() + interval '1 hour')").await;
    let chrome = Chrome::launch().await;
    let page = chrome.page(&stack.url("/ui/#/executors")).await;
    wait_js(
        &page,
        "the executor alive",
        "document.querySelector('[data-executor=exec-1] .badge')?.textContent === 'alive'",
    )
    .await;
    wait_js(
        &page,
        "the unrunnable run and why",
        "document.querySelector('[aria-labelledby=h-u] tr[data-run=orphan]')?.textContent.includes('no live executor runs workflow nobody.runs.this')",
    )
    .await;
    let queue = text_of(&page, "[data-queue=default]").await;
    assert!(
        queue.starts_with("default11"),
        "ready 1 and scheduled 1: {queue}"
    );
    assert!(text_of(&page, "[aria-labelledby=h-k]")
        .await
        .contains("k-1"));
    screenshot(&page, "executors").await;
    let violations = accessibility_violations(&page).await;
    assert!(
        violations.is_empty(),
        "axe-core on the executors page: {violations:#?}"
    );

    // the executor dies: the page says so on its own
    let mut executor = stack.executor.take().unwrap();
    executor.signal(Signal::SIGKILL);
    executor.wait_exit(Duration::from_secs(10)).await;
    wait_js(
        &page,
        "the executor down",
        "document.querySelector('[data-executor=exec-1] .badge')?.textContent === 'down'",
    )
    .await;
    chrome.close().await;
}
