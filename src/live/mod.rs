//! Live output over NATS JetStream: one stream, one subject per run attempt
//! (`{prefix}.{run_id}.{enqueue_seq}.{claim_epoch}`).
//!
//! An attempt purges only its own subject and its run's older attempts' subjects, never a
//! newer attempt's: a superseded attempt that is still running (a zombie) can publish on its own
//! subject, which attachers ignore, but cannot delete what the current attempt published. The
//! `enqueue_seq` token tells a run id inserted again apart from the row it replaced.
//!
//! - [`publisher::ChunkPublisher`] is a run attempt's [`crate::workflow::ChunkSink`]: it purges
//!   the run's subject (and awaits the purge) before the attempt's first message, publishes a
//!   `reset` on a re-run, pipelines chunks with a bounded window of pending acks, and publishes
//!   the end event only after the terminal status is committed in Postgres.
//! - [`attach`] turns a run's subject into the SSE attach protocol.
//!
//! Postgres stays the record of truth: nothing here decides a run's status, and a NATS outage
//! never fails or stalls a run.

mod acks;
pub mod attach;
pub mod feed;
mod parts;
pub mod publisher;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio_util::sync::CancellationToken;

/// Header names carried by every message on a run's subject.
pub mod header {
    /// `chunk`, `reset`, `done`, `failed` or `cancelled`.
    pub const KIND: &str = "Spool-Kind";
    pub const RUN: &str = "Spool-Run";
    pub const EPOCH: &str = "Spool-Epoch";
    pub const SEQ: &str = "Spool-Seq";
    /// Output generation within the attempt (raised by a republish).
    pub const GEN: &str = "Spool-Gen";
    /// On a message too large for one NATS message, published in parts: `i/n` (1-based).
    pub const PART: &str = "Spool-Part";
}

/// Credentials taken out of a NATS URL.
#[derive(Debug, PartialEq)]
enum Credentials {
    UserPassword(String, String),
    /// `nats://TOKEN@host`
    Token(String),
}

/// Splits the credentials (`user:password@` or `token@`) out of a NATS URL, a comma-separated
/// list of servers; the first found are used.
fn split_credentials(urls: &str) -> (Vec<String>, Option<Credentials>) {
    let mut credentials = None;
    let servers: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|server| !server.is_empty())
        .map(|server| {
            let Some((scheme, rest)) = server.split_once("://") else {
                return server.to_string();
            };
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let Some(at) = rest[..authority_end].rfind('@') else {
                return server.to_string();
            };
            let userinfo = &rest[..at];
            let decode = |s: &str| {
                // (percent-decoding; a `+` is a plus here, not a space as in forms)
                url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            if credentials.is_none() && !userinfo.is_empty() {
                credentials = Some(match userinfo.split_once(':') {
                    Some((user, password)) => {
                        Credentials::UserPassword(decode(user), decode(password))
                    }
                    None => Credentials::Token(decode(userinfo)),
                });
            }
            format!("{scheme}://{}", &rest[at + 1..])
        })
        .collect();
    (servers, credentials)
}

/// `text` with the user information of every URL in it replaced by `***`.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '/' | '?' | '"' | '\'' | ',' | ')'))
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Room kept for headers when a payload is split to fit the server's maximum payload.
const HEADER_ROOM: usize = 2048;

/// The context-wide bound of async-nats on pending acks: far above what publishers let pend.
const ACK_BACKSTOP: usize = 1 << 20;

/// Live-output settings.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    pub nats_url: String,
    pub stream: String,
    pub subject_prefix: String,
    pub max_age: Duration,
    pub duplicate_window: Duration,
    /// Publishes in flight before the publisher waits for the oldest ack.
    pub ack_window: usize,
    /// How long one NATS operation may take before the publisher treats NATS as unavailable.
    pub op_timeout: Duration,
    /// Copies of the stream JetStream keeps (`SPOOL_NATS_REPLICAS`).
    pub replicas: usize,
}

impl LiveSettings {
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            stream: "SPOOL_OUTPUT".into(),
            subject_prefix: "spool.output".into(),
            max_age: Duration::from_secs(24 * 3600),
            duplicate_window: Duration::from_secs(120),
            ack_window: 512,
            replicas: 1,
            op_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("NATS operation failed: {0}")]
    Nats(String),
    #[error("NATS did not answer within {0:?}")]
    Timeout(Duration),
    /// Messages JetStream did not acknowledge are still waiting to be sent again.
    #[error("{0} live-output messages are still to be sent again")]
    Behind(usize),
}

