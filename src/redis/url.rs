//! The Redis URL forms the daemon accepts, parsed in full before anything connects.
//!
//! `[redis] url` (or `REDIS_STREAMD_REDIS_URL`) is parsed once by config validation (so
//! `--check` refuses what cannot work, exit 78) and again at connect time, by the same
//! [`parse`]. Accepted forms:
//!
//! - `redis://[user:password@]host[:port][/db]`, `rediss://` for TLS;
//! - `redis-cluster://[user:password@]host:port[?node=host:port&node=...]`,
//!   `rediss-cluster://`: any reachable node discovers the rest;
//! - `redis-sentinel://[user:password@]sentinel:port[/db]?sentinelServiceName=name
//!   [&node=sentinel2:port][&sentinelUsername=u][&sentinelPassword=p]`, `rediss-sentinel://`;
//! - `redis+unix:///path/to.sock[?db=N]` (fred's form) and `unix:///path/to.sock[?db=N]`
//!   (redis-py's, which also takes `?password=` and `username@`).
//!
//! Unknown query parameters are errors, like unknown config keys. Every message here is
//! free of secrets: [`redact`] masks the password in the user info and the values of
//! `password` and `sentinelPassword`.

use std::fmt;
use std::path::PathBuf;

use fred::prelude::{Config as FredConfig, ServerConfig};
use fred::types::config::{ClusterDiscoveryPolicy, Server};
use percent_encoding::percent_decode_str;

/// Default port of a Redis server.
const REDIS_PORT: u16 = 6379;
/// Default port of a sentinel.
const SENTINEL_PORT: u16 = 26379;
/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;
/// Query parameters whose values are secrets.
const SECRET_PARAMS: [&str; 2] = ["password", "sentinelpassword"];

/// What kind of Redis deployment a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// One server over TCP (`redis://`, `rediss://`).
    Standalone,
    /// A Redis Cluster (`redis-cluster://`, `rediss-cluster://`).
    Cluster,
    /// A primary found through sentinels (`redis-sentinel://`, `rediss-sentinel://`).
    Sentinel,
    /// One server over a unix socket (`redis+unix://`, `unix://`).
    Unix,
}

impl fmt::Display for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Deployment::Standalone => "standalone",
            Deployment::Cluster => "cluster",
            Deployment::Sentinel => "sentinel",
            Deployment::Unix => "unix socket",
        })
    }
}

/// A parsed URL: what to connect to and how. Holds credentials: no `Debug`.
#[derive(Clone)]
pub struct Target {
    /// fred's configuration for it, TLS not yet set (see `tls`).
    pub(crate) fred: FredConfig,
    pub deployment: Deployment,
    /// Whether every connection (to cluster nodes and sentinels too) uses TLS.
    pub tls: bool,
    /// The sentinel service name (sentinel deployments only).
    pub(crate) service_name: Option<String>,
}

/// Parses `url` into a [`Target`]. The error is a sentence without the password.
pub fn parse(url: &str) -> Result<Target, String> {
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(format!(
            "must start with a scheme such as redis:// (got {:?}); {}",
            redact(url),
            SCHEMES_HINT
        ));
    };
    let (deployment, tls) = match scheme {
        "redis" => (Deployment::Standalone, false),
        "rediss" => (Deployment::Standalone, true),
        "redis-cluster" => (Deployment::Cluster, false),
        "rediss-cluster" => (Deployment::Cluster, true),
        "redis-sentinel" => (Deployment::Sentinel, false),
        "rediss-sentinel" => (Deployment::Sentinel, true),
        "redis+unix" | "unix" => (Deployment::Unix, false),
        _ => {
            return Err(format!(
                "unknown scheme {:?} in {:?}; {SCHEMES_HINT}",
                scheme.chars().take(40).collect::<String>(),
                redact(url)
            ));
        }
    };
    let target = if deployment == Deployment::Unix {
        parse_unix(url)
    } else {
        parse_tcp(url, deployment)
    }
    .map_err(|why| format!("{why} (in {:?})", redact(url)))?;
    Ok(Target { tls, ..target })
}

