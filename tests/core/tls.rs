//! `sslmode` × `sslrootcert` against a real PostgreSQL serving TLS: every row of libpq's table
//! (src/db/tls/mod.rs) is a connection that must come up in plaintext, come up encrypted, or be
//! refused — and a whole `spool` process must open every one of its connections encrypted.
//!
//! Certificates are made at test time: a CA, a server certificate it signs that names only
//! `localhost` (so connecting to `127.0.0.1` is a wrong host), and an unrelated second CA. Each
//! test starts its own cluster with them (scripts/pg.sh with SPOOL_PG_SSL_DIR) and removes it.
//! The process environment is never changed: the home directory and PGSSLROOTCERT that libpq
//! would read are passed in as a [`TlsEnv`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use spool::db::{self, tls::TlsEnv, PgTarget};

use crate::common::process::{Binary, SpoolProcess};
use crate::common::{wait_terminal, wait_until, TestDb};

fn pg_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh")
}

/// A private cluster serving TLS with a certificate for `localhost` signed by `ca.crt`.
struct TlsServer {
    dir: PathBuf,
    port: u16,
}

impl TlsServer {
    fn start() -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tls-{}", uuid::Uuid::new_v4().simple()));
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        write_certificates(&certs);
        let out = Command::new(pg_sh())
            .arg("start")
            .arg(dir.join("pg"))
            .env("SPOOL_PG_SSL_DIR", &certs)
            .output()
            .expect("pg.sh");
        let mut server = Self { dir, port: 0 };
        assert!(
            out.status.success(),
            "pg.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server.port = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        server
    }

    /// The CA that signed the server's certificate.
    fn ca(&self) -> PathBuf {
        self.dir.join("certs/ca.crt")
    }

    /// A CA that signed nothing the server has.
    fn other_ca(&self) -> PathBuf {
        self.dir.join("certs/other-ca.crt")
    }

