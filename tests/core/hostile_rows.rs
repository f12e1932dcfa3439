//! Invariant 9 for rows written by hand: thousands of plain `INSERT`s, each setting one or two
//! columns of `spool.runs` (or a row of `spool.operation_outputs`) to an edge value —
//! infinities, extreme numbers, deep and huge JSON, odd unicode, boundary integers — mixed with
//! normal runs. Every such row is either refused by the database (a data exception or a named
//! constraint: SQLSTATE class 22 or 23) or ends in a documented state; no executor panics, no
//! claim stalls, every normal run succeeds, and the API answers for every row.
//!
//! Seeded: `SPOOL_HOSTILE_SEED` and `SPOOL_HOSTILE_ROWS` (`just hostile` runs a long one).

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use spool::Registry;

use crate::common::{wait_until, TestDb};

const DEEP: &str = "(repeat('[', 200) || repeat(']', 200))::jsonb";

/// Edge values per column, as SQL expressions.
fn edges(column: &str) -> &'static [&'static str] {
    match column {
        "id" => &["''", "repeat('a', 129)", "'ä'", "'a b'", "'a.b'", "'a/b'"],
        "workflow" => &[
            "''",
            "repeat('w', 129)",
            "'no such'",
            "'nope'",
            "'ticker'",
            "'noop'",
        ],
        "input" => &[
            DEEP,
            "'{\"count\": 1e400}'",
            "'{\"count\": -1}'",
            "'{\"count\": 2, \"interval_ms\": 1}'",
            "'{\"count\": 3, \"interval_ms\": 1, \"steps\": 3}'",
            "'null'",
            "'\"s\"'",
            "'[]'",
            "jsonb_build_object('big', repeat('x', 200000))",
            "'{\"k\": \"\\u0000\"}'",
            "'{\"e\": \"😀\\u200b\\ufeff\\ud7ff\"}'",
            "'1e-400'",
            "'123456789012345678901234567890'",
            "'-0'",
            "'{\"unknown\": 1}'",
        ],
        "queue" => &["''", "repeat('q', 129)", "'q q'", "'other'", "'a.b:c-d_e'"],
        "concurrency_key" => &[
            "''",
            "repeat('k', 1025)",
            "E'\\t\\n🎉'",
            "'odd-k-1'",
            "'odd-k-2'",
            "repeat('k', 1024)",
        ],
        "priority" => &["-2147483648", "2147483647", "2147483648", "-2147483649"],
        "run_at" => &[
            "'-infinity'",
            "'infinity'",
            "'0001-01-01 00:00:00+00'",
            "'0001-01-02 00:00:00+00'",
            "'9999-12-31 00:00:00+00'",
            "'294276-12-31'",
            "'4713-01-01 BC'",
            "now() + interval '100 years'",
            "now() - interval '100 years'",
        ],
        "status" => &["'running'", "'succeeded'", "'bogus'", "'queued'", "''"],
        "executor_id" => &["'ghost'", "repeat('e', 5000)", "''"],
        "incarnation" => &["-1", "9223372036854775807"],
        "claim_epoch" => &[
            "-1",
            "9223372036854775807",
            "1000000000000000",
            "999999999999999",
        ],
        "attempt" => &["-1", "2147483647", "1000000", "999999", "5", "6"],
        "max_attempts" => &["0", "1001", "1", "1000", "-2147483648"],
        "cancel_requested" => &["true"],
        "output" => &[DEEP, "'1e400'", "'\"done\"'"],
        "error" => &[DEEP, "'{\"code\": 1e400}'"],
        "created_at" => &["'infinity'", "'-infinity'", "'0001-01-02 00:00:00+00'"],
        "started_at" => &["'infinity'", "'epoch'", "'-infinity'"],
        "finished_at" => &["now()", "'infinity'"],
        "updated_at" => &["'-infinity'", "'9999-12-31 00:00:00+00'"],
        "key_ready" => &["false"],
        _ => unreachable!("{column}"),
    }
}

const COLUMNS: &[&str] = &[
    "id",
    "workflow",
    "input",
    "input",
    "input",
    "queue",
    "concurrency_key",
    "concurrency_key",
    "priority",
    "run_at",
    "run_at",
    "status",
    "executor_id",
    "incarnation",
    "claim_epoch",
    "attempt",
    "max_attempts",
    "cancel_requested",
    "output",
    "error",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "key_ready",
];

