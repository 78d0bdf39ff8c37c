//! Validation of the `[redis]` table: the URL is parsed in full and the TLS files are read
//! and checked here, so `--check` refuses what could only fail at connect time. The
//! parsing itself lives with the connection code ([`crate::redis::url`],
//! [`crate::redis::tls`]), which uses the same functions at connect time.

use std::path::PathBuf;

use super::locate::KeyPath;
use super::raw::RawRedis;
use super::validate::Ctx;
use super::{ConfigError, REDIS_URL_ENV, RedisConfig};
use crate::redis::tls::{self, TlsFiles};
use crate::redis::url;

impl Ctx<'_> {
    pub(super) fn redis(
        &self,
        raw: RawRedis,
        env_url: Option<String>,
    ) -> Result<RedisConfig, ConfigError> {
        let table = KeyPath::new("redis");
        let key = table.key("url");
        let from_env = env_url.is_some();
        let url = env_url
            .or(raw.url)
            .ok_or_else(|| self.invalid(&key, format!("is required (or set {REDIS_URL_ENV})")))?;
        let target = url::parse(&url).map_err(|why| {
            // The file may be fine; say where the bad value really came from.
            let why = if from_env {
                format!("{REDIS_URL_ENV}: {why}")
            } else {
                why
            };
            self.invalid(&key, why)
        })?;
        let connect_timeout = raw
            .connect_timeout
            .map(|t| self.parse_duration(&table.key("connect_timeout"), &t))
            .transpose()?;
        let tls = TlsFiles {
            ca_file: self.tls_path(&table, "tls_ca_file", raw.tls_ca_file)?,
            cert_file: self.tls_path(&table, "tls_cert_file", raw.tls_cert_file)?,
            key_file: self.tls_path(&table, "tls_key_file", raw.tls_key_file)?,
        };
        if target.tls {
            tls::client_config(&tls)
                .map_err(|e| self.invalid(&table.key(e.key()), e.to_string()))?;
        } else if !tls.is_empty() {
            let set = [
                ("tls_ca_file", &tls.ca_file),
                ("tls_cert_file", &tls.cert_file),
                ("tls_key_file", &tls.key_file),
            ]
            .into_iter()
            .find_map(|(name, path)| path.as_ref().map(|_| name))
            .unwrap_or("tls_ca_file");
            return Err(self.invalid(
                &table.key(set),
                format!(
                    "is set, but the {} URL does not use TLS: use rediss://, rediss-cluster:// \
                     or rediss-sentinel://",
                    target.deployment
                ),
            ));
        }
        Ok(RedisConfig {
            url,
            connect_timeout,
            tls,
        })
    }

    /// A TLS file path; a relative one is relative to the config file's directory.
    fn tls_path(
        &self,
        table: &KeyPath,
        name: &str,
        value: Option<String>,
    ) -> Result<Option<PathBuf>, ConfigError> {
        let Some(text) = value else {
            return Ok(None);
        };
        let key = table.key(name);
        if text.is_empty() {
            return Err(self.invalid(&key, "must not be empty"));
        }
        std::path::absolute(self.config_dir().join(&text))
            .map(Some)
            .map_err(|e| self.invalid(&key, format!("cannot resolve {text:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;

    #[test]
    fn redis_url_required() {
        let text = "# comment\n\n[redis]\nconnect_timeout = \"5s\"\n\n[[streams]]\nname = \"a\"\ngroup = \"g\"\nhandler = [\"sh\"]\n";
        assert_invalid(text, 3, "redis.url", REDIS_URL_ENV);
        let no_table = "[[streams]]\nname = \"a\"\ngroup = \"g\"\nhandler = [\"sh\"]\n";
        assert_invalid(no_table, 1, "redis.url", "is required");
    }

    #[test]
    fn redis_url_scheme() {
        let text = MINIMAL.replace("redis://127.0.0.1", "http://user:hunter2@127.0.0.1");
        assert_invalid(&text, 2, "redis.url", "unknown scheme \"http\"");
        let (_, _, message) = invalid(&text);
        assert!(!message.contains("hunter2"), "{message}");
        assert_invalid(
            &MINIMAL.replace("redis://127.0.0.1:6379/0", "redis://"),
            2,
            "redis.url",
            "host",
        );
    }

    #[test]
    fn env_url_overrides_and_permits_missing_url() {
        let c = load_text_env(MINIMAL, Some("rediss://:pw@env-host:6379")).expect("valid");
        assert_eq!(c.redis.url, "rediss://:pw@env-host:6379");

        let without_url = MINIMAL.replace("url = \"redis://127.0.0.1:6379/0\"\n", "");
        let c = load_text_env(&without_url, Some("redis://env-host")).expect("valid");
        assert_eq!(c.redis.url, "redis://env-host");

        let (line, key, message) =
            invalid_from(load_text_env(MINIMAL, Some("tcp://user:pw@env-host")));
        assert_eq!((line, key.as_str()), (2, "redis.url"));
        assert!(message.starts_with(REDIS_URL_ENV), "{message}");
        assert!(!message.contains(":pw@"), "{message}");
    }

    #[test]
    fn every_deployment_form_is_accepted() {
        for url in [
            "redis://:pw@127.0.0.1:6379/2",
            "rediss://h:6380",
            "redis-cluster://u:pw@h1:7000?node=h2:7001&node=h3:7002",
            "redis-sentinel://:pw@s1:26379/0?sentinelServiceName=mymaster&node=s2:26379&sentinelPassword=sp",
            "redis+unix:///run/redis/redis.sock?db=2",
            "unix:///run/redis/redis.sock?db=2",
        ] {
            let c = ok(&MINIMAL.replace("redis://127.0.0.1:6379/0", url));
            assert_eq!(c.redis.url, url);
        }
    }

    #[test]
    fn a_url_that_cannot_work_is_refused_at_load() {
        let text = MINIMAL.replace(
            "redis://127.0.0.1:6379/0",
            "redis://:hunter2@127.0.0.1:notaport/0",
        );
        let (_, _, message) = invalid(&text);
        assert!(!message.contains("hunter2"), "{message}");
        assert_invalid(&text, 2, "redis.url", "invalid port number");
        let sentinel = MINIMAL.replace(
            "redis://127.0.0.1:6379/0",
            "redis-sentinel://s1?sentinelPassword=hunter2",
        );
        assert_invalid(&sentinel, 2, "redis.url", "sentinelServiceName");
        let (_, _, message) = invalid(&sentinel);
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn tls_files_are_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = crate::redis::tls::test_pki::make(dir.path());
        let tls = |url: &str, keys: &str| {
            MINIMAL.replace(
                "url = \"redis://127.0.0.1:6379/0\"\n",
                &format!("url = \"{url}\"\n{keys}"),
            )
        };
        let files = format!(
            "tls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            pki.ca, pki.client_cert, pki.client_key
        );
        let c = ok(&tls("rediss://127.0.0.1:6380", &files));
        assert_eq!(c.redis.tls.ca_file.as_ref(), Some(&pki.ca));
        assert_eq!(c.redis.tls.key_file.as_ref(), Some(&pki.client_key));
        ok(&tls("rediss-cluster://127.0.0.1:7000", &files));

        assert_invalid(
            &tls("redis://127.0.0.1:6379", &files),
            3,
            "redis.tls_ca_file",
            "does not use TLS",
        );
        let missing = format!("tls_ca_file = {:?}\n", dir.path().join("nope.pem"));
        assert_invalid(
            &tls("rediss://h", &missing),
            3,
            "redis.tls_ca_file",
            "cannot read",
        );
        let no_key = format!("tls_cert_file = {:?}\n", pki.client_cert);
        assert_invalid(
            &tls("rediss://h", &no_key),
            1,
            "redis.tls_key_file",
            "is required with tls_cert_file",
        );
        let wrong_key = format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
            pki.client_cert, pki.server_key
        );
        assert_invalid(
            &tls("rediss://h", &wrong_key),
            4,
            "redis.tls_key_file",
            "cannot be used with",
        );
    }
}
