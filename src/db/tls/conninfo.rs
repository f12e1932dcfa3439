//! Reads `sslmode` and `sslrootcert` out of a connection string exactly as libpq's
//! `conninfo_parse` and `conninfo_uri_parse_params` (fe-connect.c) read them, and hands the rest
//! to tokio-postgres, which knows neither `verify-ca`/`verify-full` nor `sslrootcert`.
//!
//! A string that starts with `postgresql://` or `postgres://` is a URI: its query parameters are
//! `&`-separated `key=value` pairs, both sides percent-decoded (`+` is not a space), and
//! `ssl=true` means `sslmode=require` (libpq's JDBC compatibility). Every other string is
//! key=value: pairs separated by whitespace, whitespace allowed around `=`, a value either bare
//! (up to the next whitespace) or single-quoted, and a backslash taking the next character
//! literally in both. A key given twice keeps its last value, as in libpq.
//!
//! The URI form's other parameters are passed on byte for byte (decoding and re-encoding them
//! could change them); the key=value form is passed on re-quoted.

use super::TlsError;

/// A connection string split into the TLS settings and what tokio-postgres parses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The connection string without `sslmode` and `sslrootcert`.
    pub rest: String,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// Splits a `DATABASE_URL` in either of libpq's forms.
pub fn split(s: &str) -> Result<Split, TlsError> {
    if s.starts_with("postgresql://") || s.starts_with("postgres://") {
        split_uri(s)
    } else {
        split_key_value(s)
    }
}

/// `isspace` in the C locale, which is what libpq tests.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn split_key_value(s: &str) -> Result<Split, TlsError> {
    let mut split = Split {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut kept: Vec<(String, String)> = Vec::new();
    for (key, value) in parse_key_value(s)? {
        match key.as_str() {
            "sslmode" => split.sslmode = Some(value),
            "sslrootcert" => split.sslrootcert = Some(value),
            _ => {
                kept.retain(|(k, _)| *k != key);
                kept.push((key, value));
            }
        }
    }
    let quoted: Vec<String> = kept
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect();
    split.rest = quoted.join(" ");
    Ok(split)
}

/// libpq's `conninfo_parse`: every `key = value` pair, in order.
pub fn parse_key_value(s: &str) -> Result<Vec<(String, String)>, TlsError> {
    let mut pairs = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| is_space(*c)).is_some() {}
        if it.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !is_space(*c)) {
            key.push(c);
        }
        while it.next_if(|c| is_space(*c)).is_some() {}
        if it.next() != Some('=') {
            return Err(TlsError::BadUrl(format!(
                "missing \"=\" after \"{key}\" in connection info string"
            )));
        }
        if key.is_empty() {
            return Err(TlsError::BadUrl(
                "invalid connection option \"\" (a key=value pair has no key)".into(),
            ));
        }
        while it.next_if(|c| is_space(*c)).is_some() {}
        let value = if it.next_if_eq(&'\'').is_some() {
            quoted_value(&mut it)?
        } else {
            bare_value(&mut it)
        };
        pairs.push((key, value));
    }
}

/// A value up to the next whitespace (consumed); a backslash takes the next character literally.
fn bare_value(it: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let mut value = String::new();
    while let Some(c) = it.next() {
        match c {
            c if is_space(c) => break,
            '\\' => value.extend(it.next()),
            c => value.push(c),
        }
    }
    value
}

