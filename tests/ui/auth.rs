//! Signing in: with `SPOOL_API_TOKEN` the view asks for the token once, keeps an HTTP-only,
//! same-site session cookie, attaches with it, and the token appears in no URL and no log.

use chromiumoxide::cdp::browser_protocol::network::CookieSameSite;
use serde_json::Value;

use crate::{
    accessibility_violations, enqueue_ticker, eval, record_requests, screenshot, text_of,
    ticker_text, wait_js, Chrome, Stack,
};

const TOKEN: &str = "ui-test-token-Zq7x0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_keeps_an_http_only_cookie_live_output_works_and_the_token_is_in_no_url() {
    let stack = Stack::start(&[("SPOOL_API_TOKEN", TOKEN)]).await;
    enqueue_ticker(&stack.db, "secret", 8, 150, 2).await;
    let chrome = Chrome::launch().await;
    let page = chrome.browser_page().await;
    let urls = record_requests(&page).await;
    page.goto(stack.url("/ui/#/run/secret"))
        .await
        .expect("open");

    // signed out: the sign-in form, not the run
    wait_js(
        &page,
        "the sign-in form",
        "!!document.getElementById('token')",
    )
    .await;
    screenshot(&page, "sign-in").await;
    let violations = accessibility_violations(&page).await;
    assert!(
        violations.is_empty(),
        "axe-core on the sign-in form: {violations:#?}"
    );
    let status: u16 = eval(&page, "fetch('/v1/runs').then(r => r.status)").await;
    assert_eq!(status, 401, "no cookie yet");

    // a wrong token is refused with a message, by keyboard alone
    let input = page.find_element("#token").await.expect("token field");
    input.click().await.unwrap();
    input.type_str("not-the-token-0000000000").await.unwrap();
    input.press_key("Enter").await.unwrap();
    wait_js(
        &page,
        "the refusal",
        "document.querySelector('[role=alert] .error')?.textContent.includes('not this server')",
    )
    .await;

    // the right one: the page goes on to the run and attaches with the cookie
    let _: Value = eval(&page, "document.getElementById('token').value = ''; true").await;
    let input = page.find_element("#token").await.expect("token field");
    input.type_str(TOKEN).await.unwrap();
    input.press_key("Enter").await.unwrap();
    wait_js(
        &page,
        "the end",
        "document.getElementById('output')?.dataset.ended === 'done'",
    )
    .await;
    assert_eq!(text_of(&page, "#output").await, ticker_text(8));

    // the cookie: HTTP-only (scripts cannot read it), same-site strict, and not the token
    let document_cookie: String = eval(&page, "document.cookie").await;
    assert_eq!(document_cookie, "", "page scripts see no cookie");
    let cookies = page.get_cookies().await.expect("cookies");
    let session = cookies
        .iter()
        .find(|c| c.name == "spool_session")
        .expect("a session cookie");
    assert!(session.http_only);
    assert_eq!(session.same_site, Some(CookieSameSite::Strict));
    assert!(!session.value.contains(TOKEN));

    // nowhere in a URL the page requested, nor in the server's log
    let urls = urls.lock().unwrap().clone();
    assert!(
        urls.iter().any(|u| u.contains("/v1/runs/secret/stream")),
        "{urls:?}"
    );
    for url in &urls {
        assert!(!url.contains(TOKEN), "the token is in a URL: {url}");
    }
    assert!(!stack.api.log_text().contains(TOKEN));

    // the cookie alone cannot change anything from elsewhere: a write needs Origin, and a
    // foreign Origin is refused
    let cookie = format!("spool_session={}", session.value);
    let http = reqwest::Client::new();
    enqueue_ticker(&stack.db, "victim", 100, 100, 10).await;
    let cancel = stack.url("/v1/runs/victim/cancel");
    let r = http
        .post(&cancel)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a cookie write without Origin");
    let r = http
        .post(&cancel)
        .header("cookie", &cookie)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a cookie write from another site");
    let r = http.post(&cancel).send().await.unwrap();
    assert_eq!(r.status(), 401, "no credentials");
    let r = http
        .get(stack.url("/v1/runs/victim"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the cookie reads");
    let forged = format!("spool_session=9999999999.{}", "ab".repeat(32));
    let r = http
        .get(stack.url("/v1/runs"))
        .header("cookie", forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a forged session");
    assert_ne!(
        stack.db.status("victim").await,
        "cancelled",
        "no refused request cancelled it"
    );

    // signing out ends the session
    let _: Value = eval(&page, "document.getElementById('sign-out').click(); true").await;
    wait_js(
        &page,
        "the sign-in form again",
        "!!document.getElementById('token')",
    )
    .await;
    let status: u16 = eval(&page, "fetch('/v1/runs').then(r => r.status)").await;
    assert_eq!(status, 401, "signed out");
    chrome.close().await;
}
