//! `spool attach ID` (and `spool enqueue … --attach`): prints a run's live output, resumes with
//! `Last-Event-ID` when the connection drops or the server ends the stream (`reconnect`: it is
//! shutting down), and exits 0 on `done`, 1 on `failed` or `cancelled`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;

use crate::cli::ServerArgs;
use crate::sse_client::{self, AttachError};

pub async fn attach(server: &ServerArgs, run_id: &str) -> anyhow::Result<ExitCode> {
    let mut last_id: Option<String> = None;
    let mut failures = 0;
    loop {
        let events = sse_client::attach(
            &server.url,
            server.token.as_deref(),
            run_id,
            last_id.as_deref(),
        )
        .await;
        let mut events = match events {
            Ok(e) => Box::pin(e),
            Err(AttachError::Status { status, body }) if status < 500 || failures > 30 => {
                anyhow::bail!("attach failed with HTTP {status}: {body}")
            }
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    return Err(e.into());
                }
                eprintln!("spool: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        failures = 0;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                // resuming would meet the same event again
                Err(e @ AttachError::Protocol { .. }) => return Err(e.into()),
                Err(_) => break,
            };
            if event.id.is_some() {
                last_id = event.id.clone();
            }
            let mut out = std::io::stdout().lock();
            match event.event.as_str() {
                "chunk" if server.lines => writeln!(out, "{}", event.data)?,
                "chunk" => write!(out, "{}", event.data)?,
                "reset" => eprintln!("\n[reset: the run restarted its output after a crash]"),
                "unavailable" => eprintln!("\n[{}]", event.data),
                "done" => {
                    if !server.lines {
                        writeln!(out)?;
                    }
                    eprintln!("[done] {}", event.data);
                    return Ok(ExitCode::SUCCESS);
                }
                "failed" | "cancelled" => {
                    if !server.lines {
                        writeln!(out)?;
                    }
                    eprintln!("[{}] {}", event.event, event.data);
                    return Ok(ExitCode::FAILURE);
                }
                _ => {}
            }
            out.flush()?;
        }
        // the connection ended without an end event: resume where we were
        eprintln!(
            "spool: stream interrupted; resuming after event {}",
            last_id.as_deref().unwrap_or("0")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