/// A connection to NATS plus the stream handle; shared by every publisher and attacher.
pub struct LiveOutput {
    pub settings: LiveSettings,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// Set once the stream exists (created or updated at start, retried until NATS answers).
    stream: tokio::sync::OnceCell<stream::Stream>,
    /// Background republishing of finished runs' output after a NATS outage; owned here so it
    /// ends with the process's live output.
    repairs: std::sync::Mutex<tokio::task::JoinSet<()>>,
    /// Publishes awaiting their ack across every publisher (see `publisher::MAX_ACKS_PENDING`).
    pub(crate) acks_pending: Arc<std::sync::atomic::AtomicUsize>,
    /// The shared readers of attached runs (see `feed`).
    pub feeds: feed::Feeds,
    repair_budget: Arc<RepairBudget>,
}

/// Repairs running at once, across the process.
pub const MAX_REPAIRS: usize = 64;
/// Output bytes the repairs running at once may hold, across the process.
pub const MAX_REPAIR_BYTES: usize = 64 << 20;

/// What the background repairs hold between them (count and bytes).
#[derive(Debug, Default)]
pub struct RepairBudget {
    held: std::sync::Mutex<(usize, usize)>,
}

/// A repair's share of the budget, given back when dropped.
pub struct RepairHeld {
    budget: Arc<RepairBudget>,
    bytes: usize,
}

impl RepairBudget {
    /// One repair holding `bytes`, if it fits within [`MAX_REPAIRS`] and [`MAX_REPAIR_BYTES`].
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<RepairHeld> {
        let mut held = self.held.lock().unwrap();
        if held.0 >= MAX_REPAIRS || held.1.saturating_add(bytes) > MAX_REPAIR_BYTES {
            return None;
        }
        held.0 += 1;
        held.1 += bytes;
        Some(RepairHeld {
            budget: self.clone(),
            bytes,
        })
    }

    /// (repairs, bytes) held right now.
    pub fn held(&self) -> (usize, usize) {
        *self.held.lock().unwrap()
    }
}

impl Drop for RepairHeld {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap();
        held.0 -= 1;
        held.1 -= self.bytes;
    }
}

