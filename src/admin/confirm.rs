//! The confirmation of destructive commands: asked on the terminal (stdin and stderr both
//! terminals), refused without one unless `--yes` was given, so that a script never
//! replays or purges by accident and a human always sees the count first.

use std::io::{BufRead, IsTerminal, Write};

use crate::admin::AdminError;

/// Whether we can ask a human: stdin and stderr are terminals.
pub(crate) fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Returns Ok(true) to go on: `--yes` given, or the operator answered `y`/`yes`.
/// Ok(false) when declined. Without `--yes` and without a terminal: a usage error
/// (exit 2) that says how to go on.
pub(crate) fn confirm(yes: bool, question: &str) -> Result<bool, AdminError> {
    if yes {
        return Ok(true);
    }
    if !interactive() {
        return Err(AdminError::Usage(format!(
            "{question}: refusing without --yes, as there is no terminal to confirm on \
             (see the entries with --dry-run, then add --yes)"
        )));
    }
    let mut err = std::io::stderr().lock();
    write!(err, "{question}? [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(is_yes(&answer))
}

fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_yes_is_yes() {
        assert!(is_yes("y\n") && is_yes(" YES \n") && is_yes("Yes"));
        assert!(!is_yes("") && !is_yes("\n") && !is_yes("no") && !is_yes("yep"));
    }
}
