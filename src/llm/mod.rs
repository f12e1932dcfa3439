//! `llm.chat`: an LLM reply as a durable run, against any OpenAI-compatible endpoint.
//!
//! The whole completion is one memoized step, `completion`: it streams the reply with
//! `stream: true`, emits the text as chunks coalesced by time and size (so NATS carries tens of
//! messages per second per reply, not one per token), and records the assistant message,
//! `finish_reason` and `usage`. A replay after that step committed never calls the model again;
//! a kill mid-reply replays the step (the attachers get `reset`, then the new reply).
//!
//! The first text of a reply is sent at once; later text is coalesced.
//!
//! - 429, 5xx, connection errors, a stream cut before `[DONE]`, a malformed line and a stall
//!   (no token within the first-token timeout) are retried with backoff, waiting at least what a
//!   `Retry-After` asks (bounded); another 4xx (bad key, unknown model) fails the run with the
//!   provider's message.
//! - Cancellation reaches the generating step: the request is dropped at once (the connection
//!   closes), the text so far is recorded, and the run ends `cancelled` with it in `partial`.
//! - The API key is only ever in the `Authorization` header: never in a run, a step, a log line
//!   or an error (a provider message that echoes it is redacted).

pub mod mock;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::workflow::{Registry, RetryPolicy, RunContext, StepError, WorkflowError};

pub const CHAT: &str = "llm.chat";

/// Where and how `llm.chat` calls the model. (`Debug` shows no key.)
#[derive(Clone)]
pub struct LlmSettings {
    /// As the OpenAI SDKs take it: `https://api.openai.com/v1`; requests go to
    /// `{base_url}/chat/completions`.
    pub base_url: String,
    pub api_key: Option<String>,
    /// Longest one request may take, streaming included.
    pub request_timeout: Duration,
    /// Longest wait for the response and for its first token, and between two tokens.
    pub first_token_timeout: Duration,
    /// Chunks are flushed this long after their first delta arrived, or at `flush_bytes`.
    pub flush_interval: Duration,
    pub flush_bytes: usize,
    /// Retries of a failed request (429, 5xx, cut, stall) before the run fails.
    pub max_retries: u32,
    /// Longest `Retry-After` honoured.
    pub max_retry_after: Duration,
}

impl std::fmt::Debug for LlmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmSettings")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("request_timeout", &self.request_timeout)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("flush_interval", &self.flush_interval)
            .field("flush_bytes", &self.flush_bytes)
            .finish()
    }
}

impl LlmSettings {
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            request_timeout: Duration::from_secs(600),
            first_token_timeout: Duration::from_secs(60),
            flush_interval: Duration::from_millis(50),
            flush_bytes: 512,
            max_retries: 5,
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// Input of `llm.chat`: a Chat Completions request (without `stream`, which Spool sets).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatInput {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    /// A string, or the array of content parts the API allows.
    pub content: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What the `completion` step records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub message: Value,
    /// `stop`, `length`, … as the provider said, or `cancelled` when the run was cancelled
    /// while generating.
    pub finish_reason: Option<String>,
    pub usage: Option<Value>,
}

/// Registers `llm.chat` with these settings.
pub fn register(registry: &mut Registry, settings: LlmSettings) {
    let settings = Arc::new(settings);
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client with default TLS settings");
    registry.register(CHAT, move |ctx: RunContext, input: ChatInput| {
        chat(ctx, input, settings.clone(), http.clone())
    });
}

async fn chat(
    ctx: RunContext,
    input: ChatInput,
    settings: Arc<LlmSettings>,
    http: reqwest::Client,
) -> Result<Value, WorkflowError> {
    if input.messages.is_empty() {
        return Err(WorkflowError::InvalidInput(
            "messages must not be empty".into(),
        ));
    }
    for m in &input.messages {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(WorkflowError::InvalidInput(format!(
                "unknown message role {:?} (system, developer, user, assistant or tool)",
                m.role
            )));
        }
    }
    let policy = RetryPolicy {
        max_retries: settings.max_retries,
        initial_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(10),
    };
    let request = {
        let mut body =
            serde_json::to_value(&input).map_err(|e| WorkflowError::Encode(e.to_string()))?;
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        body
    };
    let completion: Completion = ctx
        .step_with("completion", policy, |_info| {
            generate(ctx.clone(), settings.clone(), http.clone(), request.clone())
        })
        .await?;
    if completion.finish_reason.as_deref() == Some("cancelled") {
        return Err(WorkflowError::CancelledWith(completion.message));
    }
    Ok(completion.message)
}

fn assistant(content: &str) -> Value {
    json!({"role": "assistant", "content": content})
}

