//! Turns `DATABASE_URL` into a `tokio_postgres::Config` plus a rustls connector that honour
//! libpq's `sslmode` and `sslrootcert` as libpq (16 and later) means them, so a URL that is safe
//! with `psql` is exactly as safe with Spool, and one that `psql` refuses is refused here too.
//!
//! Every connection Spool opens (pool, listener, executor lock, migrations) is made from the
//! [`PgTarget`] built here, so none of them can silently ignore the TLS setting. This module
//! never opens a connection itself.
//!
//! # The rules (libpq's "SSL Mode Descriptions" and `sslrootcert`, as implemented)
//!
//! `sslmode` comes from the connection string, else from `PGSSLMODE`, else it is `prefer` — or
//! `verify-full` when `sslrootcert=system`. `sslrootcert` comes from the connection string, else
//! from `PGSSLROOTCERT`; unset or empty, the root file is `~/.postgresql/root.crt` (`~` is
//! `$HOME`, else the user's home directory from the password database).
//!
//! | `sslmode`                  | `sslrootcert` | root file | TLS                | check          |
//! |----------------------------|---------------|-----------|--------------------|----------------|
//! | `disable`                  | file or unset | not read  | never              | —              |
//! | `allow`, `prefer`          | file or unset | not read  | if the server can  | none           |
//! | `require`                  | file or unset | exists    | always             | chain          |
//! | `require`                  | file or unset | missing   | always             | none           |
//! | `verify-ca`                | file or unset | exists    | always             | chain          |
//! | `verify-full`              | file or unset | exists    | always             | chain and host |
//! | `verify-ca`, `verify-full` | file or unset | missing   | refused (1)        | —              |
//! | `verify-full` or unset     | `system`      | —         | always             | chain and host |
//! | any other                  | `system`      | —         | refused (2)        | —              |
//!
//! (1) "root certificate file … does not exist"; (2) "weak sslmode … may not be used with
//! sslrootcert=system". Both are refused when `DATABASE_URL` is parsed, at start.
//!
//! "Chain": the server's certificate must lead to a root in the file (or, for `system`, to one the
//! operating system trusts). "Host": the `host` Spool connects to (not `hostaddr`) must be one of
//! the certificate's subject alternative names (DNS name or IP address). A missing root file with
//! `require` is not an error in libpq either: the connection is encrypted but the server not
//! authenticated (Spool logs a warning when that file was named explicitly).
//!
//! Where Spool differs from libpq, because tokio-postgres cannot do otherwise:
//! - `allow` is treated as `prefer`: TLS is tried first (libpq tries plaintext first).
//! - `prefer` and `allow` never check the certificate. libpq checks the chain when a root file
//!   exists and, if the check fails, connects again in plaintext; tokio-postgres cannot retry
//!   in plaintext, so Spool keeps the unchecked encrypted connection. Neither resists an active
//!   attacker: use `verify-full` for that.
//! - The host name is matched against subject alternative names only, never the common name.
//! - Root files and the system's roots are read once, when `DATABASE_URL` is parsed at startup.

mod conninfo;
mod verify;

use std::path::PathBuf;
use std::str::FromStr;

use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres does before the handshake: no TLS, TLS if offered, or TLS always.
    fn negotiation(self) -> SslMode {
        match self {
            Self::Disable => SslMode::Disable,
            Self::Allow | Self::Prefer => SslMode::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => SslMode::Require,
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TlsMode {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(TlsError::UnknownSslMode(other.to_string())),
        })
    }
}

/// The roots a server's certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// Every certificate in a PEM file.
    File(PathBuf),
    /// `sslrootcert=system`: the roots the operating system trusts.
    System,
}

/// How the server's certificate is checked once TLS is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Not at all: encrypted, but the server is not authenticated.
    Nothing,
    /// The chain must lead to one of the roots; any host name.
    Chain(Roots),
    /// The chain, and the host name must be in the certificate.
    ChainAndHost(Roots),
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid sslmode value: {0:?} (expected disable, allow, prefer, require, verify-ca or verify-full)")]
    UnknownSslMode(String),
    #[error("DATABASE_URL is not a valid connection string: {0}")]
    BadUrl(String),
    #[error("weak sslmode \"{0}\" may not be used with sslrootcert=system (use \"verify-full\")")]
    WeakWithSystemRoots(TlsMode),
    #[error("root certificate file \"{}\" does not exist (sslmode {mode} checks the server's certificate): either provide the file, use the system's trusted roots with sslrootcert=system, or change sslmode to disable server certificate verification", path.display())]
    RootCertMissing { path: PathBuf, mode: TlsMode },
    #[error("could not get home directory to locate root certificate file ~/.postgresql/root.crt (sslmode {0} checks the server's certificate): set sslrootcert, use sslrootcert=system, or change sslmode")]
    NoHomeDirectory(TlsMode),
    #[error("cannot read root certificate file \"{}\": {source}", path.display())]
    RootCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("root certificate file \"{}\" holds no PEM certificate", .0.display())]
    NoCertificates(PathBuf),
    #[error("sslrootcert=system, but this system trusts no root certificates (install ca-certificates, or set SSL_CERT_FILE)")]
    NoSystemRoots,
    #[error("TLS setup failed: {0}")]
    Rustls(String),
}

