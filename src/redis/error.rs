//! Errors from talking to Redis, and the reply prefixes the daemon reacts to.

use std::time::Duration;

use fred::prelude::{Error as FredError, ErrorKind};

use super::tls::TlsError;

/// Errors from talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid redis url: {0}")]
    Url(String),
    /// A TLS file that config validation accepted cannot be used any more.
    #[error("redis TLS setup: {key}: {error}", key = .0.key(), error = .0)]
    Tls(TlsError),
    /// The TLS handshake failed: the server's certificate did not verify, or the server
    /// refused ours (or wanted one and got none).
    #[error(
        "TLS handshake with redis failed: {0} (check tls_ca_file, tls_cert_file and tls_key_file)"
    )]
    TlsHandshake(String),
    #[error("redis unreachable for {waited:?} (connect_timeout): {last}")]
    ConnectTimeout { waited: Duration, last: String },
    #[error("stopped while connecting to redis")]
    Stopped,
    #[error(transparent)]
    Command(#[from] FredError),
    #[error("unexpected reply to {command}: {reply}")]
    Reply {
        command: &'static str,
        reply: String,
    },
}

impl RedisError {
    /// A connection-level error from fred, with TLS failures told apart: their text
    /// alone ("invalid peer certificate: UnknownIssuer") does not say TLS.
    pub(crate) fn connect(error: FredError) -> RedisError {
        if is_tls_failure(&error) {
            RedisError::TlsHandshake(describe_tls(error.details()))
        } else {
            RedisError::Command(error)
        }
    }

    /// The group (or its stream) was deleted under us: recreate it.
    pub fn is_nogroup(&self) -> bool {
        matches!(self, RedisError::Command(e) if e.details().starts_with("NOGROUP"))
    }

    /// The key holds something other than a stream: a configuration mistake that no
    /// retry can fix.
    pub fn is_wrongtype(&self) -> bool {
        matches!(self, RedisError::Command(e) if e.details().starts_with("WRONGTYPE"))
    }

    /// The `[redis]` settings cannot work (exit 78, like a config error).
    pub fn is_config(&self) -> bool {
        matches!(self, RedisError::Url(_) | RedisError::Tls(_))
    }
}

/// rustls errors reach us as fred `Tls` or `IO` errors carrying rustls's debug text,
/// e.g. `Custom { kind: InvalidData, error: AlertReceived(CertificateRequired) }`.
const TLS_MARKERS: [&str; 6] = [
    "InvalidCertificate",
    "AlertReceived",
    "certificate",
    "HandshakeFailure",
    "PeerIncompatible",
    "PeerMisbehaved",
];

fn is_tls_failure(error: &FredError) -> bool {
    *error.kind() == ErrorKind::Tls || TLS_MARKERS.iter().any(|m| error.details().contains(m))
}

/// An operator's sentence for rustls's text.
fn describe_tls(details: &str) -> String {
    let inner = details
        .split_once("error: ")
        .map_or(details, |(_, rest)| rest.trim_end_matches([' ', '}']));
    if let Some(why) = inner.strip_prefix("InvalidCertificate") {
        format!(
            "the server's certificate did not verify {why}: tls_ca_file (or the system store) \
             must hold the CA that signed it, and it must name the address connected to"
        )
    } else if inner.contains("CertificateRequired") {
        "the server requires a client certificate (tls-auth-clients): set tls_cert_file and \
         tls_key_file"
            .to_string()
    } else if let Some(alert) = inner.strip_prefix("AlertReceived") {
        format!(
            "the server refused the connection, alert {alert}: is tls_cert_file signed by a CA \
             the server trusts (its tls-ca-cert-file)?"
        )
    } else {
        inner.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_told_apart_and_explained() {
        let rustls = |inner: &str| {
            FredError::new(
                ErrorKind::IO,
                format!("Custom {{ kind: InvalidData, error: {inner} }}"),
            )
        };
        for (inner, needle) in [
            (
                "InvalidCertificate(UnknownIssuer)",
                "did not verify (UnknownIssuer)",
            ),
            (
                "AlertReceived(CertificateRequired)",
                "requires a client certificate",
            ),
            ("AlertReceived(UnknownCA)", "alert (UnknownCA)"),
        ] {
            let error = RedisError::connect(rustls(inner));
            assert!(matches!(error, RedisError::TlsHandshake(_)), "{error:?}");
            let text = error.to_string();
            assert!(text.contains(needle) && text.starts_with("TLS"), "{text}");
        }
        let refused = FredError::new(ErrorKind::IO, "Connection refused (os error 111)");
        assert!(matches!(
            RedisError::connect(refused),
            RedisError::Command(_)
        ));
    }
}