/// One try of the request: the reply, or why it failed (retryable or not).
async fn generate(
    ctx: RunContext,
    settings: Arc<LlmSettings>,
    http: reqwest::Client,
    request: Value,
) -> Result<Completion, StepError> {
    let redact = |text: String| match &settings.api_key {
        Some(key) if !key.is_empty() => text.replace(key.as_str(), "***"),
        _ => text,
    };
    let url = format!(
        "{}/chat/completions",
        settings.base_url.trim_end_matches('/')
    );
    let mut call = http
        .post(url)
        .json(&request)
        .timeout(settings.request_timeout);
    if let Some(key) = &settings.api_key {
        call = call.bearer_auth(key);
    }
    let response = tokio::select! {
        r = tokio::time::timeout(settings.first_token_timeout, call.send()) => match r {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(StepError::retryable(redact(format!("cannot reach the model: {}", e.without_url())))),
            Err(_) => return Err(StepError::retryable("the model did not answer within the first-token timeout")),
        },
        _ = ctx.cancelled() => return Ok(cancelled_with("")),
    };
    let status = response.status();
    if !status.is_success() {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(settings.max_retry_after));
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.chars().take(500).collect());
        let message = redact(format!("the model answered {status}: {message}"));
        if status.as_u16() == 429 || status.is_server_error() {
            if let Some(wait) = retry_after {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctx.cancelled() => return Ok(cancelled_with("")),
                }
            }
            return Err(StepError::retryable(message));
        }
        return Err(StepError::fatal(message));
    }

    let mut body = response.bytes_stream();
    let mut lines = LineBuffer::default();
    let mut content = String::new();
    let mut pending = String::new();
    let mut pending_since: Option<Instant> = None;
    let mut finish_reason = None;
    let mut usage = None;
    let mut flushed_any = false;
    let mut deadline = Instant::now() + settings.first_token_timeout;
    loop {
        let flush_at = pending_since.map(|t| t + settings.flush_interval);
        tokio::select! {
            next = body.next() => {
                let bytes = match next {
                    Some(Ok(b)) => b,
                    Some(Err(e)) => {
                        flush(&ctx, &mut pending, &mut pending_since).await;
                        return Err(StepError::retryable(redact(format!("the reply stream broke: {}", e.without_url()))));
                    }
                    None => {
                        flush(&ctx, &mut pending, &mut pending_since).await;
                        return Err(StepError::retryable(format!("the reply stream ended before [DONE] after {} characters", content.len())));
                    }
                };
                deadline = Instant::now() + settings.first_token_timeout;
                for line in lines.push(&bytes) {
                    let Some(data) = line.strip_prefix("data:") else { continue };
                    let data = data.trim();
                    if data == "[DONE]" {
                        flush(&ctx, &mut pending, &mut pending_since).await;
                        return Ok(Completion { message: assistant(&content), finish_reason, usage });
                    }
                    let Ok(event) = serde_json::from_str::<Value>(data) else {
                        flush(&ctx, &mut pending, &mut pending_since).await;
                        return Err(StepError::retryable("the model sent a malformed line"));
                    };
                    if let Some(u) = event.get("usage").filter(|u| !u.is_null()) {
                        usage = Some(u.clone());
                    }
                    let choice = &event["choices"][0];
                    if let Some(reason) = choice["finish_reason"].as_str() {
                        finish_reason = Some(reason.to_string());
                    }
                    if let Some(delta) = choice["delta"]["content"].as_str() {
                        if !delta.is_empty() {
                            content.push_str(delta);
                            pending.push_str(delta);
                            pending_since.get_or_insert_with(Instant::now);
                        }
                    }
                }
                // the first text goes out at once (what a reader waits for most), the rest
                // coalesced
                if pending.len() >= settings.flush_bytes || (!pending.is_empty() && !flushed_any) {
                    flushed_any = true;
                    flush(&ctx, &mut pending, &mut pending_since).await;
                }
            }
            _ = tokio::time::sleep_until(flush_at.unwrap_or(deadline)), if flush_at.is_some() => {
                flush(&ctx, &mut pending, &mut pending_since).await;
            }
            _ = tokio::time::sleep_until(deadline) => {
                flush(&ctx, &mut pending, &mut pending_since).await;
                return Err(StepError::retryable(format!("no token within the first-token timeout ({:?})", settings.first_token_timeout)));
            }
            _ = ctx.cancelled() => {
                // dropping the body closes the upstream request
                flush(&ctx, &mut pending, &mut pending_since).await;
                return Ok(cancelled_with(&content));
            }
        }
    }
}

fn cancelled_with(content: &str) -> Completion {
    Completion {
        message: assistant(content),
        finish_reason: Some("cancelled".into()),
        usage: None,
    }
}

async fn flush(ctx: &RunContext, pending: &mut String, since: &mut Option<Instant>) {
    if !pending.is_empty() {
        ctx.emit(std::mem::take(pending)).await;
    }
    *since = None;
}

/// Splits a byte stream into lines (`\n`, `\r\n`), keeping a partial line for the next bytes.
#[derive(Default)]
struct LineBuffer {
    partial: Vec<u8>,
}

impl LineBuffer {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            lines.push(line.trim_end_matches(['\r', '\n']).to_string());
        }
        lines
    }
}
