//! The operator commands (issue #13) against real redis-servers, run as the real binary:
//! `status` with no daemon, a running one and a kill -9'd one; `dlq ls|show|stats` with
//! every filter; `dlq replay` (byte-exact, loop guard, 10,000 entries paced, interrupted
//! by SIGINT and resumed, entries the real daemon dead-lettered); `dlq purge` with and
//! without `--yes`; the exit codes.

mod admin_support;
mod common;

use std::collections::HashSet;
use std::fs;
use std::time::Duration;

use admin_support::*;
use common::*;
use nix::sys::signal::Signal;

const HOUR: u64 = 3_600_000;
const MINUTE: u64 = 60_000;

/// Kills the process groups of the given pids' children (handlers) when dropped.
struct KillGroups(Vec<i32>);

impl Drop for KillGroups {
    fn drop(&mut self) {
        for pgid in &self.0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(*pgid), Signal::SIGKILL);
        }
    }
}

fn ids(out: &CliOutput) -> Vec<String> {
    ids_of(&json_lines(out))
}

fn owned(ids: &[&String]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_show_stats_and_every_filter() {
    let s = Setup::new(&[("orders", "g", ""), ("payments", "g", "")]).await;
    let e1 = s
        .add_dead(
            "orders:dlq",
            &dead("orders", 1, "exit code 3", 3 * HOUR).with_field("tenant", b"acme"),
        )
        .await;
    let e2 = s
        .add_dead(
            "orders:dlq",
            &dead("orders", 2, "exit code 4", 2 * HOUR).with_field("tenant", b"globex"),
        )
        .await;
    let e3 = s
        .add_dead(
            "orders:dlq",
            &dead("orders", 3, "killed by signal 9", 30 * MINUTE).with_field("tenant", b"acme"),
        )
        .await;
    let mut d4 = dead("orders", 4, "timeout after 30s", MINUTE);
    d4.source_id = "1700000000000-77".into();
    let e4 = s.add_dead("orders:dlq", &d4).await;
    let e5 = s
        .add_dead(
            "payments:dlq",
            &dead("payments", 5, "exit code 3", 5 * HOUR),
        )
        .await;

    // Human listing: header, one line per entry, a count; 80 columns at most.
    let out = s.run(&["dlq", "ls"]);
    assert_code(&out, 0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("REASON"),
        "{out}"
    );
    for (line, id) in lines[1..6].iter().zip([&e1, &e2, &e3, &e4, &e5]) {
        assert!(line.starts_with(id.as_str()), "{line:?} should list {id}");
    }
    assert!(
        lines[1].contains("exit code 3") && lines[1].contains("Traceback"),
        "{out}"
    );
    assert_eq!(lines[6], "5 entries");
    assert!(out.stdout.lines().all(|l| l.chars().count() <= 80), "{out}");
    let wide = run_cli(
        &["dlq", "ls", "--config", s.config.to_str().expect("path")],
        &[("COLUMNS", "200")],
        MEDIUM,
    );
    assert!(wide.stdout.contains("orders 1700000000000-1"), "{wide}");

    // JSON: every field.
    let out = s.run(&["dlq", "ls", "--json"]);
    let all = json_lines(&out);
    assert_eq!(ids_of(&all), owned(&[&e1, &e2, &e3, &e4, &e5]));
    let first = &all[0];
    assert_eq!(first["dlq"], "orders:dlq");
    assert_eq!(first["source_stream"], "orders");
    assert_eq!(first["source_id"], "1700000000000-1");
    assert_eq!(first["reason"], "exit code 3");
    assert_eq!(first["exit_code"], 3);
    assert_eq!(first["attempts"], 3);
    assert_eq!(first["group"], "g");
    assert_eq!(first["replays"], 0);
    assert!(
        first["stderr"]
            .as_str()
            .expect("stderr")
            .contains("ValueError: bad entry 1")
    );
    assert_eq!(first["fields"][0]["name"], "payload");
    assert_eq!(first["fields"][0]["value"], "{\"n\":1}");
    assert_eq!(first["fields"][2]["value"], "acme");
    assert!(first["failed_at"].as_str().expect("time").ends_with('Z'));

    // Every filter, alone and combined.
    let since_150m = humantime::format_rfc3339(
        std::time::UNIX_EPOCH + Duration::from_millis(now_ms() - 150 * MINUTE),
    )
    .to_string();
    let cases: Vec<(Vec<&str>, Vec<&String>)> = vec![
        (vec!["--stream", "orders"], vec![&e1, &e2, &e3, &e4]),
        (vec!["--stream", "payments"], vec![&e5]),
        (vec!["--reason", "exit code"], vec![&e1, &e2, &e5]),
        (vec!["--reason", "signal"], vec![&e3]),
        (vec!["--exit-code", "3"], vec![&e1, &e5]),
        (vec!["--exit-code", "4"], vec![&e2]),
        (vec!["--since", "1h"], vec![&e3, &e4]),
        (vec!["--before", "1h"], vec![&e1, &e2, &e5]),
        (vec!["--since", &since_150m, "--before", "1h"], vec![&e2]),
        (vec!["--source-id", "1700000000000-77"], vec![&e4]),
        (vec!["--field", "tenant=acme"], vec![&e1, &e3]),
        (
            vec!["--field", "tenant=acme", "--exit-code", "3"],
            vec![&e1],
        ),
        (vec!["--field", "n=5", "--stream", "payments"], vec![&e5]),
        (vec!["--limit", "2"], vec![&e1, &e2]),
    ];
    for (filter, expected) in cases {
        let mut args = vec!["dlq", "ls", "--json"];
        args.extend(&filter);
        let out = s.run(&args);
        assert_code(&out, 0);
        assert_eq!(ids(&out), owned(&expected), "filter {filter:?}");
    }
    let none = s.run(&["dlq", "ls", "--reason", "no such reason"]);
    assert_code(&none, 1);
    assert!(none.stdout.contains("0 entries"), "{none}");

    // show: everything about one entry.
    let out = s.run(&["dlq", "show", &e1]);
    assert_code(&out, 0);
    for needle in [
        "orders 1700000000000-1",
        "exit code 3",
        "tenant",
        "acme",
        "dlq_group",
        "Traceback (most recent call last):",
        "  ValueError: bad entry 1",
    ] {
        assert!(out.stdout.contains(needle), "{needle:?} missing\n{out}");
    }
    // Ids are per stream: two DLQs may hold the same one; --stream picks.
    let out = s.run(&["dlq", "show", &e5, "--json", "--stream", "payments"]);
    let shown = json_lines(&out);
    assert_eq!(
        (shown[0]["id"].as_str(), shown[0]["dlq"].as_str()),
        (Some(e5.as_str()), Some("payments:dlq"))
    );
    let out = s.run(&["dlq", "show", "1-1"]);
    assert_code(&out, 1);
    assert!(
        out.stderr
            .contains("no entry 1-1 in orders:dlq, payments:dlq"),
        "{out}"
    );
    assert_code(&s.run(&["dlq", "show", "not-an-id"]), 2);

    // stats by each key.
    let out = s.run(&["dlq", "stats"]);
    assert_code(&out, 0);
    let top = out.stdout.lines().nth(1).expect("first row");
    assert!(
        top.trim_start().starts_with('2') && top.ends_with("exit code 3"),
        "{out}"
    );
    assert!(out.stdout.contains("5 entries in all"), "{out}");
    let counts = |by: &str| -> Vec<(String, u64)> {
        let out = s.run(&["dlq", "stats", "--by", by, "--json"]);
        assert_code(&out, 0);
        json_lines(&out)
            .iter()
            .map(|l| {
                (
                    l["key"].as_str().expect("key").to_owned(),
                    l["count"].as_u64().expect("count"),
                )
            })
            .collect()
    };
    assert_eq!(
        counts("exit"),
        [
            ("-".to_string(), 2),
            ("3".to_string(), 2),
            ("4".to_string(), 1)
        ]
    );
    assert_eq!(
        counts("stream"),
        [("orders".to_string(), 4), ("payments".to_string(), 1)]
    );
    assert_eq!(counts("hour").iter().map(|(_, n)| n).sum::<u64>(), 5);
    assert_eq!(counts("reason").len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_config_and_unreachable_exit_codes() {
    let s = Setup::new(&[("orders", "g", "")]).await;
    let unknown = s.run(&["dlq", "ls", "--stream", "nope"]);
    assert_code(&unknown, 2);
    assert!(unknown.stderr.contains("no stream \"nope\""), "{unknown}");
    assert_code(&s.run(&["status", "--stream", "nope"]), 2);
    let bare = s.run(&["dlq", "replay"]);
    assert_code(&bare, 2);
    assert!(bare.stderr.contains("by ID"), "{bare}");
    assert_code(&s.run(&["dlq", "purge", "1-0", "--all"]), 2);
    assert_code(&s.run(&["dlq", "ls", "--since", "someday"]), 2);
    assert_code(&s.run(&["dlq", "replay", "--all", "--rate", "fast"]), 2);
    // Nothing matched, for scripts.
    let nothing = s.run(&["dlq", "replay", "--all", "--yes"]);
    assert_code(&nothing, 1);
    assert!(nothing.stdout.contains("nothing to replay"), "{nothing}");
    assert_code(&s.run(&["dlq", "purge", "--all", "--yes"]), 1);

    // A broken config: 78, before any Redis.
    let bad = s.work.path().join("bad.toml");
    fs::write(&bad, "[redis]\nurl = 5\n").expect("write");
    let out = run_cli(
        &["status", "--config", bad.to_str().expect("path")],
        &[],
        MEDIUM,
    );
    assert_code(&out, 78);
    assert!(out.stderr.contains("config error"), "{out}");

    // Redis unreachable: 69 once connect_timeout passes.
    let script = s.work.path().join("ok.sh");
    let port = free_port();
    let gone = s.work.path().join("gone.toml");
    let text = format!(
        "[redis]\nurl = \"redis://127.0.0.1:{port}/0\"\nconnect_timeout = \"1s\"\n\n{}",
        stream_table("orders", "g", &script, "")
    );
    fs::write(&gone, text).expect("write");
    for cmd in [vec!["status"], vec!["dlq", "ls"]] {
        let mut args = cmd.clone();
        args.extend(["--config", gone.to_str().expect("path")]);
        let out = run_cli(&args, &[], MEDIUM);
        assert_code(&out, 69);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_entries_round_trip_byte_for_byte_and_print_escaped() {
    let s = Setup::new(&[("bin", "g", "")]).await;
    let payload = all_byte_values(2);
    let original: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"payload".to_vec(), payload.clone()),
        (vec![0xff, 0x00, b'k'], b"\x1b[31mred\x07\r\n".to_vec()),
        (b"dup".to_vec(), b"one".to_vec()),
        (b"dup".to_vec(), b"two".to_vec()),
        (b"empty".to_vec(), Vec::new()),
    ];
    let mut d = dead("bin", 1, "exit code 1", MINUTE);
    d.fields = original.clone();
    d.stderr = b"\x1b]0;pwned\x07 \xff\xfe broken\n".to_vec();
    let id = s.add_dead("bin:dlq", &d).await;

    let no_controls = |text: &str| text.chars().all(|c| c == '\n' || !c.is_control());
    let ls = s.run(&["dlq", "ls"]);
    assert_code(&ls, 0);
    assert!(no_controls(&ls.stdout), "{ls}");
    let show = s.run(&["dlq", "show", &id]);
    assert_code(&show, 0);
    assert!(no_controls(&show.stdout), "{show}");
    assert!(
        show.stdout.contains("\\xff\\x00k  \\e[31mred\\x07\\r\\n"),
        "{show}"
    );
    assert!(
        show.stdout.contains("\\e]0;pwned\\x07 \\xff\\xfe broken"),
        "{show}"
    );
    assert!(show.stdout.contains("\\x00\\x01\\x02"), "{show}");
    let json = json_lines(&s.run(&["dlq", "ls", "--json"]));
    let fields = &json[0]["fields"];
    assert!(fields[0]["value_base64"].is_string(), "{json:?}");
    assert!(fields[1]["name_base64"].is_string(), "{json:?}");
    assert!(json[0]["stderr_base64"].is_string(), "{json:?}");

    let out = s.run(&["dlq", "replay", &id, "--yes"]);
    assert_code(&out, 0);
    assert!(
        out.stdout.contains("replayed 1 entry from bin:dlq"),
        "{out}"
    );
    let back = s.c.xrange_all("bin").await;
    assert_eq!(back.len(), 1);
    let mut expected = original;
    expected.push((b"redis_streamd_replays".to_vec(), b"1".to_vec()));
    expected.push((
        b"redis_streamd_replayed_from".to_vec(),
        format!("bin:dlq/{id}").into_bytes(),
    ));
    assert_eq!(back[0].fields, expected);
    assert_eq!(s.c.xlen("bin:dlq").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_guard_skips_entries_at_max_replays() {
    let s = Setup::new(&[("loop", "g", "")]).await;
    let mut at_limit = dead("loop", 1, "exit code 1", MINUTE);
    at_limit
        .fields
        .insert(1, (b"redis_streamd_replays".to_vec(), b"3".to_vec()));
    let limited = s.add_dead("loop:dlq", &at_limit).await;
    let once = s
        .add_dead(
            "loop:dlq",
            &dead("loop", 2, "exit code 1", MINUTE).with_field("redis_streamd_replays", b"1"),
        )
        .await;
    s.add_dead("loop:dlq", &dead("loop", 3, "exit code 1", MINUTE))
        .await;

    let dry = s.run(&["dlq", "replay", "--all", "--dry-run"]);
    assert_code(&dry, 0);
    assert!(
        dry.stdout
            .contains("would replay 2 entries from loop:dlq; skipping 1 at --max-replays 3"),
        "{dry}"
    );
    assert!(dry.stdout.contains(&once), "{dry}");
    assert_eq!(s.c.xlen("loop:dlq").await, 3, "a dry run changes nothing");

    let out = s.run(&["dlq", "replay", "--all", "--yes", "--rate", "0"]);
    assert_code(&out, 0);
    assert!(out.stdout.contains("replayed 2 entries"), "{out}");
    assert!(
        out.stdout.contains("skipped 1 entry at --max-replays 3"),
        "{out}"
    );
    let audit = s.audit("loop:dlq").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].get_str("action").as_deref(), Some("replay"));
    assert_eq!(audit[0].get_str("count").as_deref(), Some("2"));
    assert_eq!(audit[0].get_str("skipped").as_deref(), Some("1"));
    assert_eq!(audit[0].get_str("selection").as_deref(), Some("--all"));
    let back = s.c.xrange_all("loop").await;
    assert_eq!(back.len(), 2);
    // The count is replaced where it was, or added after the original fields.
    assert_eq!(
        back[0].fields[2],
        (b"redis_streamd_replays".to_vec(), b"2".to_vec())
    );
    assert_eq!(
        back[1].fields[2],
        (b"redis_streamd_replays".to_vec(), b"1".to_vec())
    );
    let left = s.c.xrange_all("loop:dlq").await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, limited);

    let again = s.run(&["dlq", "replay", "--all", "--yes"]);
    assert_code(&again, 1);
    assert!(
        again
            .stdout
            .contains("nothing to replay; skipping 1 at --max-replays 3"),
        "{again}"
    );
    let more = s.run(&["dlq", "replay", &limited, "--yes", "--max-replays", "4"]);
    assert_code(&more, 0);
    let back = s.c.xrange_all("loop").await;
    assert_eq!(back.len(), 3);
    assert_eq!(
        back[2].fields[1],
        (b"redis_streamd_replays".to_vec(), b"4".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_yes_or_a_terminal_and_is_audited() {
    let s = Setup::new(&[("p", "g", "")]).await;
    let a = s
        .add_dead("p:dlq", &dead("p", 1, "exit code 1", MINUTE))
        .await;
    let b = s
        .add_dead("p:dlq", &dead("p", 2, "exit code 2", MINUTE))
        .await;
    let c = s
        .add_dead("p:dlq", &dead("p", 3, "exit code 2", MINUTE))
        .await;

    let refused = s.run(&["dlq", "purge", "--all"]);
    assert_code(&refused, 2);
    assert!(
        refused.stderr.contains("--yes") && refused.stderr.contains("3 entries"),
        "{refused}"
    );
    let dry = s.run(&["dlq", "purge", "--exit-code", "2", "--dry-run"]);
    assert_code(&dry, 0);
    assert!(
        dry.stdout.contains("would purge 2 entries from p:dlq"),
        "{dry}"
    );
    assert_eq!(s.c.xlen("p:dlq").await, 3);
    assert!(s.audit("p:dlq").await.is_empty());

    let out = s.run(&["dlq", "purge", &a, "--yes"]);
    assert_code(&out, 0);
    assert!(out.stdout.contains("purged 1 entry from p:dlq"), "{out}");
    assert!(
        out.stderr.contains("audit") && out.stderr.contains(&a),
        "the audit line is logged\n{out}"
    );
    let audit = s.audit("p:dlq").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].get_str("action").as_deref(), Some("purge"));
    assert_eq!(audit[0].get_str("count").as_deref(), Some("1"));
    assert_eq!(audit[0].get_str("ids"), Some(a.clone()));
    assert_eq!(audit[0].get_str("selection"), Some(a.clone()));
    assert!(!audit[0].get_str("user").unwrap_or_default().is_empty());
    assert!(!audit[0].get_str("host").unwrap_or_default().is_empty());
    assert!(audit[0].get_str("at").unwrap_or_default().ends_with('Z'));

    // On a terminal it asks; "n" keeps the entries, "y" deletes them.
    if which("script") {
        let cmd = format!(
            "{} dlq purge --exit-code 2 --config {}",
            DAEMON_BIN,
            s.config.display()
        );
        for (answer, code, left) in [("n", 1, 2), ("y", 0, 0)] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "printf '{answer}\\n' | script -qec '{cmd}' /dev/null"
                ))
                .env("NO_COLOR", "1")
                .output()
                .expect("script");
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(code), "{text}");
            assert!(
                text.contains("Delete 2 entries from p:dlq for good? [y/N]"),
                "{text}"
            );
            assert_eq!(s.c.xlen("p:dlq").await, left);
        }
        assert_eq!(s.audit("p:dlq").await.len(), 2);
        let last = s.audit("p:dlq").await.pop().expect("audit");
        assert_eq!(last.get_str("ids"), Some(format!("{b} {c}")));
        assert_eq!(last.get_str("selection").as_deref(), Some("--exit-code 2"));
    } else {
        eprintln!("`script` (util-linux) missing: skipping the terminal confirmation check");
        let out = s.run(&["dlq", "purge", "--all", "--yes"]);
        assert_code(&out, 0);
    }
    assert_eq!(s.c.xlen("p:dlq").await, 0);
}