/// What libpq reads from outside the connection string. [`PgTarget::parse`] takes it from the
/// process; tests pass their own rather than change the process's environment.
#[derive(Debug, Clone, Default)]
pub struct TlsEnv {
    /// `PGSSLMODE`.
    pub sslmode: Option<String>,
    /// `PGSSLROOTCERT`.
    pub sslrootcert: Option<String>,
    /// The home directory whose `.postgresql/root.crt` is the default root file.
    pub home: Option<PathBuf>,
}

impl TlsEnv {
    pub fn from_process() -> Self {
        Self {
            sslmode: std::env::var("PGSSLMODE").ok(),
            sslrootcert: std::env::var("PGSSLROOTCERT").ok(),
            home: home_dir(),
        }
    }
}

/// libpq's `pqGetHomeDirectory`: `$HOME`, else the password database's entry for this user.
fn home_dir() -> Option<PathBuf> {
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => Some(home.into()),
        _ => nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|user| user.dir),
    }
}

/// A database to connect to: the parsed config and the TLS connector every connection shares.
#[derive(Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub mode: TlsMode,
    pub check: Check,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .field("mode", &self.mode)
            .field("check", &self.check)
            .finish()
    }
}

impl PgTarget {
    /// Parses a `postgres://` URI or a libpq key=value string, with the process's `PGSSLMODE`,
    /// `PGSSLROOTCERT` and home directory.
    pub fn parse(database_url: &str) -> Result<Self, TlsError> {
        Self::parse_with(database_url, &TlsEnv::from_process())
    }

    /// [`PgTarget::parse`] with the given environment.
    pub fn parse_with(database_url: &str, env: &TlsEnv) -> Result<Self, TlsError> {
        let split = conninfo::split(database_url)?;
        let mut config = tokio_postgres::Config::from_str(&split.rest)
            .map_err(|e| TlsError::BadUrl(e.to_string()))?;
        let (mode, check) = resolve(split.sslmode, split.sslrootcert, env)?;
        config.ssl_mode(mode.negotiation());
        let client = verify::client_config(&check)?;
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(client),
            mode,
            check,
        })
    }

    /// The same server with another database name (tests clone databases from a template).
    pub fn with_dbname(&self, dbname: &str) -> Self {
        let mut t = self.clone();
        t.config.dbname(dbname);
        t
    }
}

/// The sslmode in force and how the certificate is checked, by the table in the module docs.
fn resolve(
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    env: &TlsEnv,
) -> Result<(TlsMode, Check), TlsError> {
    let rootcert = sslrootcert.or_else(|| env.sslrootcert.clone());
    let system = rootcert.as_deref() == Some("system");
    let mode = match sslmode.or_else(|| env.sslmode.clone()) {
        Some(mode) => mode.parse()?,
        None if system => TlsMode::VerifyFull,
        None => TlsMode::Prefer,
    };
    if system {
        return match mode {
            TlsMode::VerifyFull => Ok((mode, Check::ChainAndHost(Roots::System))),
            weak => Err(TlsError::WeakWithSystemRoots(weak)),
        };
    }
    let check = match mode {
        TlsMode::Disable | TlsMode::Allow | TlsMode::Prefer => Check::Nothing,
        TlsMode::Require => match root_file(rootcert.as_deref(), mode, env) {
            Ok(path) => Check::Chain(Roots::File(path)),
            Err(e) => {
                if rootcert.is_some_and(|r| !r.is_empty()) {
                    tracing::warn!(error = %e, "sslmode=require without a root certificate file: the connection is encrypted, but the server's certificate is not checked");
                }
                Check::Nothing
            }
        },
        TlsMode::VerifyCa => Check::Chain(Roots::File(root_file(rootcert.as_deref(), mode, env)?)),
        TlsMode::VerifyFull => {
            Check::ChainAndHost(Roots::File(root_file(rootcert.as_deref(), mode, env)?))
        }
    };
    Ok((mode, check))
}

/// The root file libpq loads — `sslrootcert`, else `~/.postgresql/root.crt` — if it exists.
fn root_file(rootcert: Option<&str>, mode: TlsMode, env: &TlsEnv) -> Result<PathBuf, TlsError> {
    let path = match rootcert.filter(|r| !r.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => env
            .home
            .as_ref()
            .ok_or(TlsError::NoHomeDirectory(mode))?
            .join(".postgresql")
            .join("root.crt"),
    };
    match std::fs::metadata(&path) {
        Ok(_) => Ok(path),
        Err(_) => Err(TlsError::RootCertMissing { path, mode }),
    }
}

#[cfg(test)]
mod tests;
