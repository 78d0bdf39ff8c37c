//! Redis URLs and TLS files are checked in full before anything connects (issue #14, item
//! 5; issue #11): a URL that cannot work, or an unusable TLS file, exits 78 from `--check`
//! and from a plain start, naming the key, with every password masked.

mod common;

use std::path::Path;

use common::*;

const PASSWORD: &str = "hunter2Secret";

/// `--check`, then a plain start, of a config whose `[redis]` table is `redis`.
fn both_ways(redis: &str) -> Vec<CliOutput> {
    let dir = workdir();
    let handler = write_script(dir.path(), "ok.sh", "cat > /dev/null");
    let text = format!(
        "[redis]\n{redis}\n\n[daemon]\nconsumer = \"tester\"\n\n{}",
        stream_table("s", "g", &handler, "")
    );
    let path = dir.path().join("streamd.toml");
    std::fs::write(&path, text).expect("write config");
    let check = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[],
        MEDIUM,
    );
    let start = run_cli(&[Path::new("--config"), &path], &[], MEDIUM);
    vec![check, start]
}

fn assert_config_error(redis: &str, key: &str, needle: &str) {
    for out in both_ways(redis) {
        assert_eq!(out.code(), Some(EX_CONFIG), "{out}");
        let all = out.all();
        assert!(all.contains(key) && all.contains(needle), "{out}");
        assert!(!all.contains(PASSWORD), "password printed: {out}");
    }
}

#[test]
fn a_url_with_a_bad_port_exits_78_not_70() {
    let url = format!("redis://:{PASSWORD}@127.0.0.1:notaport/0");
    assert_config_error(
        &format!("url = {}", toml_str(&url)),
        "redis.url",
        "invalid port",
    );
}

#[test]
fn sentinel_and_cluster_urls_are_checked() {
    let no_service = format!("redis-sentinel://s1:26379?sentinelPassword={PASSWORD}");
    assert_config_error(
        &format!("url = {}", toml_str(&no_service)),
        "redis.url",
        "sentinelServiceName",
    );
    let cluster_db = format!("redis-cluster://:{PASSWORD}@h:7000/3");
    assert_config_error(
        &format!("url = {}", toml_str(&cluster_db)),
        "redis.url",
        "only database 0",
    );
}

#[test]
fn check_summary_masks_sentinel_passwords() {
    let url = format!(
        "redis-sentinel://:{PASSWORD}@127.0.0.1:26379/0?sentinelServiceName=m&sentinelPassword={PASSWORD}"
    );
    let dir = workdir();
    let handler = write_script(dir.path(), "ok.sh", "cat > /dev/null");
    let path = dir.path().join("streamd.toml");
    let text = config(&url, &stream_table("s", "g", &handler, ""));
    std::fs::write(&path, text).expect("write config");
    let out = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[],
        MEDIUM,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("sentinelPassword=***"), "{out}");
    assert!(!out.all().contains(PASSWORD), "{out}");
}

#[test]
fn unusable_tls_files_exit_78_naming_the_key() {
    let dir = workdir();
    let missing = dir.path().join("missing-ca.pem");
    assert_config_error(
        &format!(
            "url = \"rediss://127.0.0.1:6380\"\ntls_ca_file = {:?}",
            missing
        ),
        "redis.tls_ca_file",
        "cannot read",
    );
    let not_pem = write_script(dir.path(), "ca.pem", "not a certificate");
    assert_config_error(
        &format!("url = \"rediss://127.0.0.1:6380\"\ntls_ca_file = {not_pem:?}"),
        "redis.tls_ca_file",
        "no PEM certificate",
    );
    assert_config_error(
        &format!("url = \"rediss://127.0.0.1:6380\"\ntls_cert_file = {not_pem:?}"),
        "redis.tls_key_file",
        "is required with tls_cert_file",
    );
    assert_config_error(
        &format!("url = \"redis://127.0.0.1:6379\"\ntls_ca_file = {not_pem:?}"),
        "redis.tls_ca_file",
        "does not use TLS",
    );
}
