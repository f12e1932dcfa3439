//! A minimal SSE reader for attach streams: enough of the protocol to see `event:`, `data:` and
//! `id:` lines, cheap enough to run a thousand at once.

use std::pin::Pin;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::{Stream, StreamExt};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: String,
    pub data: String,
}

impl Event {
    pub fn is_end(&self) -> bool {
        matches!(self.kind.as_str(), "done" | "failed" | "cancelled")
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

pub struct SseStream {
    body: ByteStream,
    buf: Vec<u8>,
    /// Where the search for the next blank line resumes.
    scanned: usize,
}

/// Sends `GET /v1/runs/{id}/stream` and returns once the response headers arrived (the server
/// admitted the attacher), within 30 s. Reading the stream has no time limit of its own: callers
/// bound it.
pub async fn attach(client: &reqwest::Client, base: &str, run_id: &str) -> Result<SseStream> {
    let request = client.get(format!("{base}/v1/runs/{run_id}/stream")).send();
    let response = tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .with_context(|| format!("attach {run_id}: no response within 30 s"))??;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        bail!("attach {run_id}: {status} {body}");
    }
    Ok(SseStream {
        body: Box::pin(response.bytes_stream()),
        buf: Vec::new(),
        scanned: 0,
    })
}

impl SseStream {
    /// The next event (comments skipped); `None` when the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<Event>> {
        loop {
            if let Some(end) = self.blank_line() {
                let block: Vec<u8> = self.buf.drain(..end).collect();
                self.scanned = 0;
                if let Some(event) = parse_block(&block) {
                    return Ok(Some(event));
                }
                continue;
            }
            match self.body.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk?),
                None => return Ok(None),
            }
        }
    }

    /// The length of the first complete event block (through its blank line), if any.
    fn blank_line(&mut self) -> Option<usize> {
        let start = self.scanned.saturating_sub(1);
        let found = self.buf[start..]
            .windows(2)
            .position(|w| w == b"\n\n")
            .map(|p| start + p + 2);
        if found.is_none() {
            self.scanned = self.buf.len();
        }
        found
    }
}

fn parse_block(block: &[u8]) -> Option<Event> {
    let text = String::from_utf8_lossy(block);
    let mut kind = None;
    let mut data: Option<String> = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            kind = Some(v.trim_start().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            data = Some(match data {
                Some(d) => format!("{d}\n{v}"),
                None => v.to_string(),
            });
        }
    }
    if kind.is_none() && data.is_none() {
        return None; // a comment (keep-alive)
    }
    Some(Event {
        kind: kind.unwrap_or_else(|| "message".into()),
        data: data.unwrap_or_default(),
    })
}
