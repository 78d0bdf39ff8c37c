//! A handler for the latency scenario: appends `$REDIS_STREAMD_ID <CLOCK_REALTIME ns>` to
//! the file named by its first argument, with one O_APPEND write, and exits 0. The clock
//! is read first thing in `main`, so the stamp is the moment the handler's own code starts.
//! It does not read stdin (allowed by the handler contract).

use std::io::Write;

fn main() {
    let ns = bench::now_ns();
    let id = std::env::var("REDIS_STREAMD_ID").unwrap_or_default();
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: stamp FILE");
        std::process::exit(2);
    };
    let line = format!("{id} {ns}\n");
    let written = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("stamp: {e}");
        std::process::exit(1);
    }
}