const SCHEMES_HINT: &str = "use redis:// or rediss:// (one server), redis-cluster:// or \
     rediss-cluster://, redis-sentinel:// or rediss-sentinel://, or redis+unix:// or unix:// \
     (a unix socket)";

/// The TCP forms: standalone, cluster, sentinel.
fn parse_tcp(url: &str, deployment: Deployment) -> Result<Target, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    let host = match parsed.host() {
        Some(url::Host::Domain("")) | None => return Err("has no host".to_string()),
        Some(url::Host::Domain(name)) => name.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
    };
    let default_port = match deployment {
        Deployment::Sentinel => SENTINEL_PORT,
        _ => REDIS_PORT,
    };
    let port = parsed.port().unwrap_or(default_port);
    let (username, password) = credentials(parsed.username(), parsed.password())?;

    let query = Query::parse(parsed.query().unwrap_or(""))?;
    let mut nodes = vec![Server::new(host, port)];
    let allowed: &[&str] = match deployment {
        Deployment::Standalone => &["db"],
        Deployment::Cluster => &["node"],
        _ => &[
            "db",
            "node",
            "sentinelServiceName",
            "sentinelUsername",
            "sentinelPassword",
        ],
    };
    query.only(allowed)?;
    for node in query.all("node") {
        nodes.push(host_port(&node)?);
    }
    let database = database(parsed.path(), query.one("db")?)?;

    let (server, service_name) = match deployment {
        Deployment::Cluster => {
            if database.is_some_and(|db| db != 0) {
                return Err("Redis Cluster has only database 0: remove the /db path".to_string());
            }
            let server = ServerConfig::Clustered {
                hosts: nodes,
                // Rediscovery may ask any node last seen in the cluster, not only those
                // in the URL: they may be the ones that failed.
                policy: ClusterDiscoveryPolicy::UseCache,
            };
            (server, None)
        }
        Deployment::Sentinel => {
            let Some(name) = query.one("sentinelServiceName")? else {
                return Err(
                    "needs ?sentinelServiceName=<name of the primary the sentinels monitor>"
                        .to_string(),
                );
            };
            if name.is_empty() {
                return Err("sentinelServiceName is empty".to_string());
            }
            let server = ServerConfig::Sentinel {
                hosts: nodes,
                service_name: name.clone(),
                username: query.one("sentinelUsername")?.filter(|u| !u.is_empty()),
                password: query.one("sentinelPassword")?.filter(|p| !p.is_empty()),
            };
            (server, Some(name))
        }
        _ => {
            let server = nodes.swap_remove(0);
            (ServerConfig::Centralized { server }, None)
        }
    };
    let fred = FredConfig {
        server,
        username,
        password,
        // fred SELECTs it after every (re)connect.
        database: database.filter(|&db| db != 0),
        ..FredConfig::default()
    };
    Ok(Target {
        fred,
        deployment,
        tls: false,
        service_name,
    })
}

/// `unix://[user[:password]@][host]/path[?db=N][&password=p][&username=u]`, by hand: the
/// `url` crate refuses user info without a host, which redis-py's form allows.
fn parse_unix(url: &str) -> Result<Target, String> {
    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
    let (before_query, raw_query) = rest.split_once('?').unwrap_or((rest, ""));
    let Some(slash) = before_query.find('/') else {
        return Err("has no socket path: write e.g. unix:///run/redis/redis.sock".to_string());
    };
    let (authority, raw_path) = before_query.split_at(slash);
    let (user, pass) = match authority.rsplit_once('@') {
        Some((userinfo, _host)) => match userinfo.split_once(':') {
            Some((user, pass)) => (user, Some(pass)),
            None => (userinfo, None),
        },
        None => ("", None),
    };
    let (mut username, mut password) = credentials(user, pass)?;
    let path = decode(raw_path, "socket path")?;
    if path.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "socket path is {} bytes long; unix sockets allow at most {MAX_SOCKET_PATH}",
            path.len()
        ));
    }
    let query = Query::parse(raw_query)?;
    query.only(&["db", "password", "username"])?;
    if let Some(p) = query.one("password")? {
        if password.is_some() {
            return Err("gives a password twice (user info and ?password=)".to_string());
        }
        password = Some(p).filter(|p| !p.is_empty());
    }
    if let Some(u) = query.one("username")? {
        if username.is_some() {
            return Err("gives a username twice (user info and ?username=)".to_string());
        }
        username = Some(u).filter(|u| !u.is_empty());
    }
    let database = database("", query.one("db")?)?;
    let fred = FredConfig {
        server: ServerConfig::Unix {
            path: PathBuf::from(path),
        },
        username,
        password,
        database: database.filter(|&db| db != 0),
        ..FredConfig::default()
    };
    Ok(Target {
        fred,
        deployment: Deployment::Unix,
        tls: false,
        service_name: None,
    })
}

