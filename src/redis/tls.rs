//! TLS for Redis connections: the CA to trust and the client certificate to present.
//!
//! `[redis] tls_ca_file`, `tls_cert_file` and `tls_key_file` (PEM) are read and checked
//! by config validation, so `--check` refuses a missing, unreadable or invalid file, a
//! certificate without its key or a key that does not match it; the same [`client_config`]
//! builds the rustls configuration at connect time, used for every connection of a
//! `rediss*://` URL (cluster nodes and sentinels included).
//!
//! Trust: with `tls_ca_file`, only the certificates in that file (a private CA, as
//! self-hosted Redis uses); without it, the system store (`rustls-native-certs`: the OS
//! bundle, or the files named by `SSL_CERT_FILE` / `SSL_CERT_DIR`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The TLS files of `[redis]`, as absolute paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls_ca_file`: PEM certificates to trust instead of the system store.
    pub ca_file: Option<PathBuf>,
    /// `tls_cert_file`: PEM client certificate (chain), presented to the server.
    pub cert_file: Option<PathBuf>,
    /// `tls_key_file`: PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.key_file.is_none()
    }
}

/// A TLS setting that cannot work. [`TlsError::key`] is the `[redis]` key to blame.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    key: &'static str,
    message: String,
}

impl TlsError {
    fn new(key: &'static str, message: impl Into<String>) -> TlsError {
        TlsError {
            key,
            message: message.into(),
        }
    }

    /// `tls_ca_file`, `tls_cert_file` or `tls_key_file`.
    pub fn key(&self) -> &'static str {
        self.key
    }
}

/// Builds the rustls client configuration from `files` (see the module doc for trust).
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, TlsError> {
    let roots = match &files.ca_file {
        Some(path) => ca_roots(path)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("tls_ca_file", format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    match (&files.cert_file, &files.key_file) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(_), None) => Err(TlsError::new(
            "tls_key_file",
            "is required with tls_cert_file: a client certificate needs its private key",
        )),
        (None, Some(_)) => Err(TlsError::new(
            "tls_cert_file",
            "is required with tls_key_file: the private key needs its certificate",
        )),
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "tls_cert_file")?;
            let key_der = private_key(key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                TlsError::new(
                    "tls_key_file",
                    format!(
                        "{} cannot be used with the certificate in {}: {e}",
                        key.display(),
                        cert.display()
                    ),
                )
            })
        }
    }
}

/// The certificates of `tls_ca_file`, every one of them valid.
fn ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, "tls_ca_file")? {
        roots.add(cert).map_err(|e| {
            TlsError::new(
                "tls_ca_file",
                format!("{}: not a usable CA certificate: {e}", path.display()),
            )
        })?;
    }
    Ok(roots)
}

/// The system store; an error only when it holds no usable certificate at all.
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added > 0 {
        return Ok(roots);
    }
    let why = found
        .errors
        .first()
        .map_or_else(|| "the store is empty".to_string(), |e| e.to_string());
    Err(TlsError::new(
        "tls_ca_file",
        format!(
            "is not set and the system's CA store has no usable certificate ({why}): set \
             tls_ca_file to the CA that signed the Redis server's certificate, or install \
             the system CA bundle (ca-certificates), or point SSL_CERT_FILE at a PEM bundle"
        ),
    ))
}

/// Every `CERTIFICATE` section of the PEM file at `path` (at least one).
fn certificates(path: &Path, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path, key)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, key, &e))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            key,
            format!(
                "{}: no PEM certificate in it (a -----BEGIN CERTIFICATE----- section)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// The private key of `tls_key_file`: PKCS#8, PKCS#1 (RSA) or SEC1 (EC), unencrypted.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const KEY: &str = "tls_key_file";
    let bytes = read(path, KEY)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::new(
            KEY,
            format!(
                "{}: no unencrypted PEM private key in it (PKCS#8, RSA or EC; an encrypted \
                 key must be decrypted first, e.g. with `openssl pkey`)",
                path.display()
            ),
        ),
        other => pem_error(path, KEY, &other),
    })
}

fn read(path: &Path, key: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| TlsError::new(key, format!("cannot read {}: {e}", path.display())))
}

