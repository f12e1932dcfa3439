//! The `spool` command line: `serve`, `migrate`, `enqueue`, `runs list|show|cancel`.
//!
//! [`main_with`] is the whole program for a given workflow registry, so a user's own server binary
//! (see `examples/server.rs`) is `spool` plus its workflows.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ServeArgs};
use crate::db::runs::{self, NewRun, RunFilter};
use crate::db::{self, steps, PgTarget};
use crate::workflow::Registry;

#[derive(Debug, Parser)]
#[command(name = "spool", version, about = "A durable run queue on PostgreSQL")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an executor and the HTTP API (migrates first).
    Serve(Box<ServeArgs>),
    /// Apply the schema migrations and exit.
    Migrate(MigrateArgs),
    /// Enqueue a run; prints its id.
    Enqueue(EnqueueArgs),
    /// Inspect and cancel runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Print a run's live output as it arrives; exit 0 on done, 1 on failed or cancelled.
    Attach(AttachArgs),
    /// Serve a mock OpenAI-compatible streaming endpoint (deterministic tokens, injectable
    /// faults) for trying `llm.chat` without a provider; see `spool::llm::mock`.
    MockLlm(MockLlmArgs),
}

#[derive(Debug, Clone, Args)]
pub struct MockLlmArgs {
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: std::net::SocketAddr,
    /// Require `Authorization: Bearer <key>` (401 otherwise).
    #[arg(long, env = "MOCK_LLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// Run id.
    pub id: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Base URL of a `spool serve` HTTP API.
    #[arg(
        long = "url",
        env = "SPOOL_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Bearer token, when the server has one.
    #[arg(long = "token", env = "SPOOL_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print each chunk on its own line (default: chunks are printed as they are).
    #[arg(long)]
    pub lines: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URI or libpq key=value string (sslmode and sslrootcert as libpq means them).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// How long (ms) to wait for another session holding the migration lock.
    #[arg(
        long,
        env = "SPOOL_MIGRATION_LOCK_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub lock_timeout_ms: u64,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Workflow name.
    pub workflow: String,
    /// JSON input.
    #[arg(long, default_value = "{}")]
    pub input: String,
    /// Run id (default: a UUID).
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    /// Concurrency key.
    #[arg(long)]
    pub key: Option<String>,
    /// Cancel the key's running run and its earlier queued runs (key_policy `replace`).
    #[arg(long, requires = "key")]
    pub replace: bool,
    #[arg(long)]
    pub priority: Option<i32>,
    /// Delay before the run may start: 500ms, 5s, 2m, or plain milliseconds.
    #[arg(long)]
    pub delay: Option<String>,
    #[arg(long)]
    pub max_attempts: Option<i32>,
    /// Attach to the run's live output right away (as `spool attach`).
    #[arg(long)]
    pub attach: bool,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Newest runs first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[command(flatten)]
        db: DbArgs,
    },
    /// One run with its steps, as JSON.
    Show {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Cancel a run (queued: at once; running: at its next step boundary).
    Cancel {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

/// Parses arguments and runs the command with `registry` as the executor's workflows.
pub async fn main_with(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_tracing() {
        eprintln!("spool: {e}");
        return ExitCode::from(2);
    }
    match run(cli, registry).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spool: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr: as text for people (the default), or with `SPOOL_LOG_FORMAT=json` one JSON
/// object per line for log pipelines: `timestamp`, `level`, `target`, the event's fields at the
/// top level (`message`, `error`, …) and `spans`, the enclosing spans' fields, outermost first —
/// `executor` (`executor_id`, `incarnation`) and `run` (`run_id`, `epoch`, `workflow`) where
/// they apply.
fn init_tracing() -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,refinery_core=warn"));
    let format = std::env::var("SPOOL_LOG_FORMAT").unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format.trim() {
        "" | "text" => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        "json" => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
        other => return Err(format!("SPOOL_LOG_FORMAT={other:?}: expected text or json")),
    };
    Ok(())
}

async fn run(cli: Cli, registry: Registry) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let config = Config::from_args(*args)?;
            crate::serve::serve(config, registry, CancellationToken::new()).await?;
        }
        Command::MockLlm(args) => {
            crate::llm::mock::serve(args.listen, args.api_key).await?;
        }
        Command::Migrate(args) => {
            let target = PgTarget::parse(&args.db.database_url)?;
            let timeout = std::time::Duration::from_millis(args.lock_timeout_ms);
            let applied = crate::migrate::migrate(&target, timeout).await?;
            println!("migrations applied: {applied:?}");
        }
        Command::Enqueue(args) => {
            let input: Value = serde_json::from_str(&args.input)
                .map_err(|e| anyhow::anyhow!("--input is not valid JSON: {e}"))?;
            if let Some(id) = &args.id {
                crate::validate::run_id(id).map_err(anyhow::Error::msg)?;
            }
            let delay_ms = args.delay.as_deref().map(parse_delay).transpose()?;
            let client = connect(&args.db).await?;
            let new = NewRun {
                id: args.id,
                workflow: args.workflow,
                input,
                queue: args.queue,
                concurrency_key: args.key,
                priority: args.priority,
                max_attempts: args.max_attempts,
                delay_ms,
                run_at: None,
                key_policy: args.replace.then(|| "replace".to_string()),
            };
            let (run, _created) = runs::insert_run(&client.client, &new).await?;
            println!("{}", run.id);
            if args.attach {
                return crate::cli_attach::attach(&args.server, &run.id).await;
            }
        }
        Command::Attach(args) => return crate::cli_attach::attach(&args.server, &args.id).await,
        Command::Runs(RunsCommand::List {
            status,
            workflow,
            limit,
            db,
        }) => {
            let client = connect(&db).await?;
            // the table shows no values: none are fetched, and no byte bound applies
            let filter = RunFilter {
                status,
                workflow,
                limit,
                max_bytes: i64::MAX,
                ..Default::default()
            };
            let (runs, _) = runs::list_runs(&client.client, &filter).await?;
            println!(
                "{:<38} {:<12} {:<10} {:>7} {:<16} created",
                "id", "workflow", "status", "attempt", "executor"
            );
            for r in runs.into_iter().map(|l| l.run) {
                println!(
                    "{:<38} {:<12} {:<10} {:>7} {:<16} {}",
                    r.id,
                    r.workflow,
                    r.status,
                    r.attempt,
                    r.executor_id.as_deref().unwrap_or("-"),
                    r.created_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        Command::Runs(RunsCommand::Show { id, db }) => {
            let client = connect(&db).await?;
            let run = runs::get_run(&client.client, &id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no run with id {id:?}"))?;
            let steps = steps::load_steps(&client.client, &id).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"run": run, "steps": steps}))?
            );
        }
        Command::Runs(RunsCommand::Cancel { id, db }) => {
            let client = connect(&db).await?;
            let run = runs::cancel_run(&client.client, &id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no run with id {id:?}"))?;
            let note = if run.status == "running" {
                " (cancel requested; it stops at its next step boundary)"
            } else {
                ""
            };
            println!("{} {}{note}", run.id, run.status);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(db: &DbArgs) -> anyhow::Result<db::DedicatedConnection> {
    let target = PgTarget::parse(&db.database_url)?;
    Ok(db::connect_dedicated(&target, "spool-cli", None).await?)
}

fn parse_delay(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    let (num, factor) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1)
    };
    let n: i64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("--delay {s:?}: use 500ms, 5s, 2m, 1h or milliseconds"))?;
    Ok(n * factor)
}
