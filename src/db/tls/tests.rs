//! The resolution table and the URL forms, without a server (tests/core/tls.rs connects).

use std::path::{Path, PathBuf};

use super::*;

/// A private directory with an (empty) file at `.postgresql/root.crt` when `with_root` is set.
struct Home(PathBuf);

impl Home {
    fn new(with_root: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("spool-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join(".postgresql")).unwrap();
        if with_root {
            std::fs::write(dir.join(".postgresql/root.crt"), "").unwrap();
        }
        Self(dir)
    }
    fn root(&self) -> PathBuf {
        self.0.join(".postgresql/root.crt")
    }
    fn env(&self) -> TlsEnv {
        TlsEnv {
            home: Some(self.0.clone()),
            ..TlsEnv::default()
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn resolved(
    mode: Option<&str>,
    root: Option<&str>,
    env: &TlsEnv,
) -> Result<(TlsMode, Check), TlsError> {
    resolve(mode.map(String::from), root.map(String::from), env)
}

fn file(path: &Path) -> Roots {
    Roots::File(path.to_path_buf())
}

#[test]
fn sslmode_is_taken_out_of_the_url_and_honoured() {
    let t = PgTarget::parse_with(
        "postgres://u@localhost:5432/db?sslmode=require&application_name=x",
        &Home::new(false).env(),
    )
    .unwrap();
    assert_eq!(t.mode, TlsMode::Require);
    assert_eq!(t.check, Check::Nothing);
    assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
    assert_eq!(t.config.get_application_name(), Some("x"));
    let t = PgTarget::parse("postgres://u@localhost/db?sslmode=disable").unwrap();
    assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
    let e = PgTarget::parse("postgres://u@localhost/db?sslmode=bogus").unwrap_err();
    assert!(
        e.to_string().contains("invalid sslmode value: \"bogus\""),
        "{e}"
    );
}

#[test]
fn key_value_strings_are_read_as_libpq_reads_them() {
    let env = Home::new(false).env();
    let t = PgTarget::parse_with(
        "host=127.0.0.1 port=5432 user=postgres sslmode = require",
        &env,
    )
    .unwrap();
    assert_eq!(t.mode, TlsMode::Require);
    assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
    assert_eq!(t.config.get_ports(), &[5432]);
    assert_eq!(t.config.get_user(), Some("postgres"));
    let t =
        PgTarget::parse_with("host=h sslmode = 'disable' application_name='a b'", &env).unwrap();
    assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
    assert_eq!(t.config.get_application_name(), Some("a b"));
    let e = PgTarget::parse_with(
        "host=h sslmode = verify-ca sslrootcert='/no/such file'",
        &env,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("\"/no/such file\" does not exist"),
        "{e}"
    );
}

#[test]
fn without_sslmode_it_is_pgsslmode_else_prefer() {
    let home = Home::new(false);
    assert_eq!(
        resolved(None, None, &home.env()).unwrap(),
        (TlsMode::Prefer, Check::Nothing)
    );
    let env = TlsEnv {
        sslmode: Some("disable".into()),
        ..home.env()
    };
    assert_eq!(resolved(None, None, &env).unwrap().0, TlsMode::Disable);
    assert_eq!(
        resolved(Some("require"), None, &env).unwrap().0,
        TlsMode::Require
    );
    let env = TlsEnv {
        sslmode: Some("".into()),
        ..home.env()
    };
    assert!(
        resolved(None, None, &env).is_err(),
        "an empty PGSSLMODE is invalid in libpq too"
    );
}

#[test]
fn require_checks_the_chain_exactly_when_a_root_file_exists() {
    let home = Home::new(true);
    let other = Home::new(true);
    // the default file
    assert_eq!(
        resolved(Some("require"), None, &home.env()).unwrap().1,
        Check::Chain(file(&home.root()))
    );
    // a named file, from the string or from PGSSLROOTCERT
    let named = other.root();
    let named = named.to_str().unwrap();
    assert_eq!(
        resolved(Some("require"), Some(named), &home.env())
            .unwrap()
            .1,
        Check::Chain(file(&other.root()))
    );
    let env = TlsEnv {
        sslrootcert: Some(named.into()),
        ..home.env()
    };
    assert_eq!(
        resolved(Some("require"), None, &env).unwrap().1,
        Check::Chain(file(&other.root()))
    );
    // missing: encrypted, unchecked
    let empty = Home::new(false);
    assert_eq!(
        resolved(Some("require"), None, &empty.env()).unwrap().1,
        Check::Nothing
    );
    assert_eq!(
        resolved(Some("require"), Some("/no/such/root.crt"), &home.env())
            .unwrap()
            .1,
        Check::Nothing
    );
    // prefer and allow never check
    for mode in ["prefer", "allow", "disable"] {
        assert_eq!(
            resolved(Some(mode), Some(named), &home.env()).unwrap().1,
            Check::Nothing
        );
    }
}

#[test]
fn verify_modes_need_a_root_file_and_never_fall_back_to_other_roots() {
    let home = Home::new(true);
    assert_eq!(
        resolved(Some("verify-ca"), None, &home.env()).unwrap(),
        (TlsMode::VerifyCa, Check::Chain(file(&home.root())))
    );
    assert_eq!(
        resolved(Some("verify-full"), Some(""), &home.env()).unwrap(),
        (TlsMode::VerifyFull, Check::ChainAndHost(file(&home.root())))
    );
    let empty = Home::new(false);
    for mode in ["verify-ca", "verify-full"] {
        let e = resolved(Some(mode), None, &empty.env()).unwrap_err();
        let message = e.to_string();
        let expected = format!(
            "root certificate file \"{}\" does not exist",
            empty.root().display()
        );
        assert!(message.contains(&expected), "{message}");
        assert!(message.contains("sslrootcert=system"), "{message}");
        let e = resolved(Some(mode), None, &TlsEnv::default()).unwrap_err();
        assert!(matches!(e, TlsError::NoHomeDirectory(_)), "{e}");
    }
}

#[test]
fn sslrootcert_system_means_verify_full_and_refuses_weaker_modes() {
    let env = Home::new(false).env();
    assert_eq!(
        resolved(None, Some("system"), &env).unwrap(),
        (TlsMode::VerifyFull, Check::ChainAndHost(Roots::System))
    );
    let from_env = TlsEnv {
        sslrootcert: Some("system".into()),
        ..env.clone()
    };
    assert_eq!(
        resolved(None, None, &from_env).unwrap().0,
        TlsMode::VerifyFull
    );
    for weak in ["disable", "allow", "prefer", "require", "verify-ca"] {
        let e = resolved(Some(weak), Some("system"), &env).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("weak sslmode \"{weak}\" may not be used with sslrootcert=system (use \"verify-full\")")
        );
    }
    // PGSSLMODE is an explicit sslmode: no verify-full default
    let weak_env = TlsEnv {
        sslmode: Some("require".into()),
        ..env
    };
    assert!(resolved(None, Some("system"), &weak_env).is_err());
}