/// A value after its opening quote, up to the closing one; a backslash takes the next character
/// literally.
fn quoted_value(it: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<String, TlsError> {
    let mut value = String::new();
    loop {
        match it.next() {
            None => {
                return Err(TlsError::BadUrl(
                    "unterminated quoted string in connection info string".into(),
                ))
            }
            Some('\'') => return Ok(value),
            Some('\\') => value.extend(it.next()),
            Some(c) => value.push(c),
        }
    }
}

fn split_uri(s: &str) -> Result<Split, TlsError> {
    let mut split = Split {
        rest: s.to_string(),
        sslmode: None,
        sslrootcert: None,
    };
    let Some(q) = query_start(s) else {
        return Ok(split);
    };
    let mut kept = Vec::new();
    // a trailing `&` ends the query (libpq stops there); an empty parameter elsewhere is an error
    let query = s[q + 1..].strip_suffix('&').unwrap_or(&s[q + 1..]);
    for param in query.split('&').filter(|_| !query.is_empty()) {
        let Some((key, value)) = param.split_once('=') else {
            return Err(TlsError::BadUrl(format!(
                "missing key/value separator \"=\" in URI query parameter: \"{param}\""
            )));
        };
        let (key, value) = (percent_decode(key)?, percent_decode(value)?);
        match (key.as_str(), value.as_str()) {
            ("sslmode", _) => split.sslmode = Some(value),
            ("sslrootcert", _) => split.sslrootcert = Some(value),
            ("ssl", "true") => split.sslmode = Some("require".into()),
            _ => kept.push(param),
        }
    }
    split.rest = if kept.is_empty() {
        s[..q].to_string()
    } else {
        format!("{}?{}", &s[..q], kept.join("&"))
    };
    Ok(split)
}

/// Where the query begins: the first `?` after the user info (which ends at the first `@`
/// before any `/`, and may itself hold a `?`, as libpq and tokio-postgres both read it).
fn query_start(s: &str) -> Option<usize> {
    let body = s.find("://")? + 3;
    let after_user = match s[body..].find(['@', '/']) {
        Some(i) if s[body + i..].starts_with('@') => body + i + 1,
        _ => body,
    };
    s[after_user..].find('?').map(|i| after_user + i)
}

/// libpq's `conninfo_uri_decode`: `%xy` is a byte, a malformed `%` or a `%00` is an error.
fn percent_decode(s: &str) -> Result<String, TlsError> {
    // the value may be a password: never echoed
    let bad = || TlsError::BadUrl("invalid percent-encoded token in a URI query parameter".into());
    let mut bytes = Vec::with_capacity(s.len());
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b != b'%' {
            bytes.push(b);
            continue;
        }
        let hex = [it.next().ok_or_else(bad)?, it.next().ok_or_else(bad)?];
        let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
        let byte = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
        if byte == 0 {
            return Err(TlsError::BadUrl(
                "forbidden value %00 in a percent-encoded URI query parameter".into(),
            ));
        }
        bytes.push(byte);
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(s: &str) -> Vec<(String, String)> {
        parse_key_value(s).unwrap()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn key_value_allows_whitespace_around_the_equals_sign() {
        assert_eq!(
            kv("host=127.0.0.1 port=5432 user=postgres sslmode = require"),
            vec![
                pair("host", "127.0.0.1"),
                pair("port", "5432"),
                pair("user", "postgres"),
                pair("sslmode", "require"),
            ]
        );
        assert_eq!(
            kv("\tsslmode\n=\x0bverify-full\r\x0c"),
            vec![pair("sslmode", "verify-full")]
        );
        let s = split("host=h sslmode =verify-ca sslrootcert= /ca.pem").unwrap();
        assert_eq!(s.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(s.sslrootcert.as_deref(), Some("/ca.pem"));
        assert_eq!(s.rest, "host='h'");
    }

    #[test]
    fn key_value_quotes_and_backslash_escapes() {
        assert_eq!(
            kv(r"sslrootcert = '/my certs/it\'s \\ root.crt' password=a\ b\\c\'d"),
            vec![
                pair("sslrootcert", r"/my certs/it's \ root.crt"),
                pair("password", r"a b\c'd"),
            ]
        );
        // a quoted value ends at its quote: the next pair may follow at once
        assert_eq!(kv("a='x'b=y"), vec![pair("a", "x"), pair("b", "y")]);
        assert_eq!(kv("a='' b="), vec![pair("a", ""), pair("b", "")]);
        assert!(parse_key_value("sslmode='require").is_err());
        assert!(parse_key_value("sslmode require").is_err());
        assert!(parse_key_value("=require").is_err());
    }

    #[test]
    fn key_value_rest_is_requoted_for_tokio_postgres_and_the_last_value_wins() {
        let s = split(r"host=a host=b password='it\'s' sslmode=disable sslmode=require").unwrap();
        assert_eq!(s.sslmode.as_deref(), Some("require"));
        assert_eq!(s.rest, r"host='b' password='it\'s'");
        let config: tokio_postgres::Config = s.rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"it's"[..]));
        assert_eq!(config.get_hosts().len(), 1);
    }

    #[test]
    fn uri_parameters_are_percent_decoded_and_the_rest_kept_verbatim() {
        let s = split(
            "postgres://u:p%3Fw@db.example:5432/app?options=-c%20a%3Db+c&sslrootcert=%2Fetc%2Fca+1.pem&sslmode=verify%2Dfull",
        )
        .unwrap();
        assert_eq!(s.sslmode.as_deref(), Some("verify-full"));
        // `+` is not a space in libpq's URIs
        assert_eq!(s.sslrootcert.as_deref(), Some("/etc/ca+1.pem"));
        assert_eq!(
            s.rest,
            "postgres://u:p%3Fw@db.example:5432/app?options=-c%20a%3Db+c"
        );
        let s = split("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(s.rest, "postgresql://h/db");
        let s = split("postgres://h/db?ssl=true").unwrap();
        assert_eq!(s.sslmode.as_deref(), Some("require"));
        let s = split("postgres://h/db?sslmode=require&").unwrap();
        assert_eq!(
            (s.sslmode.as_deref(), s.rest.as_str()),
            (Some("require"), "postgres://h/db")
        );
        assert_eq!(split("postgres://h/db?").unwrap().rest, "postgres://h/db");
        let s = split("postgres://h/db").unwrap();
        assert_eq!((s.sslmode, s.rest.as_str()), (None, "postgres://h/db"));
    }

    #[test]
    fn uri_query_starts_after_the_user_info() {
        let s = split("postgres://u:a?b@h/db?sslmode=disable").unwrap();
        assert_eq!(s.sslmode.as_deref(), Some("disable"));
        assert_eq!(s.rest, "postgres://u:a?b@h/db");
    }

    #[test]
    fn malformed_uri_parameters_are_refused() {
        assert!(split("postgres://h/db?sslmode").is_err());
        assert!(split("postgres://h/db?sslmode=require&&a=b").is_err());
        assert!(split("postgres://h/db?sslmode=%zz").is_err());
        assert!(split("postgres://h/db?sslmode=%2").is_err());
        assert!(split("postgres://h/db?sslrootcert=a%00b").is_err());
    }
}
