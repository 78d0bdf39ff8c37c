//! A Redis Cluster on loopback for tests: N primaries with R replicas each
//! (`cluster-node-timeout 1500`), created with `redis-cli --cluster create`, plus the
//! operations the failover tests need: manual failover, kill -9 of a primary, moving a
//! slot to another primary, and waiting until replicas have every write.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::resp::{self, Reply};
use super::{FORM, Node, server_args, wait_sync};

/// `cluster-node-timeout` of every node, in ms.
pub const NODE_TIMEOUT_MS: u64 = 1500;

/// One row of `CLUSTER SLOTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub primary: u16,
    pub replicas: Vec<u16>,
}

/// The cluster's nodes (index = start order; roles change with failovers).
pub struct Cluster {
    pub nodes: Vec<Node>,
    dir: TempDir,
}

impl Cluster {
    /// 3 primaries, 1 replica each: the topology.
    pub fn start() -> Cluster {
        Cluster::start_with(3, 1)
    }

    /// `primaries` primaries with `replicas` replicas each; returns once every node says
    /// `cluster_state:ok`, every slot range has its replicas, and they are in sync.
    pub fn start_with(primaries: usize, replicas: usize) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("streamd-cluster-")
            .tempdir()
            .expect("cluster tempdir");
        let args = |port: u16, bus: u16, d: &Path| {
            let mut a = server_args(port, d);
            for s in [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &NODE_TIMEOUT_MS.to_string(),
                "--cluster-port",
                &bus.to_string(),
            ] {
                a.push(s.to_owned());
            }
            a
        };
        let nodes: Vec<Node> = (0..primaries * (1 + replicas))
            .map(|i| Node::start(dir.path(), &format!("n{i}"), &args))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(Node::addr))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create (Debian package redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = Cluster { nodes, dir };
        cluster.wait_healthy(Some((primaries, replicas)));
        cluster.wait_in_sync();
        cluster
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis-cluster://` URL naming every node that is alive (and not frozen).
    pub fn url(&mut self) -> String {
        self.url_with_scheme("redis-cluster")
    }

    /// The same with another scheme (e.g. `rediss-cluster`). Frozen nodes are left out.
    pub fn url_with_scheme(&mut self, scheme: &str) -> String {
        let addrs: Vec<String> = self
            .live_ports()
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut url = format!("{scheme}://{}", addrs[0]);
        for (i, a) in addrs[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str("node=");
            url.push_str(a);
        }
        url
    }

    /// Index of the node on `port`.
    pub fn index_of(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    pub fn node(&self, port: u16) -> &Node {
        &self.nodes[self.index_of(port)]
    }

    pub fn node_mut(&mut self, port: u16) -> &mut Node {
        let i = self.index_of(port);
        &mut self.nodes[i]
    }

    /// Nodes that run and are not frozen.
    fn live_ports(&mut self) -> Vec<u16> {
        self.nodes
            .iter_mut()
            .filter_map(|n| (n.is_alive() && !n.is_frozen()).then(|| n.port()))
            .collect()
    }

    /// `CLUSTER SLOTS` as seen by the node on `port`.
    pub fn slots_seen_by(port: u16) -> Option<Vec<SlotRange>> {
        let reply = resp::call(port, &["CLUSTER", "SLOTS"]).ok()?;
        if reply.is_error() {
            return None;
        }
        let mut out: Vec<SlotRange> = reply.items().iter().filter_map(slot_range).collect();
        out.sort_by_key(|r| r.start);
        Some(out)
    }

    /// The slot map of the first live node that answers (the nodes agree once healthy).
    pub fn slots(&mut self) -> Vec<SlotRange> {
        for p in self.live_ports() {
            if let Some(s) = Cluster::slots_seen_by(p) {
                return s;
            }
        }
        panic!("no live cluster node answers CLUSTER SLOTS");
    }

    /// Port of the primary that owns `key`'s slot.
    pub fn owner_of(&mut self, key: &str) -> u16 {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        self.owner_of_slot(slot)
    }

    pub fn owner_of_slot(&mut self, slot: u16) -> u16 {
        self.slots()
            .into_iter()
            .find(|r| r.start <= slot && slot <= r.end)
            .map(|r| r.primary)
            .unwrap_or_else(|| panic!("slot {slot} has no owner"))
    }

    /// Ports of the primaries that own slots, in slot order.
    pub fn primaries(&mut self) -> Vec<u16> {
        let mut out: Vec<u16> = Vec::new();
        for r in self.slots() {
            if !out.contains(&r.primary) {
                out.push(r.primary);
            }
        }
        out
    }

    /// Port of a replica of the primary on `primary`.
    pub fn replica_of(&mut self, primary: u16) -> u16 {
        self.slots()
            .into_iter()
            .find(|r| r.primary == primary)
            .and_then(|r| r.replicas.first().copied())
            .unwrap_or_else(|| panic!("primary {primary} has no replica"))
    }

    /// `CLUSTER MYID` of the node on `port`.
    pub fn node_id(port: u16) -> String {
        resp::must(port, &["CLUSTER", "MYID"])
            .text()
            .expect("CLUSTER MYID")
    }

    /// Waits until every live node says `cluster_state:ok` and all of them report the same
    /// slot map, whose primaries are alive; with `Some((p, r))`, also `p` primaries with `r`
    /// replicas each.
    pub fn wait_healthy(&mut self, shape: Option<(usize, usize)>) {
        let ports = self.live_ports();
        let healthy = || {
            let mut maps = Vec::new();
            for &p in &ports {
                let ok = cluster_state(p).as_deref() == Some("ok");
                match (ok, Cluster::slots_seen_by(p)) {
                    (true, Some(m)) => maps.push(m),
                    _ => return false,
                }
            }
            let first = &maps[0];
            let covered: u32 = first.iter().map(|r| u32::from(r.end - r.start) + 1).sum();
            let mut prim: Vec<u16> = first.iter().map(|r| r.primary).collect();
            prim.dedup();
            let shape_ok = shape.is_none_or(|(np, nr)| {
                prim.len() == np && first.iter().all(|r| r.replicas.len() == nr)
            });
            covered == 16384
                && shape_ok
                && maps.iter().all(|m| m == first)
                && first.iter().all(|r| ports.contains(&r.primary))
        };
        wait_sync(FORM, "cluster healthy", healthy, || self.describe());
    }

    /// Waits until every replica has acknowledged every write its primary had when this
    /// was called (writes made meanwhile, e.g. by a running daemon, may still be on their
    /// way), so that a failover loses nothing written before.
    pub fn wait_in_sync(&mut self) {
        let targets: Vec<(u16, u64)> = self
            .primaries()
            .into_iter()
            .map(|p| {
                let o = resp::info_field(p, "replication", "master_repl_offset")
                    .and_then(|o| o.parse().ok())
                    .unwrap_or_else(|| panic!("no master_repl_offset from {p}"));
                (p, o)
            })
            .collect();
        let synced = || targets.iter().all(|&(p, o)| replicas_reached(p, o));
        wait_sync(FORM, "replicas in sync", synced, || self.describe());
    }

    /// `CLUSTER FAILOVER` on the replica on `replica`: waits until it is a primary and the
    /// cluster is healthy again. Returns the old primary's port.
    pub fn manual_failover(&mut self, replica: u16) -> u16 {
        let old = self
            .slots()
            .into_iter()
            .find(|r| r.replicas.contains(&replica))
            .map(|r| r.primary)
            .unwrap_or_else(|| panic!("{replica} is not a replica"));
        resp::must(replica, &["CLUSTER", "FAILOVER"]);
        let node = self.node(replica);
        wait_sync(
            FORM,
            "replica promoted",
            || node.role().as_deref() == Some("master"),
            String::new,
        );
        self.wait_healthy(None);
        old
    }

    /// kill -9 of the primary on `primary`; waits until its replica took over and the
    /// cluster is healthy. Returns the new primary's port.
    pub fn kill_primary(&mut self, primary: u16) -> u16 {
        let replica = self.replica_of(primary);
        self.node_mut(primary).kill9();
        let node = self.node(replica);
        wait_sync(
            FORM,
            "replica promoted after kill -9",
            || node.role().as_deref() == Some("master"),
            String::new,
        );
        self.wait_healthy(None);
        replica
    }

    /// `kill -STOP` of the primary on `primary`; waits until its replica took over and the
    /// other nodes are healthy. Returns the new primary's port.
    pub fn freeze_primary(&mut self, primary: u16) -> u16 {
        let replica = self.replica_of(primary);
        self.node_mut(primary).freeze();
        let node = self.node(replica);
        wait_sync(
            FORM,
            "replica promoted while its primary is frozen",
            || node.role().as_deref() == Some("master"),
            String::new,
        );
        self.wait_healthy(None);
        replica
    }

    /// `kill -CONT` of a node frozen by [`Cluster::freeze_primary`]; waits until it has
    /// rejoined as a replica and the cluster is healthy.
    pub fn thaw_as_replica(&mut self, port: u16) {
        self.node_mut(port).thaw();
        let node = self.node(port);
        wait_sync(
            FORM,
            "continued primary demoted to a replica",
            || node.role().as_deref() == Some("slave"),
            String::new,
        );
        self.wait_healthy(None);
    }

    /// Moves `slot` and its keys to the primary on `to`: SETSLOT IMPORTING / MIGRATING,
    /// MIGRATE of every key, SETSLOT NODE on every primary (target first).
    pub fn migrate_slot(&mut self, slot: u16, to: u16) {
        let from = self.owner_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let (from_id, to_id) = (Cluster::node_id(from), Cluster::node_id(to));
        let s = slot.to_string();
        resp::must(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]);
        resp::must(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]);
        loop {
            let keys = resp::must(from, &["CLUSTER", "GETKEYSINSLOT", &s, "100"]);
            let keys: Vec<String> = keys.items().iter().filter_map(Reply::text).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "10000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            resp::must(from, &args);
        }
        let mut order = vec![to, from];
        for p in self.primaries() {
            if !order.contains(&p) {
                order.push(p);
            }
        }
        for p in order {
            resp::must(p, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        }
        self.wait_healthy(None);
    }

    /// Every node's view, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let nodes = resp::call_timeout(n.port(), &["CLUSTER", "NODES"], Duration::from_secs(1))
                .ok()
                .and_then(|r| r.text())
                .unwrap_or_else(|| "(no answer)".into());
            out.push_str(&format!("---- {} ({}) ----\n{nodes}\n", n.name, n.addr()));
        }
        out
    }
}

