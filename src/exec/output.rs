//! What handler processes write: reading a pipe to its end, splitting it into lines,
//! logging each line, keeping the tail of stderr, and cutting foreign text safely.
//!
//! Shared by both executors: a per-entry handler's stdout and stderr, and a worker's
//! stderr (a worker's stdout carries protocol replies, see `worker::protocol`). Output is
//! read in chunks and logged line by line; a line longer than [`MAX_LINE_BYTES`] is logged
//! in pieces, and only the last [`STDERR_TAIL_BYTES`] of stderr are kept, so memory stays
//! bounded whatever a handler writes.

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt};

/// At most this many bytes of stderr are kept for `Report::stderr_tail`.
pub(crate) const STDERR_TAIL_BYTES: usize = 4096;

/// Output lines longer than this are logged in pieces of this size.
pub(crate) const MAX_LINE_BYTES: usize = 4096;

/// Size of one read from a handler's stdout or stderr.
const READ_CHUNK_BYTES: usize = 8192;

/// Which pipe of a per-entry handler a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pipe {
    Stdout,
    Stderr,
}

/// Who wrote the output, which decides the fields of its log lines.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Origin<'a> {
    /// A per-entry handler. Its lines are logged inside the attempt's span, which
    /// carries `id` and `attempt`.
    Attempt { stream: &'a str, pipe: Pipe },
    /// A worker's stderr: lines name the worker and the entry it has in hand.
    Worker {
        stream: &'a str,
        index: usize,
        current: &'a Mutex<Option<String>>,
    },
}

/// Reads `pipe` to its end: every chunk goes to `on_chunk` (for the stderr tail), every
/// line is logged as written by `origin`. A read error ends the reading and is returned
/// (after the last partial line was logged).
pub(crate) async fn read_output<R>(
    mut pipe: R,
    origin: Origin<'_>,
    mut on_chunk: impl FnMut(&[u8]),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut lines = LineSplitter::default();
    let mut emit = |line: &[u8]| log_line(origin, line);
    let result = loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => break Err(err),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        on_chunk(chunk);
        lines.push(chunk, &mut emit);
    };
    lines.finish(&mut emit);
    result
}