/// Percent-decoded (username, password), each `None` when empty.
fn credentials(user: &str, pass: Option<&str>) -> Result<(Option<String>, Option<String>), String> {
    let username = decode(user, "user name")?;
    let password = decode(pass.unwrap_or(""), "password")?;
    Ok((
        Some(username).filter(|u| !u.is_empty()),
        Some(password).filter(|p| !p.is_empty()),
    ))
}

fn decode(raw: &str, what: &str) -> Result<String, String> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("the {what} is not valid UTF-8 once percent-decoded"))
}

/// The database from the path (`/2`) or `?db=2`, at most one of them; 0 to 255.
fn database(path: &str, query: Option<String>) -> Result<Option<u8>, String> {
    let from_path = path.trim_start_matches('/');
    let text = match (from_path.is_empty(), query) {
        (true, None) => return Ok(None),
        (false, Some(_)) => {
            return Err("gives the database twice (path and ?db=)".to_string());
        }
        (true, Some(q)) => q,
        (false, None) => from_path.to_string(),
    };
    text.parse::<u8>().map(Some).map_err(|_| {
        format!(
            "database {:?} is not a number from 0 to 255",
            text.chars().take(20).collect::<String>()
        )
    })
}

/// `host:port` of a `node=` parameter.
fn host_port(text: &str) -> Result<Server, String> {
    let bad = || format!("node={text:?} is not host:port");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(bad)?;
    Ok(Server::new(host.to_string(), port))
}

/// Decoded query parameters, in order.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Result<Query, String> {
        let pairs = url::form_urlencoded::parse(raw.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Ok(Query(pairs))
    }

    /// Errors on the first parameter not in `allowed`.
    fn only(&self, allowed: &[&str]) -> Result<(), String> {
        match self.0.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some((key, _)) if allowed.is_empty() => Err(format!(
                "unknown parameter {:?}: this form takes no parameters",
                key.chars().take(40).collect::<String>()
            )),
            Some((key, _)) => Err(format!(
                "unknown parameter {:?}; this form takes {}",
                key.chars().take(40).collect::<String>(),
                allowed.join(", ")
            )),
        }
    }

    fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The value of `key`, which may appear once.
    fn one(&self, key: &str) -> Result<Option<String>, String> {
        let mut values = self.all(key);
        match values.len() {
            0 => Ok(None),
            1 => Ok(values.pop()),
            _ => Err(format!("parameter {key} is given more than once")),
        }
    }
}

/// `url` with every secret replaced by `***`: the password of the user info and the
/// values of `password` and `sentinelPassword` parameters. Works on anything, parsable
/// or not: it may mask too much of an odd string, never too little.
pub fn redact(url: &str) -> String {
    let masked = mask_secret_params(url);
    // A string without "://" is scanned whole: a mistyped URL can carry a password too.
    let rest_start = masked.find("://").map_or(0, |i| i + 3);
    let (head, rest) = masked.split_at(rest_start);
    // The last '@' ends the user info. Cutting at the first '/' instead would leak a
    // password containing an unencoded '/' or '@'; mangling an odd query is the lesser harm.
    let Some(at) = rest.rfind('@') else {
        return masked.clone();
    };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{head}{user}:***{host}"),
        None => masked.clone(),
    }
}

