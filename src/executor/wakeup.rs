//! The insert wake-up: a dedicated connection that LISTENs on `spool_runs` and pokes the claim
//! loop. When the connection drops it reconnects with backoff and pokes once more, so the claim
//! loop runs a catch-up claim for inserts made while nobody listened.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::{self, PgTarget};

pub const CHANNEL: &str = "spool_runs";
/// Notified with a run's id when its cancellation is requested while it runs (migration V6).
pub const CANCEL_CHANNEL: &str = "spool_cancel";

/// Listens until `stop` is cancelled; every `spool_runs` notification (and every reconnect)
/// calls `wake.notify_one()`, every `spool_cancel` one sends its run id to `cancels`.
pub async fn listen(
    target: PgTarget,
    executor_id: String,
    wake: Arc<Notify>,
    cancels: tokio::sync::mpsc::UnboundedSender<String>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let attempt = async {
            let conn =
                db::connect_dedicated(&target, &format!("spool-listen:{executor_id}"), Some(tx))
                    .await?;
            conn.client
                .batch_execute(&format!("listen {CHANNEL}; listen {CANCEL_CHANNEL}"))
                .await
                .map_err(db::DbError::from_pg)?;
            Ok::<_, db::DbError>(conn)
        };
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = attempt => c,
        };
        match conn {
            Ok(mut conn) => {
                backoff = Duration::from_millis(100);
                // catch up on whatever was inserted while we were not listening
                wake.notify_one();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        n = rx.recv() => match n {
                            Some(n) if n.channel() == CANCEL_CHANNEL => {
                                let _ = cancels.send(n.payload().to_string());
                            }
                            Some(_) => wake.notify_one(),
                            None => break,
                        },
                        _ = &mut conn.driver => break,
                    }
                }
                tracing::warn!("wake-up listener disconnected; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "wake-up listener cannot connect"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
