//! A small client for the attach protocol (SSE): used by `spool attach` and by the tests.
//! It parses `id:`, `event:` and `data:` fields, ignores comments (keep-alives), decodes each
//! event's data, and resumes with `Last-Event-ID` when asked to.
//!
//! On the wire every event's data is one line of JSON (see `api::stream` and the README's attach
//! section); [`SseEvent::data`] is what it carries: the text of a `chunk`, `unavailable` or
//! `reconnect` (a JSON string on the wire), empty for `reset` (`null`), and the JSON text of the
//! output or error of `done`, `failed` and `cancelled`.

use futures::{Stream, StreamExt};

/// One server-sent event, its data decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    /// The chunk's text for `chunk` (byte for byte what the workflow emitted), the message for
    /// `unavailable` and `reconnect`, empty for `reset`, the JSON text of the output or error
    /// for the end events.
    pub data: String,
}

impl SseEvent {
    pub fn is_end(&self) -> bool {
        matches!(self.event.as_str(), "done" | "failed" | "cancelled")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("connection failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("malformed {event} event: {reason}")]
    Protocol { event: String, reason: String },
}

/// Opens `GET {base}/v1/runs/{id}/stream`, resuming after `last_event_id` when given.
pub async fn attach(
    base: &str,
    token: Option<&str>,
    run_id: &str,
    last_event_id: Option<&str>,
) -> Result<impl Stream<Item = Result<SseEvent, AttachError>>, AttachError> {
    let mut req = reqwest::Client::new()
        .get(format!(
            "{}/v1/runs/{}/stream",
            base.trim_end_matches('/'),
            run_id
        ))
        .header("accept", "text/event-stream");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let res = req.send().await?;
    if !res.status().is_success() {
        let status = res.status().as_u16();
        let body = res.text().await.unwrap_or_default();
        return Err(AttachError::Status { status, body });
    }
    Ok(parse(res.bytes_stream()))
}

/// Parses a byte stream into events.
pub fn parse<S, B, E>(bytes: S) -> impl Stream<Item = Result<SseEvent, AttachError>>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: Into<AttachError>,
{
    futures::stream::unfold(
        (bytes, Vec::<u8>::new()),
        |(mut bytes, mut buf)| async move {
            loop {
                if let Some(pos) = find_blank_line(&buf) {
                    let block: Vec<u8> = buf.drain(..pos.0 + pos.1).collect();
                    if let Some(event) = parse_block(&String::from_utf8_lossy(&block[..pos.0])) {
                        return Some((decode(event), (bytes, buf)));
                    }
                    continue;
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(chunk.as_ref()),
                    Some(Err(e)) => return Some((Err(e.into()), (bytes, buf))),
                    None => return None,
                }
            }
        },
    )
}

/// Position and length of the first blank line (`\n\n` or `\r\n\r\n`).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse_block(block: &str) -> Option<SseEvent> {
    let mut id = None;
    let mut event = String::from("message");
    let mut data: Vec<&str> = Vec::new();
    let mut any = false;
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        any = true;
        match field {
            "id" => id = Some(value.to_string()),
            "event" => event = value.to_string(),
            "data" => data.push(value),
            _ => {}
        }
    }
    any.then(|| SseEvent {
        id,
        event,
        data: data.join("\n"),
    })
}

/// Decodes an event's wire data (one line of JSON) into [`SseEvent::data`].
fn decode(mut event: SseEvent) -> Result<SseEvent, AttachError> {
    let malformed = |event: &SseEvent, reason: String| AttachError::Protocol {
        event: event.event.clone(),
        reason,
    };
    match event.event.as_str() {
        "chunk" | "unavailable" | "reconnect" => {
            event.data = serde_json::from_str::<String>(&event.data)
                .map_err(|e| malformed(&event, format!("data is not a JSON string: {e}")))?;
        }
        "reset" => event.data.clear(),
        "done" | "failed" | "cancelled" => {
            serde_json::from_str::<serde::de::IgnoredAny>(&event.data)
                .map_err(|e| malformed(&event, format!("data is not JSON: {e}")))?;
        }
        _ => {}
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_events_split_across_reads_and_skips_keep_alives() {
        let parts: Vec<Result<&[u8], AttachError>> = vec![
            Ok(b": keep-alive\n\nid: 1\nevent: chu"),
            Ok(b"nk\ndata: \"a\\r\\nb\"\n\nid: 2\nevent: done\ndata: {}\n\n"),
        ];
        let events: Vec<SseEvent> = parse(futures::stream::iter(parts))
            .map(|e| e.unwrap())
            .collect()
            .await;
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].id.as_deref(), Some("1"));
        assert_eq!(events[0].event, "chunk");
        assert_eq!(events[0].data, "a\r\nb");
        assert!(events[1].is_end());
    }
}