/// Replaces the value of each `password=` / `sentinelPassword=` parameter (any case, after
/// `?` or `&`) up to the next `&` with `***`.
fn mask_secret_params(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(i) = rest.find(['?', '&']) {
        let (before, from_sep) = rest.split_at(i);
        out.push_str(before);
        // The separator is one ASCII byte.
        let (sep, param) = from_sep.split_at(1);
        out.push_str(sep);
        let end = param.find('&').unwrap_or(param.len());
        let (pair, after) = param.split_at(end);
        match pair.split_once('=') {
            Some((key, _)) if SECRET_PARAMS.contains(&key.to_ascii_lowercase().as_str()) => {
                out.push_str(key);
                out.push_str("=***");
            }
            _ => out.push_str(pair),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> Target {
        match parse(url) {
            Ok(t) => t,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    fn err(url: &str) -> String {
        match parse(url) {
            Ok(_) => panic!("{url} parsed"),
            Err(e) => e,
        }
    }

    fn server(t: &Target) -> (String, u16) {
        match &t.fred.server {
            ServerConfig::Centralized { server } => (server.host.to_string(), server.port),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn standalone_forms() {
        let t = ok("redis://user:p%40ss@h.example:6380/2");
        assert_eq!((t.deployment, t.tls), (Deployment::Standalone, false));
        assert_eq!(server(&t), ("h.example".into(), 6380));
        assert_eq!(t.fred.username.as_deref(), Some("user"));
        assert_eq!(t.fred.password.as_deref(), Some("p@ss"));
        assert_eq!(t.fred.database, Some(2));
        let t = ok("rediss://h");
        assert!(t.tls);
        assert_eq!(server(&t), ("h".into(), 6379));
        assert_eq!(t.fred.database, None);
        assert_eq!(ok("redis://h/").fred.database, None);
        assert_eq!(ok("redis://h/0").fred.database, None);
        assert_eq!(ok("redis://h?db=3").fred.database, Some(3));
        assert_eq!(server(&ok("redis://[::1]:7000")), ("::1".into(), 7000));
        assert_eq!(ok("redis://:pw@h").fred.username, None);
    }

    #[test]
    fn urls_that_cannot_work_are_refused_without_the_password() {
        for (url, why) in [
            ("redis://:hunter2@127.0.0.1:notaport/0", "invalid port"),
            ("redis://:hunter2@127.0.0.1:99999/0", "invalid port"),
            ("redis://:hunter2@/0", "host"),
            ("redis://:hunter2@h/x", "database \"x\""),
            ("redis://:hunter2@h/256", "0 to 255"),
            ("redis://:hunter2@h/1/2", "database"),
            ("redis://:hunter2@h/1?db=1", "twice"),
            ("redis://:hunter2@h?foo=1", "unknown parameter \"foo\""),
            ("http://:hunter2@h", "unknown scheme \"http\""),
            ("h:6379", "must start with a scheme"),
            ("redis-cluster://:hunter2@h:7000/1", "only database 0"),
            ("redis-cluster://:hunter2@h:7000?node=h2", "not host:port"),
            ("redis-cluster://:hunter2@h:7000?node=h2:x", "not host:port"),
            ("redis-cluster://:hunter2@h:7000?db=1", "unknown parameter"),
            (
                "redis-sentinel://:hunter2@s1:26379/0",
                "sentinelServiceName",
            ),
            (
                "redis-sentinel://s1?sentinelServiceName=m&sentinelPassword=hunter2&sentinelPassword=x",
                "more than once",
            ),
            ("unix://:hunter2@localhost", "no socket path"),
            ("unix:///run/r.sock?db=x&password=hunter2", "database"),
            (
                "unix:///run/r.sock?node=h:1&password=hunter2",
                "unknown parameter",
            ),
            (
                "redis+unix://:hunter2@x/r.sock?password=hunter2",
                "password twice",
            ),
        ] {
            let e = err(url);
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
        let long = format!("unix:///{}", "a".repeat(120));
        assert!(err(&long).contains("at most 107"));
    }

    #[test]
    fn cluster_forms() {
        let t = ok("rediss-cluster://u:pw@h1:7000?node=h2:7001&node=h3:7002");
        assert_eq!((t.deployment, t.tls), (Deployment::Cluster, true));
        match &t.fred.server {
            ServerConfig::Clustered { hosts, .. } => {
                let hosts: Vec<_> = hosts.iter().map(|s| format!("{s}")).collect();
                assert_eq!(hosts, ["h1:7000", "h2:7001", "h3:7002"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.fred.password.as_deref(), Some("pw"));
        assert_eq!(ok("redis-cluster://h:7000/0").fred.database, None);
    }

    #[test]
    fn sentinel_forms() {
        let t = ok(
            "redis-sentinel://u:pw@s1:26379/2?sentinelServiceName=mymaster&node=s2:26380&sentinelUsername=su&sentinelPassword=sp",
        );
        assert_eq!(t.deployment, Deployment::Sentinel);
        assert_eq!(t.service_name.as_deref(), Some("mymaster"));
        assert_eq!(t.fred.database, Some(2));
        assert_eq!(t.fred.password.as_deref(), Some("pw"));
        match &t.fred.server {
            ServerConfig::Sentinel {
                hosts,
                service_name,
                username,
                password,
            } => {
                assert_eq!(hosts.len(), 2);
                assert_eq!(service_name, "mymaster");
                assert_eq!(username.as_deref(), Some("su"));
                assert_eq!(password.as_deref(), Some("sp"));
            }
            other => panic!("{other:?}"),
        }
        let t = ok("rediss-sentinel://s1?sentinelServiceName=m");
        assert!(t.tls);
        match &t.fred.server {
            ServerConfig::Sentinel { hosts, .. } => assert_eq!(hosts[0].port, 26379),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unix_forms() {
        for url in [
            "redis+unix:///run/redis/redis.sock?db=2",
            "unix:///run/redis/redis.sock?db=2",
        ] {
            let t = ok(url);
            assert_eq!(t.deployment, Deployment::Unix);
            assert_eq!(t.fred.database, Some(2));
            match &t.fred.server {
                ServerConfig::Unix { path } => {
                    assert_eq!(path, &PathBuf::from("/run/redis/redis.sock"))
                }
                other => panic!("{other:?}"),
            }
        }
        let t = ok("unix://worker@/run/r.sock?password=s%26cret");
        assert_eq!(t.fred.username.as_deref(), Some("worker"));
        assert_eq!(t.fred.password.as_deref(), Some("s&cret"));
        let t = ok("redis+unix://u:pw@localhost/run/r.sock");
        assert_eq!(t.fred.password.as_deref(), Some("pw"));
        assert_eq!(ok("unix:///run/r.sock").fred.database, None);
    }

    #[test]
    fn redact_masks_every_secret() {
        assert_eq!(
            redact("redis://user:hunter2@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact("rediss://:hunter2@host"), "rediss://:***@host");
        assert_eq!(redact("redis://host:6379/0"), "redis://host:6379/0");
        assert_eq!(redact("redis://user@host"), "redis://user@host");
        assert_eq!(redact("user:hunter2@host"), "user:***@host");
        assert_eq!(
            redact(
                "redis-sentinel://s1/0?sentinelServiceName=m&sentinelPassword=hunter2&node=s2:1"
            ),
            "redis-sentinel://s1/0?sentinelServiceName=m&sentinelPassword=***&node=s2:1"
        );
        assert_eq!(
            redact("unix:///r.sock?db=1&PASSWORD=hunter2"),
            "unix:///r.sock?db=1&PASSWORD=***"
        );
        for odd in [
            "",
            "@",
            ":@",
            "://",
            "redis://",
            "redis://:",
            "é:ü@ß",
            "redis://@@",
            "?&=&",
        ] {
            let _ = redact(odd);
        }
        for url in [
            "redis://u:hunter2@h",
            "redis://:hunter2@h/0",
            "redis://u:hun/ter2@h",
            "redis://u:hunter2@h@h2",
            "redis://u:hu:nter2@h",
            "redis://u:hun?ter2@h",
            "redis-sentinel://u:hunter2@s?sentinelServiceName=m&sentinelUsername=a@b",
            "redis-sentinel://s?sentinelPassword=hunter2@x",
            "unix://u:hunter2@/r.sock",
        ] {
            let r = redact(url);
            assert!(
                !r.contains("hunter2") && !r.contains("nter2"),
                "{url} -> {r}"
            );
        }
    }
}
