//! The description of the machine and software a table was measured on.

use std::process::Command;

use crate::harness::Bench;

/// The load average (1, 5, 15 minutes) right now, from /proc/loadavg.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Markdown lines describing the machine, the servers and the code: `commit` as recorded when
/// the binaries were built (git is asked now without it); `load_at_start` is the load average
/// when the bench started (other work on the machine skews every figure).
pub async fn describe(bench: &Bench, commit: Option<&str>, load_at_start: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let postgres = match crate::harness::connect(&bench.db_url("postgres")).await {
        Ok(c) => c
            .query_one("select version()", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|e| e.to_string()),
        Err(e) => e.to_string(),
    };
    let commit = commit.map(str::to_string).unwrap_or_else(|| {
        let dirty = !run(
            "git",
            &["status", "--porcelain", "--", "src", "sql", "Cargo.toml"],
        )
        .is_empty();
        let head = run("git", &["rev-parse", "--short", "HEAD"]);
        if dirty {
            format!("{head} with uncommitted changes in src/, sql/ or Cargo.*")
        } else {
            head
        }
    });
    let memory = run("free", &["-g"]);
    let nats = run("nats-server", &["--version"]);
    let nats = nats.trim_start_matches("nats-server: ");
    let mut out = String::new();
    out.push_str(&format!(
        "- date: {}\n",
        run("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
    ));
    out.push_str(&format!("- commit: {commit}\n"));
    out.push_str(&format!(
        "- CPU: {cpu}, {} cores (nproc)\n",
        run("nproc", &[])
    ));
    out.push_str(&format!("- kernel: {}\n", run("uname", &["-r"])));
    out.push_str(&format!("- PostgreSQL: {postgres} (private cluster, durable settings: fsync and synchronous_commit on)\n"));
    if !bench.db_settings.is_empty() {
        out.push_str(&format!(
            "- database settings (BENCH_DB_SETTINGS, an experiment): {}\n",
            bench.db_settings.join("; ")
        ));
    }
    out.push_str(&format!("- nats-server: {nats}\n"));
    out.push_str(&format!(
        "- Spool settings: SPOOL_CONCURRENCY {}, SPOOL_CLAIM_BATCH {}, RUST_LOG {}\n",
        bench.spool.concurrency,
        bench.spool.claim_batch,
        bench
            .spool
            .log
            .as_deref()
            .unwrap_or("unset (Spool's default: info)")
    ));
    out.push_str(&format!(
        "- load average (1, 5, 15 min): {load_at_start} at the start, {} at the end\n",
        load_average()
    ));
    out.push_str("- memory (`free -g`):\n\n```\n");
    out.push_str(&memory);
    out.push_str("\n```\n");
    out
}

/// The stdout of a command without trailing blanks, or what went wrong.
fn run(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).trim_end().to_string(),
        Err(e) => format!("({cmd}: {e})"),
    }
}