/// Edge rows of `spool.operation_outputs` for a run of `ticker` (count 2, one step).
const STEP_EDGES: &[&str] = &[
    "(run, 1, 'ticks-1-2', '2', null, 0, now(), array['tick-1', 'tick-2'])",
    "(run, 1, 'another name', '2', null, 0, now(), '{}')",
    "(run, 1, 'ticks-1-2', (repeat('[', 200) || repeat(']', 200))::jsonb, null, 0, now(), '{}')",
    "(run, 1, 'ticks-1-2', '1e400', null, 0, now(), '{}')",
    "(run, 1, 'ticks-1-2', '2', null, 0, now(), array[null]::text[])",
    "(run, 1, 'ticks-1-2', '2', null, 0, 'infinity', '{}')",
    "(run, 1, 'ticks-1-2', null, '{\"code\": \"x\", \"message\": \"boom\"}', 0, now(), '{}')",
    "(run, 0, 'ticks-1-2', '2', null, 0, now(), '{}')",
    "(run, 1, 'ticks-1-2', '2', null, 0, now(), array[E'\\r\\n', '', '日本'])",
];

/// What became of one insert.
#[derive(Debug)]
enum Inserted {
    Accepted(String),
    Refused,
}

async fn insert(db: &TestDb, sql: &str) -> Inserted {
    match db.client().await.query_one(sql, &[]).await {
        Ok(row) => Inserted::Accepted(row.get(0)),
        Err(e) => {
            let code = e.as_db_error().map(|d| d.code().code().to_string());
            match code.as_deref() {
                Some(c) if c.starts_with("22") || c.starts_with("23") => Inserted::Refused,
                _ => panic!("insert was neither accepted nor refused cleanly: {sql}: {e:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hand_inserted_edge_rows_are_refused_or_end_documented_and_normal_runs_flow() {
    let seed: u64 = std::env::var("SPOOL_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rows: usize = std::env::var("SPOOL_HOSTILE_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1200);
    let mut rng = StdRng::seed_from_u64(seed);
    let db = TestDb::new().await;
    let mut s = crate::common::settings("hostile-e");
    s.concurrency = 64;
    let executor = db.executor_with(s, Registry::with_builtins()).await;
    let base = crate::api::serve(&db, None).await;

    let mut odd = Vec::new();
    let mut normal = Vec::new();
    let mut refused = 0usize;
    for n in 0..rows {
        if n % 4 == 0 {
            let id = format!("normal-{n}");
            let sql = if n % 8 == 0 {
                format!("insert into spool.runs (id, workflow, input) values ('{id}', 'noop', '{{\"n\": {n}}}') returning id")
            } else {
                format!("insert into spool.runs (id, workflow, input, concurrency_key) values ('{id}', 'ticker', '{{\"count\": 2, \"interval_ms\": 1}}', 'normal-{}') returning id", n % 5)
            };
            match insert(&db, &sql).await {
                Inserted::Accepted(id) => normal.push(id),
                Inserted::Refused => panic!("a normal run was refused: {sql}"),
            }
            continue;
        }
        // one or two columns at an edge; the rest default
        let mut set: BTreeMap<&str, String> = BTreeMap::new();
        set.insert("id", format!("'odd-{n}'"));
        set.insert("workflow", "'noop'".into());
        for _ in 0..rng.random_range(1..=2) {
            let column = *COLUMNS.choose(&mut rng).unwrap();
            let value = edges(column).choose(&mut rng).unwrap().to_string();
            set.insert(column, value);
        }
        if set.get("status").map(String::as_str) == Some("'running'") && rng.random_bool(0.8) {
            set.insert("executor_id", "'ghost'".into());
        }
        if set
            .get("status")
            .is_some_and(|s| s == "'succeeded'" || s == "'bogus'")
            && rng.random_bool(0.5)
        {
            set.insert("finished_at", "now()".into());
        }
        let columns: Vec<&str> = set.keys().copied().collect();
        let values: Vec<&str> = set.values().map(String::as_str).collect();
        let sql = format!(
            "insert into spool.runs ({}) values ({}) returning id",
            columns.join(", "),
            values.join(", ")
        );
        match insert(&db, &sql).await {
            Inserted::Accepted(id) => {
                // some accepted ticker runs also get a hand-written step row
                if set.get("workflow").map(String::as_str) == Some("'ticker'")
                    || rng.random_bool(0.1)
                {
                    let step = STEP_EDGES
                        .choose(&mut rng)
                        .unwrap()
                        .replace("(run,", &format!("('{id}',"));
                    let _ = insert(
                        &db,
                        &format!(
                            "insert into spool.operation_outputs
                                    (run_id, step, name, output, error, claim_epoch, started_at, chunks)
                             values {step} returning run_id"
                        ),
                    )
                    .await;
                }
                odd.push(id)
            }
            Inserted::Refused => refused += 1,
        }
    }
    eprintln!(
        "seed {seed}: {} normal runs, {} odd rows accepted, {refused} refused",
        normal.len(),
        odd.len()
    );

    // Zero stalls: every normal run succeeds.
    wait_until(
        "every normal run to succeed",
        Duration::from_secs(120),
        || async {
            let done = db
                .scalar_i64("select count(*) from spool.runs where id like 'normal-%' and status = 'succeeded'")
                .await;
            (done as usize == normal.len()).then_some(())
        },
    )
    .await;

    // Every accepted odd row ends in a documented state.
    let undocumented = "select r.id, r.status, r.error::text from spool.runs r
         where r.id like 'odd-%'
           and not (
                -- ended: failed, dead or cancelled runs say why
                (r.status in ('succeeded', 'failed', 'cancelled', 'dead')
                 and (r.status = 'succeeded' or r.error is null or r.error ? 'code'))
                -- scheduled in the future
                or (r.status = 'queued' and r.run_at > now() + interval '1 minute')
                -- shown, with a reason, among the runs nobody can execute
                or exists (select 1 from spool.unrunnable_runs u where u.id = r.id and u.reason is not null)
                -- waits behind an earlier unfinished run of its key (per-key order)
                or (r.status = 'queued' and r.concurrency_key is not null and exists (
                        select 1 from spool.runs k
                         where k.queue = r.queue and k.concurrency_key = r.concurrency_key
                           and k.status in ('queued', 'running') and k.enqueue_seq < r.enqueue_seq)))";
    let left = wait_until(
        "every odd row to reach a documented state",
        Duration::from_secs(60),
        || async {
            let rows = db.client().await.query(undocumented, &[]).await.unwrap();
            rows.is_empty().then_some(rows.len())
        },
    )
    .await;
    assert_eq!(left, 0);

    // The API answers for every row, and lists them all.
    let http = reqwest::Client::new();
    for id in &odd {
        for path in [format!("/v1/runs/{id}"), format!("/v1/runs/{id}/steps")] {
            let res = http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(res.status(), 200, "GET {path}");
            let _: Value = res.json().await.expect("a JSON body");
        }
    }
    let mut cursor: Option<String> = None;
    let mut listed = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("{base}/v1/runs?limit=500&cursor={c}"),
            None => format!("{base}/v1/runs?limit=500"),
        };
        let res = http.get(url).send().await.unwrap();
        assert_eq!(res.status(), 200, "list");
        let page: Value = res.json().await.unwrap();
        listed += page["runs"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(listed, odd.len() + normal.len());

    // No panic anywhere in the executor: it shuts down cleanly.
    executor.shutdown().await.unwrap();
}

/// The second line of defence: rows the constraints would refuse today (written before they
/// existed, or with a constraint dropped) still never panic a reader. The executor fails such a
/// run with `undecodable_row` naming the column, other runs keep flowing, and the API shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_code_cannot_decode_fail_with_undecodable_row_and_never_panic() {
    let db = TestDb::new().await;
    db.exec(
        "alter table spool.runs drop constraint runs_times_in_range;
         alter table spool.operation_outputs drop constraint operation_outputs_chunks_not_null;
         insert into spool.runs (id, workflow, created_at) values ('inf-created', 'noop', 'infinity');
         insert into spool.runs (id, workflow, input) values ('deep-input', 'noop', (repeat('[', 200) || repeat(']', 200))::jsonb);
         insert into spool.runs (id, workflow, input) values ('huge-number', 'ticker', '{\"count\": 1e400}');
         insert into spool.runs (id, workflow, input) values ('null-chunk', 'ticker', '{\"count\": 2, \"interval_ms\": 1}');
         insert into spool.operation_outputs (run_id, step, name, output, claim_epoch, started_at, chunks)
              values ('null-chunk', 1, 'ticks-1-2', '2', 0, now(), array['tick-1', null]);
         update spool.runs set claim_epoch = 1 where id = 'null-chunk';
         insert into spool.runs (id, workflow) select 'fine-' || i, 'noop' from generate_series(1, 20) i;",
    )
    .await;
    let executor = db.executor("e", Registry::with_builtins()).await;
    for (id, column) in [
        ("inf-created", "created_at"),
        ("deep-input", "input"),
        ("huge-number", "input"),
        ("null-chunk", "chunks"),
    ] {
        assert_eq!(
            crate::common::wait_terminal(&db, id, Duration::from_secs(20)).await,
            "failed",
            "{id}"
        );
        let error: Value = db
            .client()
            .await
            .query_one("select error from spool.runs where id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(error["code"], "undecodable_row", "{id}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(column),
            "{id}: {error}"
        );
    }
    for i in 1..=20 {
        assert_eq!(
            crate::common::wait_terminal(&db, &format!("fine-{i}"), Duration::from_secs(20)).await,
            "succeeded"
        );
    }
    let base = crate::api::serve(&db, None).await;
    for id in ["inf-created", "deep-input", "huge-number", "null-chunk"] {
        let show: Value = reqwest::get(format!("{base}/v1/runs/{id}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(show["id"], id);
        let steps = reqwest::get(format!("{base}/v1/runs/{id}/steps"))
            .await
            .unwrap();
        assert_eq!(steps.status(), 200, "{id}");
    }
    let show: Value = reqwest::get(format!("{base}/v1/runs/deep-input"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        show["undecodable"][0]
            .as_str()
            .unwrap()
            .starts_with("input"),
        "{show}"
    );
    executor.shutdown().await.unwrap();
}