fn which(program: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_10000_is_paced_stops_on_sigint_and_resumes_exactly_once() {
    const N: u64 = 10_000;
    const RATE: u64 = 2_000;
    let s = Setup::new(&[("big", "g", "")]).await;
    let mut dlq_ids = Vec::with_capacity(N as usize);
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let entries: Vec<Dead> = chunk
            .iter()
            .map(|n| dead("big", *n, "exit code 1", MINUTE))
            .collect();
        let adds = entries.iter().map(|d| s.add_dead("big:dlq", d));
        dlq_ids.extend(futures::future::join_all(adds).await);
    }
    assert_eq!(s.c.xlen("big:dlq").await, N);

    let rate = format!("{RATE}/s");
    let args = ["dlq", "replay", "--all", "--yes", "--rate", rate.as_str()];
    let mut first = s.spawn(&args);
    let c = &s.c;
    wait_until(
        LONG,
        "a fifth of the entries replayed",
        None,
        || async move { c.xlen("big").await >= N / 5 },
    )
    .await;
    first.signal(Signal::SIGINT);
    let (code, _) = first.wait(MEDIUM);
    assert_eq!(
        code,
        Some(130),
        "stdout:\n{}\nstderr:\n{}",
        first.stdout(),
        first.stderr()
    );
    assert!(
        first.stdout().contains("interrupted: replayed"),
        "{}",
        first.stdout()
    );
    let moved = s.c.xlen("big").await;
    assert!(moved < N, "SIGINT came after the end: pick a lower rate");
    assert_eq!(
        moved + s.c.xlen("big:dlq").await,
        N,
        "nothing lost, nothing doubled"
    );

    let mut second = s.spawn(&args);
    let (code, took) = second.wait(LONG);
    assert_eq!(
        code,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        second.stdout(),
        second.stderr()
    );
    // Paced: never faster than the rate (a lower bound only).
    let min = Duration::from_secs_f64((N - moved - 1) as f64 / RATE as f64);
    assert!(took >= min, "{} entries in {took:?} at {rate}", N - moved);

    // Every entry back exactly once, in the DLQ's order, and the DLQ empty.
    let back = s.c.xrange_all("big").await;
    let ns: Vec<u64> = back
        .iter()
        .map(|e| e.get_str("n").and_then(|n| n.parse().ok()).expect("n"))
        .collect();
    assert_eq!(ns, (0..N).collect::<Vec<_>>());
    assert_eq!(s.c.xlen("big:dlq").await, 0);

    // Two audit entries whose ids are every DLQ id once.
    let audit = s.audit("big:dlq").await;
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0].get_str("interrupted").as_deref(), Some("true"));
    assert_eq!(audit[1].get_str("interrupted").as_deref(), Some("false"));
    let mut seen = HashSet::new();
    for a in &audit {
        for id in a.get_str("ids").unwrap_or_default().split_whitespace() {
            assert!(seen.insert(id.to_owned()), "{id} audited twice");
        }
    }
    assert_eq!(seen, dlq_ids.into_iter().collect::<HashSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_what_the_daemon_dead_lettered_until_it_succeeds() {
    let redis = RedisServer::start();
    let work = workdir();
    fs::create_dir(work.path().join("out")).expect("out dir");
    let script = write_script(
        work.path(),
        "flaky.sh",
        &format!(
            "if [ -e \"$D/fixed\" ]; then {SAVE_STDIN}; else cat > /dev/null; echo 'not yet' >&2; exit 3; fi"
        ),
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "work",
            "g",
            &script,
            "payload = \"entry\"\nmax_attempts = 1\nblock = \"200ms\"\nstart_id = \"0\"",
        ),
    );
    let daemon = Daemon::start(&cfg);
    let c = TestClient::connect(&redis.url()).await;
    let s = Setup {
        redis,
        config: daemon.config_path.clone(),
        work,
        c,
    };
    for n in 0..3u8 {
        // payload = "entry" needs UTF-8 fields (binary ones go straight to the DLQ).
        s.c.xadd(
            "work",
            &[
                ("payload", &[b'p', b'0' + n]),
                ("tenant", "ächt".as_bytes()),
            ],
        )
        .await;
    }
    let c = &s.c;
    daemon
        .wait_until(LONG, "3 entries dead-lettered", || async move {
            c.xlen("work:dlq").await == 3
        })
        .await;
    let listed = json_lines(&s.run(&["dlq", "ls", "--json"]));
    assert_eq!(listed.len(), 3);
    assert!(
        listed
            .iter()
            .all(|e| e["reason"] == "exit code 3" && e["stderr"] == "not yet\n"),
        "{listed:?}"
    );

    // Still failing: they come back with the replay count the daemon copied.
    assert_code(
        &s.run(&["dlq", "replay", "--all", "--yes", "--rate", "0"]),
        0,
    );
    daemon
        .wait_until(
            LONG,
            "the 3 replayed entries dead-lettered again",
            || async move { c.xlen("work:dlq").await == 3 && c.xlen("work").await == 6 },
        )
        .await;
    let listed = json_lines(&s.run(&["dlq", "ls", "--json"]));
    assert!(listed.iter().all(|e| e["replays"] == 1), "{listed:?}");
    let guarded = s.run(&["dlq", "replay", "--all", "--yes", "--max-replays", "1"]);
    assert_code(&guarded, 1);
    assert!(
        guarded.stdout.contains("skipping 3 at --max-replays 1"),
        "{guarded}"
    );

    // Fixed: the replayed entries succeed; the handler saw the count (payload = "entry").
    fs::write(s.work.path().join("fixed"), "").expect("fix");
    assert_code(
        &s.run(&["dlq", "replay", "--all", "--yes", "--rate", "0"]),
        0,
    );
    let out_dir = s.work.path().join("out");
    let dir = &out_dir;
    daemon
        .wait_until(LONG, "3 replayed entries handled", || async move {
            count_files(dir, ".in") == 3
        })
        .await;
    assert_eq!(s.c.xlen("work:dlq").await, 0);
    let mut payloads = Vec::new();
    for file in fs::read_dir(&out_dir).expect("out").flatten() {
        let doc: serde_json::Value =
            serde_json::from_slice(&fs::read(file.path()).expect("read")).expect("json");
        assert_eq!(doc["fields"]["redis_streamd_replays"], "2", "{doc}");
        payloads.push(
            doc["fields"]["payload"]
                .as_str()
                .expect("payload")
                .to_owned(),
        );
    }
    payloads.sort();
    assert_eq!(payloads, ["p0", "p1", "p2"]);
    let last = s.c.xrange_all("work").await.pop().expect("entries").id;
    daemon.wait_settled(&s.c, "work", "g", &last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_with_no_daemon_a_running_one_and_a_killed_one() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "hold.sh",
        &format!("cat > /dev/null\n{}", sh_wait_for_file("release")),
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "jobs",
            "g",
            &script,
            "claim_idle = \"6s\"\nblock = \"500ms\"",
        ),
    );
    let config_path = work.path().join("streamd.toml");
    fs::write(&config_path, &cfg).expect("config");
    let c = TestClient::connect(&redis.url()).await;
    let s = Setup {
        redis,
        work,
        config: config_path,
        c,
    };
    let _release = ReleaseOnDrop(s.work.path().join("release"));
    let status = |s: &Setup| -> serde_json::Value {
        let out = s.run(&["status", "--json"]);
        assert_code(&out, 0);
        let mut lines = json_lines(&out);
        assert_eq!(lines.len(), 1, "{out}");
        lines.remove(0)
    };

    // No daemon has ever run: nothing in Redis.
    let none = status(&s);
    assert_eq!(none["group_exists"], false);
    assert_eq!(none["length"], 0);
    let human = s.run(&["status"]);
    assert!(human.stdout.contains("g (none)"), "{human}");

    // A running daemon with two entries in hand.
    let mut daemon = Daemon::start(&cfg);
    daemon.wait_group(&s.c, "jobs", "g").await;
    s.c.xadd("jobs", &[("payload", b"1")]).await;
    s.c.xadd("jobs", &[("payload", b"2")]).await;
    s.add_dead("jobs:dlq", &dead("jobs", 9, "exit code 1", MINUTE))
        .await;
    let c = &s.c;
    daemon
        .wait_until(LONG, "2 entries pending", || async move {
            c.pending_count("jobs", "g").await == 2
        })
        .await;
    let running = status(&s);
    assert_eq!(running["group_exists"], true);
    assert_eq!(running["length"], 2);
    assert_eq!(running["pending"], 2);
    assert_eq!(running["lag"], 0);
    assert!(running["oldest_pending_age_ms"].is_u64(), "{running}");
    assert_eq!(running["dlq_length"], 1);
    assert!(
        running["dlq_newest_age_ms"]
            .as_u64()
            .is_some_and(|a| a >= MINUTE),
        "{running}"
    );
    let consumer = &running["consumers"][0];
    assert_eq!(consumer["name"], CONSUMER);
    assert_eq!(consumer["pending"], 2);
    assert_eq!(consumer["dead"], false, "{running}");
    let human = s.run(&["status"]);
    assert!(
        human.stdout.contains(CONSUMER) && !human.stdout.contains("dead"),
        "{human}"
    );

    // kill -9: its consumer keeps the entries and goes quiet: dead after claim_idle.
    let _handlers = KillGroups(
        children_of(daemon.pid())
            .into_iter()
            .map(|(_, g)| g)
            .collect(),
    );
    daemon.kill9();
    let s_ref = &s;
    wait_until(
        LONG,
        "the killed daemon's consumer shown dead",
        None,
        || async move {
            let st = status(s_ref);
            st["consumers"][0]["dead"] == true && st["consumers"][0]["pending"] == 2
        },
    )
    .await;
    let human = s.run(&["status"]);
    let line = human
        .stdout
        .lines()
        .find(|l| l.contains(CONSUMER))
        .expect("consumer line");
    assert!(line.ends_with("dead"), "{human}");

    // --watch without a terminal prints snapshots until Ctrl-C, then exits 0.
    let mut watch = s.spawn(&["status", "--watch", "200ms", "--json"]);
    let w = &watch;
    wait_until(LONG, "three snapshots", None, || async move {
        w.stdout().lines().count() >= 3
    })
    .await;
    watch.signal(Signal::SIGINT);
    assert_eq!(watch.wait(MEDIUM).0, Some(0), "{}", watch.stderr());
}

