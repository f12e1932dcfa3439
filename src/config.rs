//! One [`Config`] for `spool serve`, read from flags and the environment (the same names) and
//! validated once at startup. No silent defaults for secrets or addresses: a non-loopback listen
//! address without a token is refused unless explicitly allowed.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::db::PgTarget;
use crate::executor::ExecutorSettings;
use crate::live::LiveSettings;

/// Flags of `spool serve`; each also reads the environment variable named.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// PostgreSQL URI or libpq key=value string; its sslmode and sslrootcert mean what they mean
    /// to libpq, for every connection.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// NATS server for live output (optional; without it chunks are not published).
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// JetStream stream holding live output.
    #[arg(long, env = "SPOOL_NATS_STREAM", default_value = "SPOOL_OUTPUT")]
    pub nats_stream: String,
    /// Subject prefix of live output; a run attempt's subject is
    /// `{prefix}.{run_id}.{enqueue_seq}.{claim_epoch}`.
    #[arg(
        long,
        env = "SPOOL_NATS_SUBJECT_PREFIX",
        default_value = "spool.output"
    )]
    pub nats_subject_prefix: String,
    /// How long live output is kept in JetStream, in seconds.
    #[arg(long, env = "SPOOL_CHUNK_MAX_AGE_SECS", default_value_t = 86_400)]
    pub chunk_max_age_secs: u64,
    /// Copies of the live-output stream JetStream keeps (1, 3 or 5; more than 1 needs a NATS
    /// cluster). Applied when the stream is created or updated.
    #[arg(long, env = "SPOOL_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,
    /// Live-output publishes awaiting their JetStream ack, per run attempt, before the publisher
    /// waits for the oldest.
    #[arg(long, env = "SPOOL_NATS_ACK_WINDOW", default_value_t = 512)]
    pub nats_ack_window: usize,
    /// Most clients attached to live output at once (429 past it).
    #[arg(long, env = "SPOOL_MAX_ATTACHERS", default_value_t = 10_000)]
    pub max_attachers: usize,
    /// Most clients attached to one run at once (429 past it).
    #[arg(long, env = "SPOOL_MAX_ATTACHERS_PER_RUN", default_value_t = 1_000)]
    pub max_attachers_per_run: usize,
    /// A client whose connection accepts no data for this long is cut (it resumes with
    /// Last-Event-ID), in milliseconds.
    #[arg(long, env = "SPOOL_SLOW_CLIENT_TIMEOUT_MS", default_value_t = 10_000)]
    pub slow_client_timeout_ms: u64,
    /// A connection must send a whole request head within this many milliseconds of opening
    /// (or of its previous response ending), or it is closed.
    #[arg(long, env = "SPOOL_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Open HTTP connections at most (kept below the open-file limit); at the cap the oldest
    /// connection serving no request is closed for a new one.
    #[arg(long, env = "SPOOL_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,
    /// Keep-alive comment interval on idle attach streams, in milliseconds.
    #[arg(long, env = "SPOOL_KEEPALIVE_MS", default_value_t = 15_000)]
    pub keepalive_ms: u64,
    /// Stable executor id (like a StatefulSet pod name). Falls back to POD_NAME.
    #[arg(long, env = "SPOOL_EXECUTOR_ID")]
    pub executor_id: Option<String>,
    /// `production` refuses to start without a stable executor id.
    #[arg(long, env = "SPOOL_ENV", default_value = "development")]
    pub env: String,
    /// HTTP listen address.
    #[arg(long, env = "SPOOL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Bearer token required by every endpoint but health.
    #[arg(long, env = "SPOOL_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// OpenAI-compatible endpoint of the `llm.chat` workflow, as the OpenAI SDKs take it (for
    /// example `https://api.openai.com/v1`); unset: no `llm.chat`.
    #[arg(long, env = "SPOOL_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    /// API key of that endpoint (or `SPOOL_LLM_API_KEY_FILE`, a file holding it).
    #[arg(long, env = "SPOOL_LLM_API_KEY", hide_env_values = true)]
    pub llm_api_key: Option<String>,
    #[arg(long, env = "SPOOL_LLM_API_KEY_FILE")]
    pub llm_api_key_file: Option<std::path::PathBuf>,
    /// Longest one model request may take, streaming included, in milliseconds.
    #[arg(long, env = "SPOOL_LLM_REQUEST_TIMEOUT_MS", default_value_t = 600_000)]
    pub llm_request_timeout_ms: u64,
    /// Longest wait for the first token, and between tokens, in milliseconds.
    #[arg(
        long,
        env = "SPOOL_LLM_FIRST_TOKEN_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub llm_first_token_timeout_ms: u64,
    /// Reply text is sent to attachers at most this long after it arrived, in milliseconds ...
    #[arg(long, env = "SPOOL_LLM_FLUSH_MS", default_value_t = 50)]
    pub llm_flush_ms: u64,
    /// ... or once this many bytes are waiting.
    #[arg(long, env = "SPOOL_LLM_FLUSH_BYTES", default_value_t = 512)]
    pub llm_flush_bytes: usize,
    /// Host names (comma-separated, `*` for any) the API answers to; default: loopback names
    /// when listening on a loopback address, any host otherwise.
    #[arg(long, env = "SPOOL_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Browser origins (comma-separated, e.g. `https://app.example`) allowed besides the
    /// server's own.
    #[arg(long, env = "SPOOL_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Serve a non-loopback address without a token (you take responsibility).
    #[arg(long, env = "SPOOL_ALLOW_UNAUTHENTICATED", default_value_t = false)]
    pub allow_unauthenticated: bool,
    /// Worker slots: runs executing at once. Unset: adaptive, between 16 and 2048 (many in
    /// flight while runs are short and work waits, few while runs are long).
    #[arg(long, env = "SPOOL_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Most runs claimed per statement (a claim never asks for more than the free slots).
    #[arg(long, env = "SPOOL_CLAIM_BATCH", default_value_t = 512)]
    pub claim_batch: usize,
    /// Pooled Postgres connections of the executor (memo reads, batched writes); the claim has
    /// two of its own and the executor lock and wake-up listener one each.
    #[arg(long, env = "SPOOL_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// Pooled Postgres connections of the HTTP API (its own pool: no request waits on, or
    /// takes from, the executor's connections).
    #[arg(long, env = "SPOOL_API_DB_POOL_SIZE", default_value_t = 8)]
    pub api_db_pool_size: usize,
    /// Comma-separated queues to serve (default: all).
    #[arg(long, env = "SPOOL_QUEUES", value_delimiter = ',')]
    pub queues: Option<Vec<String>>,
    /// Grace period on SIGTERM/SIGINT, in milliseconds: for in-flight runs (then released to the
    /// queue) and HTTP requests (then closed); attach streams end at once with `reconnect`.
    #[arg(long, env = "SPOOL_GRACE_PERIOD_MS", default_value_t = 10_000)]
    pub grace_period_ms: u64,
    /// Fallback poll interval in milliseconds (jittered).
    #[arg(long, env = "SPOOL_POLL_INTERVAL_MS", default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// How often owned runs that nobody executes are taken back, in milliseconds.
    #[arg(long, env = "SPOOL_RECOVERY_INTERVAL_MS", default_value_t = 10_000)]
    pub recovery_interval_ms: u64,
    /// The executor's lease (ms): it renews its heartbeat every quarter of it and stops
    /// executing if it cannot renew within it; others deem it dead once it expires.
    #[arg(long, env = "SPOOL_LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    /// Runs of an executor whose lease expired this long ago (ms) are adopted by live executors;
    /// 0 disables takeover (runs wait for the same executor id, as with a StatefulSet).
    #[arg(long, env = "SPOOL_TAKEOVER_AFTER_MS", default_value_t = 30_000)]
    pub takeover_after_ms: u64,
    /// After repeated crashes, how long (ms) each group of suspect runs executes alone before
    /// the next starts.
    #[arg(long, env = "SPOOL_PROBATION_MS", default_value_t = 2_000)]
    pub probation_ms: u64,
    /// At start, wait this long (ms) for a draining process with the same executor id to exit
    /// (rolling restarts); 0 refuses at once.
    #[arg(long, env = "SPOOL_LOCK_WAIT_MS", default_value_t = 0)]
    pub lock_wait_ms: u64,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "SPOOL_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Only serve the HTTP API; claim nothing.
    #[arg(long, conflicts_with = "worker_only")]
    pub api_only: bool,
    /// Only execute runs; no HTTP API.
    #[arg(long)]
    pub worker_only: bool,
    /// Finished runs (and their steps) are deleted this long after they finished: `7d`, `12h`,
    /// `90m`, … or `off`. A queue's row in `spool.queue_retention` overrides it.
    #[arg(long, env = "SPOOL_RETENTION", default_value = "7d")]
    pub retention: String,
    /// How often (ms) each executor asks for the maintenance lease (retention, database metrics).
    #[arg(long, env = "SPOOL_MAINTENANCE_INTERVAL_MS", default_value_t = 10_000)]
    pub maintenance_interval_ms: u64,
    /// Never migrate: wait (up to SPOOL_MIGRATION_LOCK_TIMEOUT_MS) for the schema to be current,
    /// for roles that may only read and write rows.
    #[arg(long, env = "SPOOL_NO_MIGRATE")]
    pub no_migrate: bool,
    /// How long (ms) to wait for another session's migration (or, with --no-migrate, for the
    /// schema to become current) before giving up.
    #[arg(
        long,
        env = "SPOOL_MIGRATION_LOCK_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub migration_lock_timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("SPOOL_ENV=production requires a stable SPOOL_EXECUTOR_ID (or POD_NAME): a random id per boot strands in-flight runs forever")]
    MissingExecutorId,
    #[error("SPOOL_RETENTION={0:?}: expected a duration such as 7d, 12h or 90m, or off")]
    BadRetention(String),
    #[error("invalid executor id {0:?}: use 1-128 letters, digits, '-', '_', ':' or '.'")]
    BadExecutorId(String),
    #[error("refusing to listen on {0} without SPOOL_API_TOKEN; set a token or pass --allow-unauthenticated")]
    UnauthenticatedListen(SocketAddr),
    #[error("{0}")]
    Database(#[from] crate::db::tls::TlsError),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("cannot read SPOOL_LLM_API_KEY_FILE {0}: {1}")]
    LlmKeyFile(String, String),
    #[error("SPOOL_API_TOKEN is refused: {0}; use a random one, e.g. `openssl rand -hex 32`")]
    WeakToken(&'static str),
    #[error("{0} must be between {1}")]
    Range(&'static str, &'static str),
}

/// Validated settings of one `spool serve` process.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: PgTarget,
    /// Live output; `None` without NATS_URL (chunks go nowhere, attach answers 503).
    pub live: Option<LiveSettings>,
    pub max_attachers: usize,
    pub max_attachers_per_run: usize,
    pub slow_client_timeout: Duration,
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub keep_alive: Duration,
    pub listen: SocketAddr,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
    pub api_token: Option<String>,
    /// `llm.chat` settings; `None` without `SPOOL_LLM_BASE_URL`.
    pub llm: Option<crate::llm::LlmSettings>,
    pub max_body_bytes: usize,
    /// Pooled Postgres connections of the executor (`SPOOL_DB_POOL_SIZE`).
    pub db_pool_size: usize,
    /// Pooled Postgres connections of the HTTP API (`SPOOL_API_DB_POOL_SIZE`).
    pub api_db_pool_size: usize,
    pub serve_api: bool,
    pub run_executor: bool,
    pub executor: ExecutorSettings,
    /// True when the executor id was generated (not stable across restarts).
    pub generated_executor_id: bool,
    /// Never migrate; wait for the schema to be current (`--no-migrate`).
    pub no_migrate: bool,
    pub migration_lock_timeout: Duration,
}

