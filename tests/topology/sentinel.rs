//! A Sentinel deployment on loopback for tests: a primary, one replica and three sentinels
//! (`redis-server --sentinel`, quorum 2, `down-after-milliseconds 1000`,
//! `failover-timeout 3000`), and the failovers the tests provoke.

use std::fs;
use std::path::Path;

use tempfile::TempDir;

use super::cluster::replicas_reached;
use super::resp::{self, Reply};
use super::{FORM, Node, server_args, wait_sync};

/// The service name the sentinels monitor.
pub const SERVICE: &str = "mymaster";
pub const DOWN_AFTER_MS: u64 = 1000;
pub const FAILOVER_TIMEOUT_MS: u64 = 3000;

/// `servers[0]` starts as the primary and `servers[1]` as its replica; roles change with
/// failovers, ask [`SentinelSet::primary`].
pub struct SentinelSet {
    pub servers: Vec<Node>,
    pub sentinels: Vec<Node>,
    dir: TempDir,
}

impl SentinelSet {
    /// Returns once the replica is in sync and every sentinel knows the primary, the
    /// replica and the two other sentinels.
    pub fn start() -> SentinelSet {
        let dir = tempfile::Builder::new()
            .prefix("streamd-sentinel-")
            .tempdir()
            .expect("sentinel tempdir");
        let primary = Node::start(dir.path(), "primary", &|p, _, d| server_args(p, d));
        let pport = primary.port();
        let replica = Node::start(dir.path(), "replica", &|p, _, d| {
            let mut a = server_args(p, d);
            a.extend(["--replicaof".into(), "127.0.0.1".into(), pport.to_string()]);
            a
        });
        let sentinel_args = |p: u16, _: u16, d: &Path| {
            let conf = d.join("sentinel.conf");
            let text = format!(
                "port {p}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {SERVICE} 127.0.0.1 {pport} 2\n\
                 sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n\
                 sentinel parallel-syncs {SERVICE} 1\n",
                dir = d.display()
            );
            fs::write(&conf, text).expect("write sentinel.conf");
            vec![
                conf.to_str().expect("utf-8 path").to_owned(),
                "--sentinel".to_owned(),
            ]
        };
        let sentinels = (0..3)
            .map(|i| Node::start(dir.path(), &format!("sentinel{i}"), &sentinel_args))
            .collect();
        let set = SentinelSet {
            servers: vec![primary, replica],
            sentinels,
            dir,
        };
        set.wait_in_sync();
        let ports: Vec<u16> = set.sentinels.iter().map(Node::port).collect();
        let ready = || {
            ports.iter().all(|&s| {
                let Ok(r) = resp::call(s, &["SENTINEL", "MASTER", SERVICE]) else {
                    return false;
                };
                let f = |k: &str| field(&r, k);
                f("flags").as_deref() == Some("master")
                    && f("num-slaves").as_deref() == Some("1")
                    && f("num-other-sentinels").as_deref() == Some("2")
            })
        };
        wait_sync(FORM, "sentinels know each other", ready, || set.describe());
        set
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis-sentinel://` URL naming the three sentinels, database 0.
    pub fn url(&self) -> String {
        self.url_with_scheme("redis-sentinel")
    }

    /// The same with another scheme (e.g. `rediss-sentinel`).
    pub fn url_with_scheme(&self, scheme: &str) -> String {
        let s: Vec<String> = self.sentinels.iter().map(Node::addr).collect();
        format!(
            "{scheme}://{}/0?sentinelServiceName={SERVICE}&node={}&node={}",
            s[0], s[1], s[2]
        )
    }

    /// The primary's port as every answering sentinel reports it; None while they disagree
    /// or none answers.
    pub fn primary_by_sentinels(&self) -> Option<u16> {
        let mut seen: Option<u16> = None;
        for s in &self.sentinels {
            let Ok(r) = resp::call(s.port(), &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE])
            else {
                continue;
            };
            let port = r.items().get(1)?.text()?.parse().ok()?;
            if seen.is_some_and(|p| p != port) {
                return None;
            }
            seen = Some(port);
        }
        seen
    }

    /// Port of the current primary (sentinels agree and the node says `master`); waits
    /// for that.
    pub fn primary(&self) -> u16 {
        let mut found = 0;
        wait_sync(
            FORM,
            "sentinels agree on a primary",
            || match self.primary_by_sentinels() {
                Some(p) if self.server(p).role().as_deref() == Some("master") => {
                    found = p;
                    true
                }
                _ => false,
            },
            || self.describe(),
        );
        found
    }

    /// The server on `port`.
    pub fn server(&self, port: u16) -> &Node {
        self.servers
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no server on port {port}"))
    }

    pub fn server_mut(&mut self, port: u16) -> &mut Node {
        self.servers
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no server on port {port}"))
    }

    /// Waits until the sentinels name a primary other than `old` and it is one.
    pub fn wait_new_primary(&self, old: u16) -> u16 {
        let mut found = 0;
        wait_sync(
            FORM,
            "sentinels promote the replica",
            || match self.primary_by_sentinels() {
                Some(p) if p != old && self.server(p).role().as_deref() == Some("master") => {
                    found = p;
                    true
                }
                _ => false,
            },
            || self.describe(),
        );
        found
    }

    /// `SENTINEL FAILOVER`; returns (old, new) primary ports once promoted.
    pub fn failover(&self) -> (u16, u16) {
        let old = self.primary();
        resp::must(self.sentinels[0].port(), &["SENTINEL", "FAILOVER", SERVICE]);
        (old, self.wait_new_primary(old))
    }

    /// Waits until the replica acknowledged every write the current primary had when this
    /// was called.
    pub fn wait_in_sync(&self) {
        let primary = self
            .servers
            .iter()
            .find(|n| n.role().as_deref() == Some("master"))
            .map(Node::port)
            .expect("a primary");
        let offset: u64 = resp::info_field(primary, "replication", "master_repl_offset")
            .and_then(|o| o.parse().ok())
            .expect("master_repl_offset");
        let synced = || replicas_reached(primary, offset);
        wait_sync(FORM, "replica in sync", synced, || self.describe());
    }

    /// Every node's role and the sentinels' view, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for n in &self.servers {
            out.push_str(&format!("{} {}: role {:?}\n", n.name, n.addr(), n.role()));
        }
        for s in &self.sentinels {
            let m = resp::call(s.port(), &["SENTINEL", "MASTER", SERVICE])
                .map(|r| format!("{:?} {:?}", field(&r, "ip"), field(&r, "port")))
                .unwrap_or_else(|e| e);
            out.push_str(&format!("{} {}: master {m}\n", s.name, s.addr()));
        }
        out
    }
}

/// The value of `key` in a flat key/value array reply.
fn field(r: &Reply, key: &str) -> Option<String> {
    r.items()
        .chunks(2)
        .find(|kv| kv[0].text().as_deref() == Some(key))
        .and_then(|kv| kv.get(1)?.text())
}
