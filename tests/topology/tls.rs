//! Test certificates made with `openssl` (EC P-256, valid 3 days): a private CA, a server
//! certificate for `localhost` / `127.0.0.1` and a client certificate signed by it, and an
//! unrelated second CA (the "wrong CA"). Plus a redis-server that speaks TLS.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::{Node, server_args};

/// PEM files in a temp dir (removed on drop).
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed none of the above.
    pub other_ca: PathBuf,
    dir: TempDir,
}

impl Certs {
    pub fn make() -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("streamd-certs-")
            .tempdir()
            .expect("certs tempdir");
        let d = dir.path();
        self_signed_ca(d, "ca", "streamd test CA");
        self_signed_ca(d, "other-ca", "some other CA");
        signed(
            d,
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        );
        signed(
            d,
            "client",
            "streamd test client",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        );
        Certs {
            ca: d.join("ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            other_ca: d.join("other-ca.crt"),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A redis-server with a plain port (for the test client, [`Node::port`]) and a TLS
    /// port ([`Node::spare_port`]) using these certificates; `auth_clients` is
    /// `tls-auth-clients` (`yes` requires a client certificate, Redis's default).
    pub fn server(&self, parent: &Path, name: &str, auth_clients: bool) -> Node {
        let p = |f: &Path| f.to_str().expect("utf-8 path").to_owned();
        let (cert, key, ca) = (p(&self.server_cert), p(&self.server_key), p(&self.ca));
        let auth = if auth_clients { "yes" } else { "no" };
        Node::start(parent, name, &|port, tls_port, d| {
            let mut a = server_args(port, d);
            a.extend(
                [
                    "--tls-port",
                    &tls_port.to_string(),
                    "--tls-cert-file",
                    &cert,
                    "--tls-key-file",
                    &key,
                    "--tls-ca-cert-file",
                    &ca,
                    "--tls-auth-clients",
                    auth,
                ]
                .map(str::to_owned),
            );
            a
        })
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

fn self_signed_ca(dir: &Path, name: &str, cn: &str) {
    let (key, crt, subj) = (
        format!("{name}.key"),
        format!("{name}.crt"),
        format!("/CN={cn}"),
    );
    let mut args = vec!["req", "-x509", "-nodes", "-days", "3", "-subj", &subj];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &crt]);
    args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &args);
}

fn signed(dir: &Path, name: &str, cn: &str, ext: &str) {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    let (subj, extfile) = (format!("/CN={cn}"), format!("{name}.ext"));
    fs::write(dir.join(&extfile), ext).expect("write ext file");
    let mut args = vec!["req", "-new", "-nodes", "-subj", &subj];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &csr]);
    openssl(dir, &args);
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
            "3",
            "-out",
            &crt,
            "-extfile",
            &extfile,
        ],
    );
}
