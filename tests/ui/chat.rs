//! The conversation page: the runs of one concurrency key as a chat transcript, replies written
//! live, against `llm.chat` and the mock provider served by the test.

use serde_json::{json, Value};

use crate::common::TestDb;
use crate::{
    accessibility_violations, eval, phone_width, screenshot, text_of, wait_js, Chrome, Stack,
};

async fn mock_provider() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, spool::llm::mock::router(None)).await });
    format!("http://{addr}/v1")
}

async fn ask(db: &TestDb, id: &str, model: &str, messages: Value) {
    let input = json!({"model": model, "messages": messages});
    db.exec(&format!(
        "insert into spool.runs (id, workflow, concurrency_key, input) values ('{id}', 'llm.chat', 'conv-ui', '{input}')"
    ))
    .await;
}

async fn reply_of(db: &TestDb, id: &str) -> String {
    let row = db
        .client()
        .await
        .query_one(
            "select output->>'content' from spool.runs where id = $1",
            &[&id],
        )
        .await
        .unwrap();
    row.get(0)
}

fn turn(id: &str, part: &str) -> String {
    format!("li[data-run={id}] .turn.{part} .text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conversation_page_shows_a_key_as_a_transcript_with_replies_written_live() {
    let base = mock_provider().await;
    let stack = Stack::start(&[
        ("SPOOL_LLM_BASE_URL", &base),
        ("SPOOL_LLM_API_KEY", "sk-ui-test-0123456789"),
    ])
    .await;
    let db = &stack.db;
    ask(
        db,
        "c1",
        "mock:tokens=12,delay_ms=10",
        json!([{"role": "user", "content": "What is Spool?"}]),
    )
    .await;
    crate::common::wait_terminal(db, "c1", std::time::Duration::from_secs(30)).await;

    let chrome = Chrome::launch().await;
    let page = chrome.page(&stack.url("/ui/#/conversation/conv-ui")).await;
    // an earlier turn, from the list
    let done = "document.querySelector('li[data-run=c1]')?.dataset.ended === 'done'";
    wait_js(&page, "the first turn", done).await;
    assert_eq!(text_of(&page, &turn("c1", "user")).await, "What is Spool?");
    assert_eq!(
        text_of(&page, &turn("c1", "assistant")).await,
        reply_of(db, "c1").await
    );

    // the next turn is followed live: part of the reply shows before the run ends
    let first = reply_of(db, "c1").await;
    ask(
        db,
        "c2",
        "mock:tokens=40,delay_ms=60",
        json!([
            {"role": "user", "content": "What is Spool?"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "How do I watch a reply?"}
        ]),
    )
    .await;
    let partial = wait_js(
        &page,
        "part of the second reply",
        "(() => { const li = document.querySelector('li[data-run=c2]'); const t = li?.querySelector('.turn.assistant .text').textContent; return li && !li.dataset.ended && t ? t : null })()",
    )
    .await;
    wait_js(
        &page,
        "the second turn",
        "document.querySelector('li[data-run=c2]')?.dataset.ended === 'done'",
    )
    .await;
    let second = reply_of(db, "c2").await;
    assert!(
        second.starts_with(partial.as_str().unwrap())
            && second.len() > partial.as_str().unwrap().len()
    );
    assert_eq!(
        text_of(&page, &turn("c2", "user")).await,
        "How do I watch a reply?"
    );
    assert_eq!(text_of(&page, &turn("c2", "assistant")).await, second);
    let order: Vec<String> = eval(
        &page,
        "[...document.querySelectorAll('#transcript > li')].map(l => l.dataset.run)",
    )
    .await;
    assert_eq!(order, ["c1", "c2"]);
    screenshot(&page, "conversation").await;
    let violations = accessibility_violations(&page).await;
    assert!(
        violations.is_empty(),
        "axe-core on the conversation page: {violations:#?}"
    );
    phone_width(&page).await;
    let fits: bool = eval(
        &page,
        "document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await;
    assert!(fits, "the conversation fits a 390 px wide screen");
    screenshot(&page, "conversation-phone").await;

    // the reply's run page, for the record
    let run = chrome.page(&stack.url("/ui/#/run/c2")).await;
    wait_js(
        &run,
        "the end",
        "document.getElementById('output')?.dataset.ended === 'done'",
    )
    .await;
    assert_eq!(text_of(&run, "#output").await, second);
    screenshot(&run, "run-chat").await;
    chrome.close().await;
}
