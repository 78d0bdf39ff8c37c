//! Handler programs: resolving `handler[0]` and checking that it can be executed, the
//! way execvp(3) will look for it at every spawn, so that `--check` catches what would
//! otherwise fail every entry.

use std::path::Path;

/// What execvp(3) searches when `PATH` is unset, so `--check` agrees with the spawn.
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Checks that `program` can be executed and returns what to store as `handler[0]`: a
/// name found in PATH stays as written, a relative path with a '/' becomes absolute,
/// resolved against the config file's directory so that a config does not depend on the
/// daemon's working directory.
pub(super) fn resolve_program(
    program: &str,
    config_dir: &Path,
    path_var: Option<&std::ffi::OsStr>,
) -> Result<String, String> {
    if program.is_empty() {
        return Err("the handler program (first element) must not be empty".to_string());
    }
    if !program.contains('/') {
        return search_path(program, path_var).map(|()| program.to_string());
    }
    if Path::new(program).is_absolute() {
        return check_executable(Path::new(program))
            .map(|()| program.to_string())
            .map_err(|why| format!("handler program {program:?} {why}"));
    }
    let resolved = std::path::absolute(config_dir.join(program)).map_err(|e| {
        format!(
            "cannot resolve handler program {program:?} against the config file's directory: {e}"
        )
    })?;
    check_executable(&resolved).map_err(|why| {
        format!(
            "handler program {program:?} (relative to the config file: {}) {why}",
            resolved.display()
        )
    })?;
    // Lossy conversion would store a different path than the one just checked.
    resolved.into_os_string().into_string().map_err(|p| {
        format!(
            "handler program {program:?} resolves to {}, which is not valid UTF-8",
            Path::new(&p).display()
        )
    })
}

/// Looks `program` up in each directory of PATH, as execvp(3) will.
fn search_path(program: &str, path_var: Option<&std::ffi::OsStr>) -> Result<(), String> {
    let dirs = path_var.unwrap_or(std::ffi::OsStr::new(DEFAULT_PATH));
    let mut unusable = None;
    for dir in std::env::split_paths(dirs) {
        let candidate = dir.join(program);
        match check_executable(&candidate) {
            Ok(()) => return Ok(()),
            // Keep looking like execvp does, but remember why a match was unusable.
            Err(why) if unusable.is_none() && candidate.exists() => {
                unusable = Some(format!(
                    "handler program {program:?} found in PATH as {}, but it {why}",
                    candidate.display()
                ));
            }
            Err(_) => {}
        }
    }
    Err(unusable.unwrap_or_else(|| format!("handler program {program:?} not found in PATH")))
}

/// `Err` holds the end of a sentence: "does not exist", "is not executable", ...
fn check_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("does not exist".to_string());
        }
        Err(e) => return Err(format!("cannot be inspected: {e}")),
    };
    if !meta.is_file() {
        return Err("is not a regular file".to_string());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("is not executable".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    fn executable(dir: &Path, rel: &str, mode: u32) -> PathBuf {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, "#!/bin/sh\n").expect("write handler");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn handler_argv_checks() {
        let h = |argv: &str| MINIMAL.replace(r#"["sh", "-c", "cat"]"#, argv);
        assert_invalid(&h("[]"), 7, "streams[0].handler", "must not be empty");
        assert_invalid(&h(r#"[""]"#), 7, "streams[0].handler", "must not be empty");
        assert_invalid(
            &h(r#"["no-such-handler-xyz"]"#),
            7,
            "streams[0].handler",
            "handler program \"no-such-handler-xyz\" not found in PATH",
        );
        assert_invalid(
            &h(r#"["/nonexistent/handler"]"#),
            7,
            "streams[0].handler",
            "does not exist",
        );
        assert_invalid(
            &h(r#"["sh", "a\u0000b"]"#),
            7,
            "streams[0].handler[1]",
            "NUL",
        );
    }

    #[test]
    fn handler_must_be_an_executable_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = executable(dir.path(), "plain.sh", 0o644);
        let text = MINIMAL.replace(
            r#"["sh", "-c", "cat"]"#,
            &format!("[{:?}]", plain.display().to_string()),
        );
        assert_invalid(&text, 7, "streams[0].handler", "is not executable");
        let text = MINIMAL.replace(
            r#"["sh", "-c", "cat"]"#,
            &format!("[{:?}]", dir.path().display().to_string()),
        );
        assert_invalid(&text, 7, "streams[0].handler", "is not a regular file");
    }

    #[test]
    fn handler_in_path_must_be_executable() {
        let dir = tempfile::tempdir().expect("tempdir");
        executable(dir.path(), "only-plain", 0o644);
        let found = executable(&dir.path().join("bin"), "runner", 0o755);
        let path_var = std::env::join_paths([dir.path().to_path_buf(), dir.path().join("bin")])
            .expect("join PATH");
        let overrides = Overrides {
            path: Some(path_var),
            ..overrides()
        };
        let load = |program: &str| {
            let text = MINIMAL.replace(r#"["sh", "-c", "cat"]"#, &format!("[{program:?}]"));
            Config::load(&write(&dir, &text), &overrides)
        };
        let (line, key, message) = invalid_from(load("only-plain"));
        assert_eq!((line, key.as_str()), (7, "streams[0].handler"));
        assert!(message.contains("is not executable"), "{message}");
        let c = load("runner").expect("valid");
        assert_eq!(c.streams[0].handler, vec!["runner"]);
        assert!(found.exists());
    }

    #[test]
    fn relative_handler_is_resolved_against_the_config_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = executable(dir.path(), "bin/handle.sh", 0o755);
        for written in ["bin/handle.sh", "./bin/handle.sh"] {
            let text = MINIMAL.replace(
                r#"["sh", "-c", "cat"]"#,
                &format!("[{written:?}, \"--flag\"]"),
            );
            let c = Config::load(&write(&dir, &text), &overrides()).expect("valid");
            assert_eq!(
                c.streams[0].handler,
                vec![script.display().to_string(), "--flag".to_string()]
            );
        }
        let text = MINIMAL.replace(r#"["sh", "-c", "cat"]"#, r#"["bin/missing.sh"]"#);
        let (line, key, message) = invalid_from(Config::load(&write(&dir, &text), &overrides()));
        assert_eq!((line, key.as_str()), (7, "streams[0].handler"));
        assert!(message.contains("does not exist"), "{message}");
    }
}