    /// A URI for `host` (reached at 127.0.0.1 whatever it resolves to) with query `params`.
    fn url(&self, host: &str, dbname: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/{dbname}?hostaddr=127.0.0.1&{params}",
            self.port
        )
    }

    /// An environment whose home directory holds `root` as `.postgresql/root.crt`, if given.
    fn home(&self, root: Option<&Path>) -> TlsEnv {
        let home = self
            .dir
            .join(format!("home-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(home.join(".postgresql")).unwrap();
        if let Some(root) = root {
            std::fs::copy(root, home.join(".postgresql/root.crt")).unwrap();
        }
        TlsEnv {
            home: Some(home),
            ..TlsEnv::default()
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = Command::new(pg_sh())
            .arg("stop")
            .arg(self.dir.join("pg"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ca_params_named(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
}

/// ca.crt, server.crt + server.key (signed by ca.crt, for DNS name `localhost` only), and
/// other-ca.crt.
fn write_certificates(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let ca_params = ca_params_named("spool test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "spool test server");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server.signed_by(&server_key, &issuer).unwrap();
    let other_key = KeyPair::generate().unwrap();
    let other = ca_params_named("unrelated CA")
        .self_signed(&other_key)
        .unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("other-ca.crt"), other.pem()).unwrap();
}

/// A path as a URI query value.
fn enc(path: &Path) -> String {
    let mut out = String::new();
    for b in path.to_str().unwrap().bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What a connection attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Plaintext,
    Encrypted,
    /// Refused (when parsing `DATABASE_URL` or when connecting), with the error.
    Refused(String),
}

/// Connects as Spool does and asks the server whether this session uses TLS.
async fn connect(url: &str, env: &TlsEnv) -> Outcome {
    let target = match PgTarget::parse_with(url, env) {
        Ok(t) => t,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let conn = match db::connect_dedicated(&target, "tls-test", None).await {
        Ok(c) => c,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let ssl: bool = conn
        .client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if ssl {
        Outcome::Encrypted
    } else {
        Outcome::Plaintext
    }
}

/// What a row of the table demands.
#[derive(Debug, Clone, Copy)]
enum Expect<'a> {
    Plaintext,
    Encrypted,
    /// Refused with an error containing this text.
    Refused(&'a str),
}

impl Expect<'_> {
    fn met_by(self, outcome: &Outcome) -> bool {
        match (self, outcome) {
            (Expect::Plaintext, Outcome::Plaintext) | (Expect::Encrypted, Outcome::Encrypted) => {
                true
            }
            (Expect::Refused(text), Outcome::Refused(error)) => error.contains(text),
            _ => false,
        }
    }
}

/// The server's certificate does not lead to a trusted root.
const UNKNOWN_CA: &str = "invalid peer certificate: UnknownIssuer";
/// The certificate is for `localhost`, the connection for `127.0.0.1`.
const WRONG_HOST: &str = "certificate not valid for name \"127.0.0.1\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_and_sslrootcert_behaves_as_libpqs_table_says() {
    let s = TlsServer::start();
    let (ca, other) = (enc(&s.ca()), enc(&s.other_ca()));
    let no_home = s.home(None);
    let home_ca = s.home(Some(&s.ca()));
    let home_other = s.home(Some(&s.other_ca()));
    let pgsslrootcert_ca = TlsEnv {
        sslrootcert: Some(s.ca().to_str().unwrap().into()),
        ..no_home.clone()
    };
    let pgsslmode_verify_full = TlsEnv {
        sslmode: Some("verify-full".into()),
        ..no_home.clone()
    };
    let missing = enc(&s.dir.join("no-such-root.crt"));
    let missing_default = format!(
        "root certificate file \"{}\" does not exist",
        no_home
            .home
            .as_ref()
            .unwrap()
            .join(".postgresql/root.crt")
            .display()
    );
    let kv = |rest: &str| {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=postgres dbname=postgres {rest}",
            s.port
        )
    };
    let good = "localhost";
    let wrong = "127.0.0.1"; // not in the certificate, which names only localhost
    use Expect::*;
    #[rustfmt::skip]
    let rows: Vec<(&str, String, &TlsEnv, Expect<'_>)> = vec![
        ("disable", s.url(good, "postgres", "sslmode=disable"), &no_home, Plaintext),
        ("disable ignores a root file", s.url(good, "postgres", &format!("sslmode=disable&sslrootcert={other}")), &home_other, Plaintext),
        ("allow is tried with TLS first", s.url(good, "postgres", "sslmode=allow"), &no_home, Encrypted),
        ("prefer", s.url(good, "postgres", "sslmode=prefer"), &no_home, Encrypted),
        ("no sslmode is prefer", s.url(good, "postgres", ""), &no_home, Encrypted),
        ("prefer never checks the certificate", s.url(good, "postgres", &format!("sslmode=prefer&sslrootcert={other}")), &no_home, Encrypted),
        ("require", s.url(good, "postgres", "sslmode=require"), &no_home, Encrypted),
        ("require, wrong host, no root file", s.url(wrong, "postgres", "sslmode=require"), &no_home, Encrypted),
        ("ssl=true is require", s.url(good, "postgres", "ssl=true"), &no_home, Encrypted),
        ("require + right CA", s.url(wrong, "postgres", &format!("sslmode=require&sslrootcert={ca}")), &no_home, Encrypted),
        ("require + wrong CA", s.url(good, "postgres", &format!("sslmode=require&sslrootcert={other}")), &no_home, Refused(UNKNOWN_CA)),
        ("require + wrong CA in ~/.postgresql/root.crt", s.url(good, "postgres", "sslmode=require"), &home_other, Refused(UNKNOWN_CA)),
        ("require + missing sslrootcert file", s.url(good, "postgres", &format!("sslmode=require&sslrootcert={missing}")), &no_home, Encrypted),
        ("verify-ca + right CA", s.url(good, "postgres", &format!("sslmode=verify-ca&sslrootcert={ca}")), &no_home, Encrypted),
        ("verify-ca + right CA, wrong host", s.url(wrong, "postgres", &format!("sslmode=verify-ca&sslrootcert={ca}")), &no_home, Encrypted),
        ("verify-ca + wrong CA", s.url(good, "postgres", &format!("sslmode=verify-ca&sslrootcert={other}")), &no_home, Refused(UNKNOWN_CA)),
        ("verify-ca without any root file", s.url(good, "postgres", "sslmode=verify-ca"), &no_home, Refused(&missing_default)),
        ("verify-ca + right CA in ~/.postgresql/root.crt", s.url(good, "postgres", "sslmode=verify-ca"), &home_ca, Encrypted),
        ("verify-ca + right CA from PGSSLROOTCERT", s.url(good, "postgres", "sslmode=verify-ca"), &pgsslrootcert_ca, Encrypted),
        ("verify-ca + missing sslrootcert file", s.url(good, "postgres", &format!("sslmode=verify-ca&sslrootcert={missing}")), &home_ca, Refused("no-such-root.crt\" does not exist")),
        ("verify-full + right CA, right host", s.url(good, "postgres", &format!("sslmode=verify-full&sslrootcert={ca}")), &no_home, Encrypted),
        ("verify-full + right CA, wrong host", s.url(wrong, "postgres", &format!("sslmode=verify-full&sslrootcert={ca}")), &no_home, Refused(WRONG_HOST)),
        ("verify-full + wrong CA", s.url(good, "postgres", &format!("sslmode=verify-full&sslrootcert={other}")), &no_home, Refused(UNKNOWN_CA)),
        ("verify-full without any root file", s.url(good, "postgres", "sslmode=verify-full"), &no_home, Refused(&missing_default)),
        ("PGSSLMODE=verify-full + right CA", s.url(good, "postgres", &format!("sslrootcert={ca}")), &pgsslmode_verify_full, Encrypted),
        ("PGSSLMODE=verify-full + wrong host", s.url(wrong, "postgres", &format!("sslrootcert={ca}")), &pgsslmode_verify_full, Refused(WRONG_HOST)),
        ("sslmode in the URL beats PGSSLMODE", s.url(wrong, "postgres", "sslmode=disable"), &pgsslmode_verify_full, Plaintext),
        ("sslrootcert=system + require", s.url(good, "postgres", "sslmode=require&sslrootcert=system"), &no_home, Refused("weak sslmode \"require\" may not be used with sslrootcert=system")),
        ("sslrootcert=system + verify-ca", s.url(good, "postgres", "sslmode=verify-ca&sslrootcert=system"), &no_home, Refused("weak sslmode \"verify-ca\"")),
        // verify-full by default, and the system does not trust the test CA
        ("sslrootcert=system", s.url(good, "postgres", "sslrootcert=system"), &home_ca, Refused("")),
        ("key=value: sslmode = require", kv("sslmode = require"), &no_home, Encrypted),
        ("key=value: sslmode = disable", kv("sslmode = disable"), &no_home, Plaintext),
        ("key=value: quoted verify-full + right CA", kv(&format!("sslmode = 'verify-full' sslrootcert = '{}'", s.ca().display())), &no_home, Encrypted),
        ("key=value: quoted verify-full + wrong CA", kv(&format!("sslmode='verify-full' sslrootcert= '{}'", s.other_ca().display())), &no_home, Refused(UNKNOWN_CA)),
        ("key=value: verify-ca without any root file", kv("sslmode =verify-ca"), &no_home, Refused(&missing_default)),
    ];
    let mut wrong_rows = Vec::new();
    for (name, url, env, expect) in &rows {
        let outcome = connect(url, env).await;
        eprintln!("{name}: {outcome:?}");
        if !expect.met_by(&outcome) {
            wrong_rows.push(format!(
                "{name}: expected {expect:?}, got {outcome:?}\n    {url}"
            ));
        }
    }
    assert!(
        wrong_rows.is_empty(),
        "{} of {} rows differ from libpq's table:\n{}",
        wrong_rows.len(),
        rows.len(),
        wrong_rows.join("\n")
    );
}

/// The suite's own cluster serves no TLS: `prefer` falls back, `require` refuses.
#[tokio::test]
async fn prefer_falls_back_to_plaintext_and_require_refuses_a_server_without_tls() {
    let db = TestDb::new().await;
    let base = db.url.split('?').next().unwrap().to_string();
    let env = TlsEnv::default();
    assert_eq!(
        connect(&format!("{base}?sslmode=prefer"), &env).await,
        Outcome::Plaintext
    );
    assert_eq!(connect(&base, &env).await, Outcome::Plaintext);
    match connect(&format!("{base}?sslmode=require"), &env).await {
        Outcome::Refused(e) => assert!(e.contains("server does not support TLS"), "{e}"),
        other => panic!("require connected to a server without TLS: {other:?}"),
    }
}

impl TlsServer {
    /// Makes the server refuse every plaintext connection to `dbname` (pg_hba.conf), so that a
    /// client that opens even one short-lived plaintext connection there fails.
    async fn refuse_plaintext_to(&self, dbname: &str) {
        let admin = PgTarget::parse_with(
            &self.url("localhost", "postgres", "sslmode=disable"),
            &TlsEnv::default(),
        )
        .unwrap();
        let conn = db::connect_dedicated(&admin, "tls-test-admin", None)
            .await
            .unwrap();
        conn.client
            .batch_execute(&format!("create database {dbname}"))
            .await
            .unwrap();
        let hba = self.dir.join("pg/data/pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!("hostnossl {dbname} all 0.0.0.0/0 reject\n{rules}"),
        )
        .unwrap();
        conn.client
            .batch_execute("select pg_reload_conf()")
            .await
            .unwrap();
        let plaintext = self.url("localhost", dbname, "sslmode=disable");
        wait_until(
            "the server to refuse plaintext connections",
            Duration::from_secs(30),
            || async {
                match connect(&plaintext, &TlsEnv::default()).await {
                    Outcome::Refused(e) if e.contains("pg_hba.conf rejects") => Some(()),
                    _ => None,
                }
            },
        )
        .await;
    }
}

/// `spool migrate` and `serve` (the example server, which runs a workflow) with
/// `sslmode=verify-full`: the server refuses plaintext to their database, so any plaintext
/// connection would fail, and every session Spool holds there (pool, API pool, claim pool,
/// executor lock, listener) is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_opens_every_connection_with_tls() {
    let s = TlsServer::start();
    s.refuse_plaintext_to("spool_tls").await;
    let url = s.url(
        "localhost",
        "spool_tls",
        &format!("sslmode=verify-full&sslrootcert={}", enc(&s.ca())),
    );
    let migrate = Command::new(env!("CARGO_BIN_EXE_spool"))
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "spool migrate over TLS: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let target = PgTarget::parse_with(&url, &TlsEnv::default()).unwrap();
    let db = TestDb {
        name: "spool_tls".into(),
        url: url.clone(),
        pool: db::pool(&target, 4, "tls-test"),
        target,
    };
    let p = SpoolProcess::start(Binary::ExampleServer, &db, "tls-1", &[]).await;
    // a run, so that the executor's own pool (steps, completion) is used too
    let res = reqwest::Client::new()
        .post(p.url("/v1/runs"))
        .json(&serde_json::json!({"workflow": "order", "id": "tls-o1", "input": {"item": "book"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        wait_terminal(&db, "tls-o1", Duration::from_secs(30)).await,
        "succeeded"
    );
    let expected = [
        "spool:",
        "spool-api:",
        "spool-claim:",
        "spool-lock:",
        "spool-listen:",
    ]
    .map(|prefix| format!("{prefix}tls-1"));
    let sessions = "from pg_stat_activity a join pg_stat_ssl s using (pid)
                    where a.datname = 'spool_tls' and a.application_name like 'spool%'";
    wait_until(
        "every kind of spool session to be open",
        Duration::from_secs(30),
        || async {
            let names: Vec<String> = db
                .client()
                .await
                .query(
                    &format!("select distinct a.application_name {sessions}"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            expected.iter().all(|e| names.contains(e)).then_some(())
        },
    )
    .await;
    let plaintext = db
        .scalar_i64(&format!("select count(*) {sessions} and not s.ssl"))
        .await;
    let encrypted = db
        .scalar_i64(&format!("select count(*) {sessions} and s.ssl"))
        .await;
    assert_eq!(plaintext, 0, "spool sessions without TLS");
    assert!(
        encrypted >= expected.len() as i64,
        "{encrypted} encrypted sessions"
    );
    assert!(
        !p.log_text().contains("ERROR"),
        "spool logged errors:\n{}",
        p.log_text()
    );
}
