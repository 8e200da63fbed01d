//! The effective config as TOML, every default filled in: what `spliced
//! check` prints. It parses back to the same [`Config`] (a unit test holds
//! it to that), so it can be saved and used as the config itself.

use serde::Serialize;

use super::*;

#[derive(Serialize)]
struct File {
    /// Top-level keys come before the tables.
    #[serde(skip_serializing_if = "Option::is_none")]
    admin: Option<String>,
    global: Global,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pool: Vec<Pool>,
    listener: Vec<Listener>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Global {
    workers: usize,
    #[serde(rename = "loop")]
    event_loop: &'static str,
    /// Absent: derived from the fd limit at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_conns: Option<usize>,
    pipe_size: String,
    max_pipes: usize,
    pipe_budget: String,
    drain_timeout: String,
    /// Absent: the stats file is its owner's alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    stats_group: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Listener {
    name: String,
    listen: Vec<String>,
    mode: &'static str,
    idle_timeout: String,
    fin_timeout: String,
    connect_timeout: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_conns: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_conns_per_source: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_queued: Option<usize>,
    allow: Vec<String>,
    deny: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accept_proxy: Option<AcceptProxyOut>,
    protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_packet_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keepalive: Option<KeepaliveOut>,
    user_timeout: String,
    /// Absent when the listener routes to named pools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<Pool>,
    /// The route table, in the order routes are tried.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    route: Vec<Route>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Route {
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alpn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    pool: String,
}

#[derive(Serialize)]
struct AcceptProxyOut {
    trusted: Vec<String>,
    timeout: String,
}

#[derive(Serialize)]
struct KeepaliveOut {
    idle: String,
    interval: String,
    count: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Pool {
    /// A named pool's (`[[pool]]`); a listener's own has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    balance: &'static str,
    retries: usize,
    on_down: &'static str,
    resolve_interval: String,
    send_proxy: &'static str,
    queue_timeout: String,
    servers: Vec<Server>,
    health: Health,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Server {
    address: String,
    weight: u32,
    backup: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    check_port: Option<u16>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Health {
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<&'static str>,
    interval: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rise: Option<u32>,
    fall: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_lag: Option<String>,
}

fn nets(list: &[ipnet::IpNet]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

fn pool(name: Option<&str>, p: &PoolConfig) -> Pool {
    let h = &p.health;
    let active = h.check.is_some();
    Pool {
        name: name.map(str::to_string),
        balance: p.balance.as_str(),
        retries: p.retries.unwrap_or(p.servers.len().saturating_sub(1)),
        on_down: p.on_down.as_str(),
        resolve_interval: format_duration(p.resolve_interval),
        send_proxy: p.send_proxy.as_str(),
        queue_timeout: format_duration(p.queue_timeout),
        servers: p
            .servers
            .iter()
            .map(|s| Server {
                address: s.address.clone(),
                weight: s.weight,
                backup: s.backup,
                check_port: s.check_port,
            })
            .collect(),
        // Without an active check only `fall` and `interval` (the
        // first retry of a down server) mean anything.
        health: Health {
            check: h.check.map(Check::as_str),
            interval: format_duration(Some(h.interval)),
            timeout: active.then(|| format_duration(Some(h.timeout))),
            rise: active.then_some(h.rise),
            fall: h.fall,
            role: active.then(|| h.role.as_str()),
            user: h.user.clone(),
            password_file: h.password_file.clone(),
            database: h.database.clone(),
            port: h.port,
            path: h.path.clone(),
            max_lag: h.max_lag.map(|n| format_size(n as usize)),
        },
    }
}

fn listener(l: &ListenerConfig) -> Listener {
    Listener {
        name: l.name.clone(),
        listen: l.listen.iter().map(ToString::to_string).collect(),
        mode: l.mode.as_str(),
        idle_timeout: format_duration(l.timeouts.idle),
        fin_timeout: format_duration(l.timeouts.fin),
        connect_timeout: format_duration(l.timeouts.connect),
        max_conns: l.max_conns,
        max_conns_per_source: l.max_conns_per_source,
        max_queued: l.max_queued,
        allow: nets(&l.access.allow),
        deny: nets(&l.access.deny),
        accept_proxy: l.accept_proxy.as_ref().map(|a| AcceptProxyOut {
            trusted: nets(&a.trusted),
            timeout: format_duration(Some(a.timeout)),
        }),
        protocol: l.protocol.as_str(),
        first_packet_timeout: (l.protocol != Protocol::None)
            .then(|| format_duration(Some(l.first_packet_timeout))),
        keepalive: l.keepalive.map(|k| KeepaliveOut {
            idle: format_duration(Some(k.idle)),
            interval: format_duration(Some(k.interval)),
            count: k.count,
        }),
        user_timeout: format_duration(l.user_timeout),
        pool: l.routes.is_empty().then(|| pool(None, &l.pool)),
        route: l
            .routes
            .iter()
            .map(|r| Route {
                server_name: r.server_name.clone(),
                alpn: r.alpn.clone(),
                database: r.database.clone(),
                user: r.user.clone(),
                pool: r.pool.clone(),
            })
            .collect(),
    }
}

/// The effective config as a TOML document.
pub fn effective_toml(config: &Config) -> String {
    let file = File {
        admin: config.ops.admin.map(|a| a.to_string()),
        global: Global {
            workers: config.workers,
            event_loop: config.event_loop.as_str(),
            max_conns: config.max_relays,
            pipe_size: format_size(config.pipe_size),
            max_pipes: config.max_pipes_per_worker,
            pipe_budget: format_size(config.pipe_budget),
            drain_timeout: format_duration(config.drain_timeout),
            stats_group: config.ops.stats_group.as_ref().map(|g| g.name.clone()),
        },
        pool: config
            .pools
            .iter()
            .map(|p| pool(Some(&p.name), &p.config))
            .collect(),
        listener: config.listeners.iter().map(listener).collect(),
    };
    // Serialising plain strings, numbers and tables cannot fail.
    toml::to_string_pretty(&file).unwrap_or_else(|e| format!("# cannot show the config: {e}\n"))
}
