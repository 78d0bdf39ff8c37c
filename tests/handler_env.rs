//! The handlers' environment (issue #14, item 8): the daemon's own `REDIS_STREAMD_*`
//! settings, the Redis URL with its password among them, never reach a handler, in either
//! mode; the variables the daemon sets for handlers and the stream's `env` do.

mod common;

use std::collections::HashMap;

use common::*;

const PASSWORD: &str = "Pa55-handler-env-9Xq";

/// `env -0` output as a map.
fn parse_env(raw: &[u8]) -> HashMap<String, String> {
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// The daemon's settings that must not reach a handler.
const DAEMON_SETTINGS: [&str; 5] = [
    "REDIS_STREAMD_REDIS_URL",
    "REDIS_STREAMD_CONFIG",
    "REDIS_STREAMD_LOG_LEVEL",
    "REDIS_STREAMD_LOG_FORMAT",
    "REDIS_STREAMD_SOME_FUTURE_SETTING",
];

fn assert_no_daemon_settings(mode: &str, env: &HashMap<String, String>) {
    for name in DAEMON_SETTINGS {
        let ours: Vec<&String> = env
            .keys()
            .filter(|k| k.starts_with("REDIS_STREAMD_"))
            .collect();
        assert!(
            !env.contains_key(name),
            "{mode}: {name} reached the handler: {ours:?}"
        );
    }
    for (name, value) in env {
        if name != "APP_REDIS_URL" {
            assert!(
                !value.contains(PASSWORD),
                "{mode}: the password reached the handler in {name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_settings_and_redis_password_do_not_reach_handlers() {
    let redis = RedisServer::start_with_args(&["--requirepass", PASSWORD]);
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port());
    let work = workdir();
    let exec_script = write_script(
        work.path(),
        "exec.sh",
        "cat > /dev/null\n/usr/bin/env -0 > \"$D/exec.env.tmp\"\nmv \"$D/exec.env.tmp\" \"$D/exec.env\"",
    );
    let worker_script = write_script(
        work.path(),
        "worker.sh",
        "/usr/bin/env -0 > \"$D/worker.env.tmp\"\nmv \"$D/worker.env.tmp\" \"$D/worker.env\"\n\
         while IFS=' ' read -r id attempt len; do\n\
         dd bs=1 count=$((len + 1)) >/dev/null 2>&1\n\
         echo ok\n\
         done",
    );
    // A handler that needs Redis gets a URL through the stream's `env`.
    let common = format!(
        "start_id = \"0\"\nblock = \"200ms\"\nenv = {{ APP_REDIS_URL = {} }}\n",
        toml_str(&url)
    );
    let streams = stream_table("e", "g", &exec_script, &common)
        + &stream_table(
            "w",
            "g",
            &worker_script,
            &format!("{common}mode = \"worker\"\nmax_block_read = 1\n"),
        );
    // The file's URL has no password and no server: the environment's URL wins.
    let cfg = config("redis://127.0.0.1:1/0", &streams);

    let c = TestClient::connect(&url).await;
    let exec_id = c.xadd("e", &[("payload", b"x")]).await;
    let worker_id = c.xadd("w", &[("payload", b"y")]).await;
    let mut d = Daemon::start_with(
        &cfg,
        &["--log-level", "debug"],
        &[
            ("REDIS_STREAMD_REDIS_URL", &url),
            ("REDIS_STREAMD_CONSUMER", "env-consumer"),
            // --config on the command line wins over it.
            ("REDIS_STREAMD_CONFIG", "/nonexistent/redis-streamd.toml"),
            ("REDIS_STREAMD_LOG_LEVEL", "debug"),
            ("REDIS_STREAMD_LOG_FORMAT", "text"),
            ("REDIS_STREAMD_SOME_FUTURE_SETTING", "x"),
        ],
    );
    let (cr, dir) = (&c, work.path());
    let (er, wr) = (exec_id.as_str(), worker_id.as_str());
    d.wait_until(LONG, "both entries handled and acked", || async move {
        dir.join("exec.env").exists()
            && dir.join("worker.env").exists()
            && cr.all_acked_through("e", "g", er).await
            && cr.all_acked_through("w", "g", wr).await
    })
    .await;
    d.terminate(MEDIUM);

    let exec = parse_env(&read_or_empty(&work.path().join("exec.env")));
    assert_no_daemon_settings("exec", &exec);
    let get = |k: &str| exec.get(k).map(String::as_str);
    assert_eq!(get("REDIS_STREAMD_STREAM"), Some("e"));
    assert_eq!(get("REDIS_STREAMD_GROUP"), Some("g"));
    assert_eq!(get("REDIS_STREAMD_CONSUMER"), Some("env-consumer"));
    assert_eq!(get("REDIS_STREAMD_ID"), Some(exec_id.as_str()));
    assert_eq!(get("REDIS_STREAMD_ATTEMPT"), Some("1"));
    assert_eq!(get("APP_REDIS_URL"), Some(url.as_str()));
    assert!(get("PATH").is_some(), "{exec:?}");

    let worker = parse_env(&read_or_empty(&work.path().join("worker.env")));
    assert_no_daemon_settings("worker", &worker);
    let get = |k: &str| worker.get(k).map(String::as_str);
    assert_eq!(get("REDIS_STREAMD_STREAM"), Some("w"));
    assert_eq!(get("REDIS_STREAMD_GROUP"), Some("g"));
    assert_eq!(get("REDIS_STREAMD_CONSUMER"), Some("env-consumer"));
    assert_eq!(get("REDIS_STREAMD_WORKER"), Some("0"));
    assert_eq!(get("REDIS_STREAMD_PROTOCOL"), Some("1"));
    assert_eq!(get("REDIS_STREAMD_ID"), None);
    assert_eq!(get("APP_REDIS_URL"), Some(url.as_str()));
}