/// `SPOOL_RETENTION`: a duration (`7d`, `36h`, `90m`, `1h 30m`) or `off`.
fn parse_retention(value: &str) -> Result<Option<Duration>, ConfigError> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        _ => Err(ConfigError::BadRetention(value.to_string())),
    }
}

/// Tokens that appear in examples and defaults: a server set up with one is not protected.
const WELL_KNOWN_TOKENS: [&str; 8] = [
    "change-me",
    "changeme",
    "secret",
    "token",
    "password",
    "spool",
    "test",
    "admin",
];

/// Minimum length of an API token.
pub const MIN_TOKEN_LEN: usize = 16;

/// Refuses a token that is blank, padded with whitespace, well known, or short.
pub fn check_token(token: &str) -> Result<(), ConfigError> {
    if token.trim().is_empty() {
        return Err(ConfigError::WeakToken("it is only whitespace"));
    }
    if token.trim() != token || token.chars().any(char::is_whitespace) {
        return Err(ConfigError::WeakToken("it contains whitespace"));
    }
    if WELL_KNOWN_TOKENS
        .iter()
        .any(|w| token.eq_ignore_ascii_case(w))
    {
        return Err(ConfigError::WeakToken("it is a well-known example value"));
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(ConfigError::WeakToken("it is shorter than 16 characters"));
    }
    Ok(())
}

