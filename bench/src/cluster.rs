//! A Redis Cluster of N primaries (no replicas) on loopback for the cluster scenario: each
//! node a [`RedisServer`] with `cluster-enabled yes`, an equal share of the 16384 slots
//! given with `CLUSTER ADDSLOTSRANGE`, joined with `CLUSTER MEET` (no redis-cli needed).

use std::path::Path;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use crate::{RedisServer, Result, connect, free_port, text};

/// The nodes (stopped on drop) and the slot range each owns.
pub struct BenchCluster {
    pub nodes: Vec<RedisServer>,
    ranges: Vec<(u16, u16)>,
}

async fn admin(client: &Client, args: Vec<String>) -> Result<Value> {
    let cmd = CustomCommand::new_static("CLUSTER", ClusterHash::FirstKey, false);
    Ok(client.custom::<Value, _>(cmd, args).await?)
}

impl BenchCluster {
    /// Starts `primaries` nodes and waits until every one says `cluster_state:ok`.
    pub async fn start(dir: &Path, primaries: usize) -> Result<BenchCluster> {
        let mut nodes = Vec::new();
        let mut buses = Vec::new();
        for _ in 0..primaries {
            let bus = std::sync::Mutex::new(0u16);
            let node = RedisServer::start_with(dir, |port| {
                let b = free_port().unwrap_or(0);
                *bus.lock().expect("bus port") = b;
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--cluster-port",
                    &b.to_string(),
                ]
                .map(str::to_owned)
                .to_vec()
            })?;
            buses.push(*bus.lock().expect("bus port"));
            nodes.push(node);
        }
        let mut ranges = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let start = (16384 * i / primaries) as u16;
            let end = (16384 * (i + 1) / primaries - 1) as u16;
            ranges.push((start, end));
            let client = connect(&node.url()).await?;
            let add = vec!["ADDSLOTSRANGE".into(), start.to_string(), end.to_string()];
            admin(&client, add).await?;
            if i > 0 {
                let meet = vec![
                    "MEET".into(),
                    "127.0.0.1".into(),
                    node.port.to_string(),
                    buses[i].to_string(),
                ];
                admin(&connect(&nodes[0].url()).await?, meet).await?;
            }
            let _ = client.quit().await;
        }
        let cluster = BenchCluster { nodes, ranges };
        cluster.wait_ok(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    async fn wait_ok(&self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        'poll: loop {
            for node in &self.nodes {
                let client = connect(&node.url()).await?;
                let info = admin(&client, vec!["INFO".into()]).await?;
                let slots = admin(&client, vec!["SLOTS".into()]).await?;
                let _ = client.quit().await;
                let ok = text(&info).is_some_and(|t| t.contains("cluster_state:ok"));
                let known = matches!(&slots, Value::Array(r) if r.len() == self.nodes.len());
                if !(ok && known) {
                    if started.elapsed() > limit {
                        return Err(format!("cluster not ok after {limit:?}").into());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'poll;
                }
            }
            return Ok(());
        }
    }

    /// `redis-cluster://` URL naming every node.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, n) in self.nodes[1..].iter().enumerate() {
            url.push_str(if i == 0 { "?" } else { "&" });
            url.push_str(&format!("node=127.0.0.1:{}", n.port));
        }
        url
    }

    /// The node that owns `key`'s slot.
    pub fn owner(&self, key: &str) -> &RedisServer {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let i = self
            .ranges
            .iter()
            .position(|&(s, e)| s <= slot && slot <= e)
            .unwrap_or(0);
        &self.nodes[i]
    }

    /// One stream name per node, `{<prefix>-<i>}` for the first `i` on that node.
    pub fn stream_per_node(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<Option<String>> = vec![None; self.nodes.len()];
        for i in 0.. {
            let name = format!("{{{prefix}-{i}}}");
            let port = self.owner(&name).port;
            let at = self.nodes.iter().position(|n| n.port == port).unwrap_or(0);
            names[at].get_or_insert(name);
            if names.iter().all(Option::is_some) {
                break;
            }
        }
        names.into_iter().flatten().collect()
    }
}