fn pem_error(path: &Path, key: &'static str, error: &pem::Error) -> TlsError {
    // Never quote the file's content: it may be a private key.
    let what = match error {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_string(),
        pem::Error::IllegalSectionStart { .. } => "a malformed BEGIN line".to_string(),
        pem::Error::Base64Decode(_) => "invalid base64 in a PEM section".to_string(),
        other => other.to_string(),
    };
    TlsError::new(key, format!("{}: not valid PEM: {what}", path.display()))
}

/// Test certificates made with the `openssl` command: a CA, a server certificate for
/// `localhost` / `127.0.0.1` and a client certificate, each key unencrypted.
#[cfg(test)]
pub(crate) mod test_pki {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    pub(crate) struct Pki {
        pub(crate) ca: PathBuf,
        pub(crate) server_cert: PathBuf,
        pub(crate) server_key: PathBuf,
        pub(crate) client_cert: PathBuf,
        pub(crate) client_key: PathBuf,
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A key and a certificate named `name` signed by the CA in `dir`.
    fn issue(dir: &Path, name: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(dir.join(&ext), extensions).expect("write ext");
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let subject = format!("/CN={name}");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subject,
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &ext,
            ],
        );
    }

    pub(crate) fn make(dir: &Path) -> Pki {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=redis-streamd test CA",
            ],
        );
        issue(dir, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n");
        issue(dir, "client", "extendedKeyUsage=clientAuth\n");
        Pki {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> TlsFiles {
        let write = |name: &str, content: Option<&str>| {
            content.map(|text| {
                let path = dir.join(name);
                std::fs::write(&path, text).expect("write");
                path
            })
        };
        TlsFiles {
            ca_file: write("ca.pem", ca),
            cert_file: write("cert.pem", cert),
            key_file: write("key.pem", key),
        }
    }

    fn error(files: &TlsFiles) -> TlsError {
        match client_config(files) {
            Ok(_) => panic!("accepted {files:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn bad_files_name_their_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = TlsFiles {
            ca_file: Some(dir.path().join("nope.pem")),
            ..TlsFiles::default()
        };
        let e = error(&missing);
        assert_eq!(e.key(), "tls_ca_file");
        assert!(e.to_string().contains("cannot read"), "{e}");

        let e = error(&files(dir.path(), Some("hello"), None, None));
        assert_eq!(e.key(), "tls_ca_file");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");

        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = error(&files(dir.path(), Some(broken), None, None));
        assert!(e.to_string().contains("not valid PEM"), "{e}");

        let e = error(&files(dir.path(), None, Some("x"), None));
        assert_eq!(e.key(), "tls_key_file");
        assert!(e.to_string().contains("is required"), "{e}");

        let e = error(&files(dir.path(), None, None, Some("x")));
        assert_eq!(e.key(), "tls_cert_file");
    }

    #[test]
    fn real_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = test_pki::make(dir.path());
        let ca_only = TlsFiles {
            ca_file: Some(pki.ca.clone()),
            ..TlsFiles::default()
        };
        client_config(&ca_only).expect("CA file");
        let with_client = TlsFiles {
            cert_file: Some(pki.client_cert.clone()),
            key_file: Some(pki.client_key.clone()),
            ..ca_only.clone()
        };
        client_config(&with_client).expect("client certificate");

        // The server's key does not belong to the client's certificate.
        let mismatched = TlsFiles {
            key_file: Some(pki.server_key.clone()),
            ..with_client.clone()
        };
        let e = error(&mismatched);
        assert_eq!(e.key(), "tls_key_file");
        assert!(e.to_string().contains("cannot be used with"), "{e}");

        // A certificate given as the key, and a key given as the certificate.
        let swapped = TlsFiles {
            cert_file: Some(pki.client_key.clone()),
            key_file: Some(pki.client_cert.clone()),
            ..ca_only.clone()
        };
        let e = error(&swapped);
        assert_eq!(e.key(), "tls_cert_file");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = error(&TlsFiles {
            cert_file: Some(pki.client_cert.clone()),
            ..swapped
        });
        assert_eq!(e.key(), "tls_key_file");
        assert!(
            e.to_string().contains("no unencrypted PEM private key"),
            "{e}"
        );
        assert!(!e.to_string().contains("BEGIN"), "{e}");
    }
}
