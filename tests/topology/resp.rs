//! A tiny synchronous RESP2 client for administering test topologies: `CLUSTER ...`,
//! `SENTINEL ...`, `ROLE`, `INFO`, `WAIT`, `MIGRATE`, sent to one exact node.
//!
//! The async [`crate::common::TestClient`] (fred) routes commands by key and follows
//! redirections and failovers, which is what a test wants for its data, but not for "ask
//! this very node". Every call here opens a fresh connection with short timeouts, so a
//! frozen (`kill -STOP`) or dead node gives an `Err`, never a hang.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// Status or bulk string as text (lossy), else None.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Elements of an array reply (empty for anything else).
    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(Some(v)) => v,
            _ => &[],
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }
}

/// Sends one command to 127.0.0.1:`port` on a new connection. `Err` on any I/O problem
/// (refused, timed out after `timeout`); a Redis error reply is `Ok(Reply::Error(..))`.
pub fn call_timeout(port: u16, args: &[&str], timeout: Duration) -> Result<Reply, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    (&stream)
        .write_all(&req)
        .map_err(|e| format!("{addr}: write: {e}"))?;
    let mut reader = BufReader::new(&stream);
    read_reply(&mut reader).map_err(|e| format!("{addr} {args:?}: {e}"))
}

/// [`call_timeout`] with a 5 s timeout.
pub fn call(port: u16, args: &[&str]) -> Result<Reply, String> {
    call_timeout(port, args, Duration::from_secs(5))
}

/// [`call`] that must succeed with a non-error reply; panics with the reason otherwise.
pub fn must(port: u16, args: &[&str]) -> Reply {
    match call(port, args) {
        Ok(Reply::Error(e)) => panic!("{args:?} on port {port}: {e}"),
        Ok(r) => r,
        Err(e) => panic!("{args:?} on port {port}: {e}"),
    }
}

/// `INFO section` as (key, value) pairs.
pub fn info(port: u16, section: &str) -> Result<Vec<(String, String)>, String> {
    let r = call(port, &["INFO", section])?;
    let text = r.text().ok_or_else(|| format!("INFO {section}: {r:?}"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// One field of `INFO section`.
pub fn info_field(port: u16, section: &str, key: &str) -> Option<String> {
    info(port, section)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn read_line(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
    if !line.ends_with(b"\r\n") {
        return Err("connection closed mid-reply".into());
    }
    line.truncate(line.len() - 2);
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn read_reply(r: &mut impl BufRead) -> Result<Reply, String> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(1.min(line.len()));
    let num = || {
        rest.parse::<i64>()
            .map_err(|e| format!("bad length {rest:?}: {e}"))
    };
    match kind {
        "+" => Ok(Reply::Status(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => Ok(Reply::Int(num()?)),
        "$" => {
            let n = num()?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(n as usize);
            Ok(Reply::Bulk(Some(buf)))
        }
        "*" => {
            let n = num()?;
            if n < 0 {
                return Ok(Reply::Array(None));
            }
            let items = (0..n).map(|_| read_reply(r)).collect::<Result<_, _>>()?;
            Ok(Reply::Array(Some(items)))
        }
        _ => Err(format!("unexpected reply line {line:?}")),
    }
}
