//! Turns `DATABASE_URL` into a `tokio_postgres::Config` plus a rustls connector that honours
//! libpq's `sslmode` (disable, prefer, require, verify-ca, verify-full) and `sslrootcert`.
//!
//! Every connection Spool opens (pool, listener, executor lock, migrations) is made from the
//! [`PgTarget`] built here, so none of them can silently ignore the TLS setting. This module
//! never opens a connection itself.

use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How strictly the server's certificate is checked, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for TlsMode {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" | "allow" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(TlsError::UnknownSslMode(other.to_string())),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("unknown sslmode {0:?} (expected disable, prefer, require, verify-ca or verify-full)")]
    UnknownSslMode(String),
    #[error("DATABASE_URL is not a valid connection string: {0}")]
    BadUrl(String),
    #[error("cannot read sslrootcert {path}: {source}")]
    RootCert {
        path: String,
        source: std::io::Error,
    },
    #[error("no trusted root certificates for sslmode {0:?}: set sslrootcert")]
    NoRoots(TlsMode),
    #[error("TLS setup failed: {0}")]
    Rustls(String),
}

/// A database to connect to: the parsed config and the TLS connector every connection shares.
#[derive(Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub mode: TlsMode,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .field("mode", &self.mode)
            .finish()
    }
}

impl PgTarget {
    /// Parses a `postgres://` URL (or a libpq key=value string without verify modes).
    pub fn parse(database_url: &str) -> Result<Self, TlsError> {
        let (rest, mode, root_cert) = split_tls_params(database_url)?;
        let mut config =
            tokio_postgres::Config::from_str(&rest).map_err(|e| TlsError::BadUrl(e.to_string()))?;
        config.ssl_mode(match mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let client = client_config(mode, root_cert.as_deref())?;
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(client),
            mode,
        })
    }

    /// The same server with another database name (tests clone databases from a template).
    pub fn with_dbname(&self, dbname: &str) -> Self {
        let mut t = self.clone();
        t.config.dbname(dbname);
        t
    }
}

/// Removes `sslmode` and `sslrootcert` from a URL's query, which tokio-postgres cannot parse
/// in full (it knows no verify modes), and returns them separately.
fn split_tls_params(url: &str) -> Result<(String, TlsMode, Option<String>), TlsError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        // key=value form: tokio-postgres handles disable/prefer/require itself.
        let mode = url
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("sslmode="))
            .map(TlsMode::from_str)
            .transpose()?
            .unwrap_or(TlsMode::Prefer);
        return Ok((url.to_string(), mode, None));
    }
    let mut parsed = url::Url::parse(url).map_err(|e| TlsError::BadUrl(e.to_string()))?;
    let mut mode = TlsMode::Prefer;
    let mut root = None;
    let mut kept = Vec::new();
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "sslmode" => mode = v.parse()?,
            "sslrootcert" => root = Some(v.into_owned()),
            _ => kept.push((k.into_owned(), v.into_owned())),
        }
    }
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok((parsed.to_string(), mode, root))
}

fn client_config(mode: TlsMode, root_cert: Option<&str>) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let config = match mode {
        // libpq semantics: require (and prefer) encrypt but do not check the certificate.
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let roots = Arc::new(root_store(mode, root_cert)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            let verifier: Arc<dyn ServerCertVerifier> = if mode == TlsMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(config)
}

fn root_store(mode: TlsMode, root_cert: Option<&str>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match root_cert {
        Some(path) if path != "system" => {
            let pem = std::fs::read(path).map_err(|source| TlsError::RootCert {
                path: path.to_string(),
                source,
            })?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|source| TlsError::RootCert {
                    path: path.to_string(),
                    source,
                })?;
                store
                    .add(cert)
                    .map_err(|e| TlsError::Rustls(e.to_string()))?;
            }
        }
        _ => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
        }
    }
    if store.is_empty() {
        return Err(TlsError::NoRoots(mode));
    }
    Ok(store)
}

/// `sslmode=require`: encrypted, certificate not checked (as libpq does without a root cert).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_taken_out_of_the_url_and_honoured() {
        let t = PgTarget::parse(
            "postgres://u@localhost:5432/db?sslmode=verify-full&application_name=x",
        )
        .unwrap();
        assert_eq!(t.mode, TlsMode::VerifyFull);
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(t.config.get_application_name(), Some("x"));
        let t = PgTarget::parse("postgres://u@localhost/db?sslmode=disable").unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
        assert!(PgTarget::parse("postgres://u@localhost/db?sslmode=bogus").is_err());
    }
}