/// Creates the file the holding handlers wait for when dropped.
struct ReleaseOnDrop(std::path::PathBuf);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let _ = fs::write(&self.0, "");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colour_only_on_a_terminal_and_never_with_no_color() {
    let s = Setup::new(&[("c", "g", "")]).await;
    s.add_dead("c:dlq", &dead("c", 1, "exit code 1", MINUTE))
        .await;
    let ls = |terminal: bool, no_color: Option<&str>| -> String {
        let cmd = format!("{DAEMON_BIN} dlq ls --config {}", s.config.display());
        let mut run = if terminal {
            let mut c = std::process::Command::new("script");
            c.args(["-qec", &cmd, "/dev/null"]);
            c
        } else {
            let mut c = std::process::Command::new("sh");
            c.args(["-c", &cmd]);
            c
        };
        run.env_remove("NO_COLOR")
            .stdin(std::process::Stdio::null());
        if let Some(v) = no_color {
            run.env("NO_COLOR", v);
        }
        let out = run.output().expect("run");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plain = ls(false, None);
    assert!(
        plain.contains("exit code 1") && !plain.contains('\u{1b}'),
        "{plain:?}"
    );
    if !which("script") {
        eprintln!("`script` (util-linux) missing: skipping the terminal colour check");
        return;
    }
    let coloured = ls(true, None);
    assert!(coloured.contains("\u{1b}[1mID"), "{coloured:?}");
    for value in ["1", "yes"] {
        let no_color = ls(true, Some(value));
        assert!(
            no_color.contains("exit code 1") && !no_color.contains("\u{1b}["),
            "{no_color:?}"
        );
    }
}