impl LiveOutput {
    /// Connects (retrying in the background if NATS is not up yet) and starts a task that
    /// creates or updates the stream; `stop` ends that task.
    pub async fn connect(
        settings: LiveSettings,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, LiveError> {
        // Credentials in the URL go to the client as options, never in the URL it logs (async-nats
        // logs the server address at every reconnect) nor in an error.
        // Every server of the list goes to the client as its own address: given one string,
        // async-nats would parse the whole list as a single address.
        let (servers, credentials) = split_credentials(&settings.nats_url);
        let options = match credentials {
            Some(Credentials::UserPassword(user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user, password)
            }
            Some(Credentials::Token(token)) => async_nats::ConnectOptions::with_token(token),
            None => async_nats::ConnectOptions::new(),
        };
        let client = options
            .name("spool")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected; reconnecting")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            })
            .connect(servers.as_slice())
            .await
            .map_err(|e| LiveError::Connect {
                url: servers.join(","),
                message: redact(&e.to_string()),
            })?;
        // async-nats bounds the acks pending across the whole context and, by default, makes a
        // publish wait when 5,000 are pending. Publishers hold their pending acks until their own
        // window fills, so 20 runs with 512 each would wait on each other until the operation
        // timeout. The per-run window (`ack_window`) and the total (`MAX_ACKS_PENDING`, enforced
        // by `ChunkPublisher`) are ours; this bound is only a backstop above both.
        let js = jetstream::ContextBuilder::new()
            .timeout(settings.op_timeout)
            .max_ack_inflight(ACK_BACKSTOP)
            .build(client.clone());
        let live = Arc::new(Self {
            settings,
            client,
            js,
            stream: tokio::sync::OnceCell::new(),
            repairs: std::sync::Mutex::new(tokio::task::JoinSet::new()),
            acks_pending: Arc::default(),
            feeds: feed::Feeds::default(),
            repair_budget: Arc::default(),
        });
        let setup = live.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match setup.ensure_stream().await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create the live-output stream yet")
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        Ok(live)
    }

    /// The stream, created or updated on first use.
    pub async fn ensure_stream(&self) -> Result<&stream::Stream, LiveError> {
        self.stream
            .get_or_try_init(|| async {
                let s = &self.settings;
                let config = stream::Config {
                    name: s.stream.clone(),
                    subjects: vec![format!("{}.>", s.subject_prefix)],
                    storage: stream::StorageType::File,
                    max_age: s.max_age,
                    duplicate_window: s.duplicate_window.min(s.max_age),
                    allow_direct: true,
                    num_replicas: s.replicas,
                    ..Default::default()
                };
                let op = async {
                    self.js
                        .create_or_update_stream(config)
                        .await
                        .map_err(|e| LiveError::Nats(e.to_string()))?;
                    self.js
                        .get_stream(&s.stream)
                        .await
                        .map_err(|e| LiveError::Nats(e.to_string()))
                };
                tokio::time::timeout(self.settings.op_timeout, op)
                    .await
                    .map_err(|_| LiveError::Timeout(self.settings.op_timeout))?
            })
            .await
    }

    /// The subject of one attempt's live output. Run ids are validated (letters, digits, `-`,
    /// `_`, `:`), so they are always one subject token.
    pub fn subject(&self, run_id: &str, enqueue_seq: i64, claim_epoch: i64) -> String {
        format!(
            "{}.{run_id}.{enqueue_seq}.{claim_epoch}",
            self.settings.subject_prefix
        )
    }

    /// The subjects of every attempt of a run (a wildcard ending in the claim epoch).
    pub fn run_subjects(&self, run_id: &str, enqueue_seq: i64) -> String {
        format!("{}.{run_id}.{enqueue_seq}.*", self.settings.subject_prefix)
    }

    /// The claim epoch an attempt's subject ends with.
    pub fn epoch_of_subject(subject: &str) -> Option<i64> {
        subject.rsplit('.').next()?.parse().ok()
    }

    /// Runs a repair task in the background (see the publisher) that holds `bytes` of output,
    /// unless the repairs already running hold [`MAX_REPAIRS`] or [`MAX_REPAIR_BYTES`] between
    /// them: then the task is not run and `false` returned (attachers get the run's end from
    /// Postgres instead).
    pub fn spawn_repair(
        &self,
        bytes: usize,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> bool {
        let mut repairs = self.repairs.lock().unwrap();
        while repairs.try_join_next().is_some() {}
        let Some(held) = self.repair_budget.reserve(bytes) else {
            return false;
        };
        repairs.spawn(async move {
            let _held = held;
            task.await
        });
        true
    }

    /// The largest payload one message may carry: the server's maximum payload (1 MiB unless
    /// configured otherwise) less room for the headers.
    pub fn max_part(&self) -> usize {
        let max = match self.client.server_info().max_payload {
            0 => 1 << 20,
            n => n,
        };
        max.saturating_sub(HEADER_ROOM).max(HEADER_ROOM)
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_nats_url_and_every_message() {
        assert_eq!(
            split_credentials("nats://u:p%40ss@a:4222, nats://b:4222"),
            (
                vec!["nats://a:4222".to_string(), "nats://b:4222".to_string()],
                Some(Credentials::UserPassword("u".into(), "p@ss".into()))
            )
        );
        assert_eq!(
            split_credentials("nats://s3cr3t@a"),
            (
                vec!["nats://a".to_string()],
                Some(Credentials::Token("s3cr3t".into()))
            )
        );
        assert_eq!(
            split_credentials("nats://a:4222"),
            (vec!["nats://a:4222".to_string()], None)
        );
        assert_eq!(
            redact("cannot reach postgres://me:PW@db:5432/x or nats://TOKEN@n"),
            "cannot reach postgres://***@db:5432/x or nats://***@n"
        );
    }

    #[test]
    fn background_repairs_are_bounded_in_count_and_bytes_and_give_back_what_they_held() {
        let budget = Arc::new(RepairBudget::default());
        let held: Vec<_> = (0..MAX_REPAIRS)
            .map(|_| budget.reserve(1).expect("within the count"))
            .collect();
        assert!(budget.reserve(1).is_none(), "one repair too many");
        drop(held);
        assert_eq!(budget.held(), (0, 0));
        let big = budget
            .reserve(MAX_REPAIR_BYTES - 10)
            .expect("within the bytes");
        assert!(budget.reserve(11).is_none(), "one byte too many");
        let small = budget.reserve(10).expect("exactly at the bound");
        drop((big, small));
        assert_eq!(budget.held(), (0, 0));
    }
}
