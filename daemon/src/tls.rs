//! How pgseald reaches the database: libpq's `sslmode` and `sslrootcert`, over
//! rustls (pure Rust with the `ring` provider: no OpenSSL to match on the host, and
//! the same behaviour in the static binary everywhere).
//!
//! | sslmode | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | if the server offers it | not checked (as libpq) |
//! | `require` | always | not checked; with `sslrootcert`, checked as `verify-ca` (as libpq) |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert`, and the host name or address |
//!
//! tokio-postgres knows only disable/prefer/require and no `sslrootcert`, so both
//! options are taken out of the connection string here.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;

use crate::error::DaemonError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A connection string with its TLS options taken out.
#[derive(Debug)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub mode: SslMode,
    pub root_cert: Option<String>,
}

/// Parses a URL (`postgres://…?sslmode=…`) or key=value connection string. The
/// error never repeats the string: it may hold a password.
pub fn parse(conn: &str) -> Result<Target, DaemonError> {
    let (rest, mode, root_cert) =
        if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
            split_url(conn)
        } else {
            split_key_values(conn)
        }?;
    let mode = match mode.as_deref() {
        None | Some("prefer") => SslMode::Prefer,
        Some("disable") => SslMode::Disable,
        Some("require") if root_cert.is_some() => SslMode::VerifyCa,
        Some("require") => SslMode::Require,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some(_) => {
            return Err(DaemonError::Config(
                "sslmode must be disable, prefer, require, verify-ca or verify-full".into(),
            ))
        }
    };
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
        return Err(DaemonError::Config(
            "sslmode verify-ca and verify-full need sslrootcert (a PEM file of the CA)".into(),
        ));
    }
    let mut config: tokio_postgres::Config = rest.parse().map_err(|_| DaemonError::BadUrl)?;
    config.ssl_mode(match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });
    Ok(Target {
        config,
        mode,
        root_cert,
    })
}

type Split = (String, Option<String>, Option<String>);

fn split_url(url: &str) -> Result<Split, DaemonError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None, None));
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = Some(percent_decode(v)?),
            Some(("sslrootcert", v)) => root = Some(percent_decode(v)?),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, mode, root))
}

fn percent_decode(v: &str) -> Result<String, DaemonError> {
    let bad = || DaemonError::BadUrl;
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = v.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Splits `key=value` pairs (values may be single-quoted, with `\` escapes, as in
/// libpq) and takes out sslmode and sslrootcert.
fn split_key_values(s: &str) -> Result<Split, DaemonError> {
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let key = key.trim().to_owned();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().ok_or(DaemonError::BadUrl)?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(DaemonError::BadUrl),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied().filter(|c| !c.is_whitespace()) {
                value.push(c);
                chars.next();
            }
        }
        match key.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => root = Some(value),
            _ => kept.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            )),
        }
    }
    Ok((kept.join(" "), mode, root))
}

/// The rustls connector for `target`.
pub fn connector(target: &Target) -> Result<tokio_postgres_rustls::MakeRustlsConnect, DaemonError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DaemonError::Config(format!("TLS setup: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (target.mode, &target.root_cert) {
        (SslMode::VerifyCa | SslMode::VerifyFull, Some(path)) => {
            let full = webpki_verifier(path, provider.clone())?;
            if target.mode == SslMode::VerifyFull {
                full
            } else {
                Arc::new(ChainOnly(full))
            }
        }
        _ => Arc::new(NoCheck(provider)),
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn webpki_verifier(
    path: &str,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, DaemonError> {
    let pem =
        std::fs::read(path).map_err(|e| DaemonError::Config(format!("sslrootcert {path}: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|_| {
            DaemonError::Config(format!("sslrootcert {path}: not PEM certificates"))
        })?;
        roots
            .add(cert)
            .map_err(|e| DaemonError::Config(format!("sslrootcert {path}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(DaemonError::Config(format!(
            "sslrootcert {path}: no certificate in it"
        )));
    }
    let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| DaemonError::Config(format!("sslrootcert {path}: {e}")))?;
    Ok(v)
}

/// `prefer` and `require` without a CA: encrypted, the certificate not checked (the
/// handshake's signatures still are), as libpq does.
#[derive(Debug)]
struct NoCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
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
    ) -> Result<HandshakeSignatureValid, TlsError> {
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

/// `verify-ca`: the chain must lead to the CA; the name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
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
    fn ssl_options_are_taken_out_of_urls_and_key_values() {
        let t = parse("postgres://u:secret@db:5432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x").unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(t.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(t.config.get_application_name(), Some("x"));
        let t =
            parse("host=db user=u password='a b\\'c' sslmode=require sslrootcert=/ca.pem").unwrap();
        assert_eq!(
            t.mode,
            SslMode::VerifyCa,
            "require with a CA file checks the chain, as libpq"
        );
        assert_eq!(t.config.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(parse("host=db").unwrap().mode, SslMode::Prefer);
        assert_eq!(
            parse("host=db sslmode=disable").unwrap().mode,
            SslMode::Disable
        );
    }

    #[test]
    fn bad_options_never_echo_the_string() {
        for s in [
            "host=db password=hunter2 sslmode=verify-full",
            "host=db password=hunter2 sslmode=sometimes",
            "postgres://u:hunter2@db/app?sslmode=verify-ca",
            "host=db password='hunter2",
        ] {
            let e = parse(s).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