/// `cluster_state` from `CLUSTER INFO` of the node on `port`.
pub fn cluster_state(port: u16) -> Option<String> {
    let text = resp::call(port, &["CLUSTER", "INFO"]).ok()?.text()?;
    text.lines()
        .find_map(|l| l.trim_end().strip_prefix("cluster_state:"))
        .map(str::to_owned)
}

/// True when every replica of the primary on `port` (at least one) is online and has
/// acknowledged replication offset `offset`.
pub fn replicas_reached(port: u16, offset: u64) -> bool {
    let Ok(info) = resp::info(port, "replication") else {
        return false;
    };
    let replicas: Vec<&String> = info
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix("slave")
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|(_, v)| v)
        .collect();
    !replicas.is_empty()
        && replicas.iter().all(|v| {
            let acked = v
                .split(',')
                .find_map(|kv| kv.strip_prefix("offset="))
                .and_then(|o| o.parse::<u64>().ok());
            v.contains("state=online") && acked.is_some_and(|a| a >= offset)
        })
}

fn slot_range(r: &Reply) -> Option<SlotRange> {
    let items = r.items();
    let port_of = |node: &Reply| node.items().get(1)?.int().map(|p| p as u16);
    let mut replicas: Vec<u16> = items.get(3..)?.iter().filter_map(port_of).collect();
    replicas.sort_unstable();
    Some(SlotRange {
        start: items.first()?.int()? as u16,
        end: items.get(1)?.int()? as u16,
        primary: port_of(items.get(2)?)?,
        replicas,
    })
}
