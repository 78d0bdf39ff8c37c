//! The worker protocol (version 1): how a request is framed on a worker's stdin and how
//! its reply line on stdout is read.
//!
//! ```text
//! <id> <attempt> <payload length in bytes>\n     request header
//! <payload bytes>\n                              request body
//!
//! ok\n                 success: the entry is acked
//! fail <reason>\n      a failed attempt (retried, then dead-lettered)
//! dlq <reason>\n       never retry: straight to the dead-letter stream
//! ```

use crate::exec::output::cut;

/// Longest reply line accepted, newline included.
pub(crate) const MAX_REPLY_BYTES: usize = 64 * 1024;

/// How much of an unexpected reply is quoted in the error, at most (bytes).
const QUOTED_REPLY_BYTES: usize = 80;

/// A reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Ok,
    Fail(String),
    Dlq(String),
}

/// Appends the request frame of one entry to `out`.
pub(crate) fn encode(id: &str, attempt: u64, payload: &[u8], out: &mut Vec<u8>) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = writeln!(out, "{id} {attempt} {}", payload.len());
    out.extend_from_slice(payload);
    out.push(b'\n');
}

/// Parses a reply line (with its newline).
pub(crate) fn parse_reply(line: &[u8]) -> Result<Reply, String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| "reply is not UTF-8".to_owned())?;
    let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
    let reason = |default: &str| {
        let rest = rest.trim();
        if rest.is_empty() {
            default.to_owned()
        } else {
            rest.to_owned()
        }
    };
    match verb {
        "ok" => Ok(Reply::Ok),
        "fail" => Ok(Reply::Fail(reason("worker reported failure"))),
        "dlq" => Ok(Reply::Dlq(reason("worker rejected the entry"))),
        _ => {
            let shown = cut(text, QUOTED_REPLY_BYTES);
            let more = if shown.len() < text.len() { "…" } else { "" };
            Err(format!("unexpected reply {:?}", format!("{shown}{more}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"ok\n"), Ok(Reply::Ok));
        assert_eq!(parse_reply(b"ok\r\n"), Ok(Reply::Ok));
        assert_eq!(
            parse_reply(b"fail disk full\n"),
            Ok(Reply::Fail("disk full".into()))
        );
        assert_eq!(
            parse_reply(b"fail\n"),
            Ok(Reply::Fail("worker reported failure".into()))
        );
        assert_eq!(
            parse_reply(b"dlq bad json\n"),
            Ok(Reply::Dlq("bad json".into()))
        );
        assert!(parse_reply(b"OK\n").is_err());
        assert!(parse_reply(b"\n").is_err());
        assert!(parse_reply(&[0xff, b'\n']).is_err());
    }

    /// An unexpected reply is quoted cut short, never inside a multi-byte character.
    #[test]
    fn unexpected_multibyte_reply_is_cut_on_a_char_boundary() {
        for pad in 0..4 {
            let reply = format!("{}{}\n", "x".repeat(pad), "€".repeat(100));
            let err = parse_reply(reply.as_bytes()).expect_err("not a reply");
            let quoted = err
                .strip_prefix("unexpected reply \"")
                .and_then(|q| q.strip_suffix("…\""))
                .unwrap_or_else(|| panic!("{err}"));
            assert!(quoted.len() <= QUOTED_REPLY_BYTES, "{quoted}");
            assert!(quoted.len() > QUOTED_REPLY_BYTES - 3, "{quoted}");
            assert!(reply.starts_with(quoted));
        }
        let short = parse_reply("nön\n".as_bytes()).expect_err("not a reply");
        assert_eq!(short, "unexpected reply \"nön\"");
    }

    #[test]
    fn frames() {
        let mut out = Vec::new();
        encode("1-0", 2, b"a\nb", &mut out);
        encode("2-0", 1, b"", &mut out);
        assert_eq!(out, b"1-0 2 3\na\nb\n2-0 1 0\n\n");
    }
}