/// Logs one output line (line end stripped, invalid UTF-8 replaced) at `info`.
fn log_line(origin: Origin<'_>, line: &[u8]) {
    let mut end = line.len();
    while end > 0 && matches!(line.get(end - 1), Some(b'\n' | b'\r')) {
        end -= 1;
    }
    let text = String::from_utf8_lossy(line.get(..end).unwrap_or_default());
    match origin {
        Origin::Attempt {
            stream,
            pipe: Pipe::Stdout,
        } => tracing::info!(stream = %stream, "{text}"),
        Origin::Attempt {
            stream,
            pipe: Pipe::Stderr,
        } => tracing::info!(stream = %stream, output = "stderr", "{text}"),
        Origin::Worker {
            stream,
            index,
            current,
        } => {
            let id = lock(current).clone().unwrap_or_default();
            tracing::info!(%stream, worker = index, %id, output = "stderr", "{text}");
        }
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE_BYTES`] (without the `\n`).
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    line: Vec<u8>,
}

impl LineSplitter {
    pub(crate) fn push(&mut self, mut rest: &[u8], emit: &mut impl FnMut(&[u8])) {
        while !rest.is_empty() {
            if self.line.len() >= MAX_LINE_BYTES {
                // A full piece: a newline right after it belongs to it (no empty line).
                if let Some((b'\n', after)) = rest.split_first() {
                    rest = after;
                }
                emit(&self.line);
                self.line.clear();
                continue;
            }
            let room = MAX_LINE_BYTES - self.line.len();
            let (window, _) = rest.split_at(room.min(rest.len()));
            match window.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    let (text, after) = rest.split_at(nl);
                    self.line.extend_from_slice(text);
                    emit(&self.line);
                    self.line.clear();
                    rest = after.get(1..).unwrap_or_default();
                }
                None => {
                    self.line.extend_from_slice(window);
                    rest = rest.get(window.len()..).unwrap_or_default();
                }
            }
        }
    }

    /// Emits an unterminated last line, if any.
    pub(crate) fn finish(&mut self, emit: &mut impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            emit(&self.line);
            self.line.clear();
        }
    }
}

/// The last [`STDERR_TAIL_BYTES`] bytes written to stderr.
#[derive(Debug, Default)]
pub(crate) struct StderrTail {
    buf: VecDeque<u8>,
}

impl StderrTail {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        let keep = chunk.len().min(STDERR_TAIL_BYTES);
        let chunk = chunk.get(chunk.len() - keep..).unwrap_or_default();
        let overflow = (self.buf.len() + chunk.len()).saturating_sub(STDERR_TAIL_BYTES);
        self.buf.drain(..overflow);
        self.buf.extend(chunk);
    }

    /// The bytes kept, leaving the tail empty.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).into()
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.buf.into()
    }
}

/// `s` cut to at most `max_bytes`, on a character boundary (never inside a multi-byte
/// character, so never a panic): for text that came from outside (replies, output).
pub(crate) fn cut(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Locks `m`, ignoring poisoning: the data is plain state, valid after any panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pseudo_random(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn line_splitter_caps_and_joins() {
        fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let mut emit = |l: &[u8]| out.push(l.to_vec());
            let mut s = LineSplitter::default();
            for c in chunks {
                s.push(c, &mut emit);
                assert!(s.line.len() <= MAX_LINE_BYTES);
            }
            s.finish(&mut emit);
            out
        }
        assert_eq!(
            split(&[b"a\nbc", b"d\n\ne"]),
            vec![b"a".to_vec(), b"bcd".to_vec(), Vec::new(), b"e".to_vec()]
        );
        // Exactly the cap, then a newline: one line, no empty line after it.
        let exact = [vec![b'x'; MAX_LINE_BYTES], b"\nnext\n".to_vec()].concat();
        assert_eq!(
            split(&[&exact]),
            vec![vec![b'x'; MAX_LINE_BYTES], b"next".to_vec()]
        );
        // Same, with the newline arriving in the next chunk.
        let full = vec![b'x'; MAX_LINE_BYTES];
        assert_eq!(split(&[&full, b"\n"]), vec![full.clone()]);
        // Longer than the cap: pieces.
        let long = vec![b'y'; 2 * MAX_LINE_BYTES + 10];
        let pieces = split(&[&long[..5000], &long[5000..], b"\n"]);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[0].len(), MAX_LINE_BYTES);
        assert_eq!(pieces[1].len(), MAX_LINE_BYTES);
        assert_eq!(pieces[2].len(), 10);
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn stderr_tail_keeps_last_bytes() {
        let data = pseudo_random(3 * STDERR_TAIL_BYTES + 123);
        for chunk_size in [1, 100, 4095, 4096, 5000, data.len()] {
            let mut tail = StderrTail::default();
            for c in data.chunks(chunk_size) {
                tail.push(c);
                assert!(tail.buf.len() <= STDERR_TAIL_BYTES);
            }
            assert_eq!(tail.into_vec(), &data[data.len() - STDERR_TAIL_BYTES..]);
        }
        let mut tail = StderrTail::default();
        tail.push(b"short");
        assert_eq!(tail.take(), b"short");
        assert!(tail.take().is_empty());
    }

    #[test]
    fn cut_stays_on_char_boundaries() {
        assert_eq!(cut("hello", 10), "hello");
        assert_eq!(cut("hello", 5), "hello");
        assert_eq!(cut("hello", 3), "hel");
        assert_eq!(cut("", 0), "");
        // "é" is 2 bytes, "€" 3, "🦀" 4: every cut inside one backs off to its start.
        let s = "aé€🦀";
        let cuts: Vec<&str> = (0..=s.len()).map(|n| cut(s, n)).collect();
        assert_eq!(
            cuts,
            [
                "",
                "a",
                "a",
                "aé",
                "aé",
                "aé",
                "aé€",
                "aé€",
                "aé€",
                "aé€",
                "aé€🦀"
            ]
        );
        // Byte 200 inside a multi-byte character (the case that panicked with truncate).
        let long = format!("{}{}", "x".repeat(199), "€".repeat(10));
        assert_eq!(cut(&long, 200), "x".repeat(199));
    }

    #[tokio::test]
    async fn read_output_passes_every_chunk_and_ends_at_eof() {
        let data = pseudo_random(100_000);
        let mut seen = Vec::new();
        let origin = Origin::Attempt {
            stream: "s",
            pipe: Pipe::Stderr,
        };
        read_output(&data[..], origin, |c| seen.extend_from_slice(c))
            .await
            .expect("reading a slice");
        assert_eq!(seen, data);
    }
}
