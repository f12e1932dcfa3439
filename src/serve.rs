//! `spool serve`: migrate, then run the executor and the HTTP API in one process until SIGTERM or
//! SIGINT, then drain. Shutdown is explicit plumbing: one cancellation token reaches the executor
//! and the HTTP server; the HTTP server then ends every attach stream with `reconnect` and waits
//! for other requests at most the grace period (`SPOOL_GRACE_PERIOD_MS`), as the executor does
//! for its runs.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState, AttachLimits};
use crate::config::Config;
use crate::executor::{self, ChunkSinkFactory, ExecutorError, Metrics};
use crate::live::{publisher, LiveError, LiveOutput};
use crate::migrate::{self, MigrateError};
use crate::workflow::Registry;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Live(#[from] LiveError),
}

/// Runs until a shutdown signal (or `stop`), then drains and returns.
pub async fn serve(
    config: Config,
    mut registry: Registry,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    if let Some(llm) = &config.llm {
        tracing::info!(base_url = %llm.base_url, "llm.chat calls an OpenAI-compatible endpoint");
        crate::llm::register(&mut registry, llm.clone());
    }
    if config.generated_executor_id {
        tracing::warn!(
            executor = %config.executor.executor_id,
            "no SPOOL_EXECUTOR_ID or POD_NAME: using a generated id; runs this process owns when it dies are only recovered by a process with the same id"
        );
    }
    let applied = migrate::ensure_current(
        &config.database,
        config.no_migrate,
        config.migration_lock_timeout,
    )
    .await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "migrations applied");
    }
    let pool = crate::db::pool(
        &config.database,
        config.db_pool_size,
        &format!("spool:{}", config.executor.executor_id),
    );
    let metrics = Arc::new(Metrics::default());
    let live = match &config.live {
        Some(settings) => Some(LiveOutput::connect(settings.clone(), stop.clone()).await?),
        None => {
            tracing::info!(
                "no NATS_URL: live output is off (runs still execute; attach answers 503)"
            );
            None
        }
    };
    let chunks: ChunkSinkFactory = match &live {
        Some(live) => publisher::factory(live.clone()),
        None => executor::discard_chunks(),
    };

    let executor = if config.run_executor {
        Some(
            executor::start(
                config.executor.clone(),
                config.database.clone(),
                pool.clone(),
                registry.clone(),
                chunks,
                metrics.clone(),
            )
            .await?,
        )
    } else {
        None
    };

    let http = if config.serve_api {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(ServeError::Http)?;
        tracing::info!(%addr, "HTTP API listening");
        let api_pool = crate::db::pool(
            &config.database,
            config.api_db_pool_size,
            &format!("spool-api:{}", config.executor.executor_id),
        );
        let state = AppState {
            pool: api_pool,
            registry,
            api_token: config.api_token.as_deref().map(Arc::from),
            metrics: metrics.clone(),
            max_body_bytes: config.max_body_bytes,
            live: live.clone(),
            readiness: Default::default(),
            edge: Arc::new(api::EdgePolicy::new(
                addr,
                &config.allowed_hosts,
                &config.allowed_origins,
            )),
            attach: Arc::new(AttachLimits::new(
                config.max_attachers,
                config.max_attachers_per_run,
                config.keep_alive,
            )),
        };
        let attachers = state.attach.clone();
        let app = api::router(state);
        // every connection holds a file: keep the cap below the process's limit
        let files = api::server::raise_open_files_limit().unwrap_or(1024);
        let max_connections = config
            .max_connections
            .min((files as usize).saturating_sub(256).max(16));
        if max_connections < config.max_connections {
            tracing::warn!(
                max_connections,
                open_files = files,
                "SPOOL_MAX_CONNECTIONS lowered to fit the open-file limit"
            );
        }
        let limits = api::server::ConnLimits {
            max_connections,
            header_timeout: config.header_timeout,
            write_timeout: config.slow_client_timeout,
        };
        let http_stop = stop.clone();
        let grace_over = {
            let stop = stop.clone();
            let grace = config.executor.grace_period;
            async move {
                stop.cancelled().await;
                tokio::time::sleep(grace).await;
            }
        };
        let metrics = metrics.clone();
        Some(tokio::spawn(async move {
            // Graceful: stop accepting, end every attach stream (with `reconnect`: its client
            // resumes elsewhere), let other requests finish. Bounded by the grace period, so a
            // connection that never finishes cannot keep the process alive.
            let server = api::server::serve(listener, app, limits, metrics, async move {
                http_stop.cancelled().await;
                attachers.end_all();
            });
            tokio::select! {
                _ = server => {}
                _ = grace_over => {
                    tracing::warn!("HTTP connections still open after the grace period; not waiting for them");
                }
            }
        }))
    } else {
        None
    };

    let signals = tokio::spawn(wait_for_signal(stop.clone()));
    let result = match executor {
        Some(executor) => {
            let exec_stop = executor.stop_token();
            let relay = stop.clone();
            let relay_task = tokio::spawn(async move {
                relay.cancelled().await;
                exec_stop.cancel();
            });
            let r = executor.wait().await;
            relay_task.abort();
            // the executor ended (drained, or fatally): stop the API too
            stop.cancel();
            r.map_err(ServeError::from)
        }
        None => {
            stop.cancelled().await;
            Ok(())
        }
    };
    signals.abort();
    if let Some(http) = http {
        if let Err(e) = http.await {
            tracing::warn!(error = %e, "HTTP server task failed");
        }
    }
    pool.close();
    result
}

async fn wait_for_signal(stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
        _ = stop.cancelled() => {}
    }
    stop.cancel();
}