impl Config {
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let database = PgTarget::parse(&args.database_url)?;
        let stable_id = args
            .executor_id
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .filter(|s| !s.is_empty());
        let generated_executor_id = stable_id.is_none();
        let executor_id = match stable_id {
            Some(id) => id,
            None if args.env == "production" => return Err(ConfigError::MissingExecutorId),
            None => format!("spool-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        };
        crate::validate::name("executor id", &executor_id)
            .map_err(|_| ConfigError::BadExecutorId(executor_id.clone()))?;
        let api_token = args.api_token.filter(|t| !t.is_empty());
        if let Some(token) = &api_token {
            check_token(token)?;
        }
        let llm = match args.llm_base_url.filter(|u| !u.trim().is_empty()) {
            None => None,
            Some(base_url) => {
                let key = match (args.llm_api_key, &args.llm_api_key_file) {
                    (Some(k), _) if !k.is_empty() => Some(k),
                    (_, Some(path)) => Some(
                        std::fs::read_to_string(path)
                            .map_err(|e| {
                                ConfigError::LlmKeyFile(path.display().to_string(), e.to_string())
                            })?
                            .trim()
                            .to_string(),
                    ),
                    _ => None,
                };
                let mut s = crate::llm::LlmSettings::new(base_url);
                s.api_key = key;
                s.request_timeout = Duration::from_millis(args.llm_request_timeout_ms.max(1));
                s.first_token_timeout =
                    Duration::from_millis(args.llm_first_token_timeout_ms.max(1));
                s.flush_interval = Duration::from_millis(args.llm_flush_ms);
                s.flush_bytes = args.llm_flush_bytes.max(1);
                Some(s)
            }
        };
        let serve_api = !args.worker_only;
        if serve_api
            && api_token.is_none()
            && !args.listen.ip().is_loopback()
            && !args.allow_unauthenticated
        {
            return Err(ConfigError::UnauthenticatedListen(args.listen));
        }
        if args.concurrency == Some(0) {
            return Err(ConfigError::Zero("SPOOL_CONCURRENCY"));
        }
        if args.claim_batch == 0 {
            return Err(ConfigError::Zero("SPOOL_CLAIM_BATCH"));
        }
        if args.db_pool_size == 0 {
            return Err(ConfigError::Zero("SPOOL_DB_POOL_SIZE"));
        }
        if args.max_connections == 0 {
            return Err(ConfigError::Zero("SPOOL_MAX_CONNECTIONS"));
        }
        if args.api_db_pool_size == 0 {
            return Err(ConfigError::Zero("SPOOL_API_DB_POOL_SIZE"));
        }
        let mut executor = ExecutorSettings::new(executor_id);
        executor.adaptive = args.concurrency.is_none();
        executor.concurrency = args
            .concurrency
            .unwrap_or(crate::executor::slots::ADAPTIVE_CAP);
        executor.claim_batch = args.claim_batch;
        executor.queues = args.queues;
        executor.grace_period = Duration::from_millis(args.grace_period_ms);
        executor.poll_interval = Duration::from_millis(args.poll_interval_ms.max(1));
        executor.lock_wait = Duration::from_millis(args.lock_wait_ms);
        executor.recovery_interval = Duration::from_millis(args.recovery_interval_ms.max(100));
        executor.probation = Duration::from_millis(args.probation_ms);
        if !(100..=86_400_000).contains(&args.lease_ms) {
            return Err(ConfigError::Range("SPOOL_LEASE_MS", "100 to 86400000"));
        }
        if args.takeover_after_ms > 604_800_000 {
            return Err(ConfigError::Range(
                "SPOOL_TAKEOVER_AFTER_MS",
                "0 to 604800000",
            ));
        }
        executor.lease = Duration::from_millis(args.lease_ms);
        executor.takeover_after = Duration::from_millis(args.takeover_after_ms);
        executor.retention = parse_retention(&args.retention)?;
        executor.maintenance_interval = Duration::from_millis(args.maintenance_interval_ms.max(10));
        let live = args.nats_url.filter(|u| !u.is_empty()).map(|url| {
            let mut l = LiveSettings::new(url);
            l.stream = args.nats_stream;
            l.subject_prefix = args.nats_subject_prefix;
            l.max_age = Duration::from_secs(args.chunk_max_age_secs.max(1));
            l.ack_window = args.nats_ack_window.max(1);
            l.replicas = usize::from(args.nats_replicas);
            l
        });
        Ok(Self {
            database,
            live,
            max_attachers: args.max_attachers,
            max_attachers_per_run: args.max_attachers_per_run,
            slow_client_timeout: Duration::from_millis(args.slow_client_timeout_ms.max(1)),
            header_timeout: Duration::from_millis(args.header_timeout_ms.max(1)),
            max_connections: args.max_connections,
            keep_alive: Duration::from_millis(args.keepalive_ms.max(100)),
            listen: args.listen,
            llm,
            allowed_hosts: args.allowed_hosts,
            allowed_origins: args.allowed_origins,
            api_token,
            max_body_bytes: args.max_body_bytes,
            db_pool_size: args.db_pool_size,
            api_db_pool_size: args.api_db_pool_size,
            serve_api,
            run_executor: !args.api_only,
            executor,
            generated_executor_id,
            no_migrate: args.no_migrate,
            migration_lock_timeout: Duration::from_millis(args.migration_lock_timeout_ms),
        })
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn a_blank_padded_well_known_or_short_token_is_refused() {
        for bad in [
            "   ",
            " 0123456789abcdef0123",
            "change-me",
            "CHANGEME",
            "short-token",
        ] {
            assert!(check_token(bad).is_err(), "{bad:?}");
        }
        assert!(check_token("0123456789abcdef0123456789abcdef").is_ok());
    }
}

#[cfg(test)]
mod retention_tests {
    use super::*;

    #[test]
    fn retention_is_a_duration_or_off() {
        assert_eq!(
            parse_retention("7d").unwrap(),
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            parse_retention("1h 30m").unwrap(),
            Some(Duration::from_secs(5_400))
        );
        assert_eq!(parse_retention(" OFF ").unwrap(), None);
        for bad in ["", "0s", "seven days", "-1d"] {
            assert!(parse_retention(bad).is_err(), "{bad:?}");
        }
    }
}
