//! A trivial redis-streamd worker (`mode = "worker"`, protocol 1) for the worker-mode
//! throughput scenario: for each request `<id> <attempt> <length>\n<payload>\n` on stdin it
//! replies `ok\n` on stdout, at once. Exits 0 at end of file on stdin.

use std::io::{BufRead, BufReader, Read, Write};

fn main() {
    if let Err(e) = serve() {
        eprintln!("ok-worker: {e}");
        std::process::exit(1);
    }
}

fn serve() -> std::io::Result<()> {
    let mut input = BufReader::with_capacity(64 * 1024, std::io::stdin().lock());
    let mut output = std::io::stdout().lock();
    let mut header = Vec::with_capacity(128);
    let mut payload = Vec::new();
    loop {
        header.clear();
        if input.read_until(b'\n', &mut header)? == 0 {
            return Ok(());
        }
        let len: usize = std::str::from_utf8(&header)
            .ok()
            .and_then(|h| h.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad header {header:?}")))?;
        payload.resize(len + 1, 0); // the payload and its newline
        input.read_exact(&mut payload)?;
        // One write per reply; stdout is line-buffered, so the newline flushes it.
        output.write_all(b"ok\n")?;
        output.flush()?;
    }
}
