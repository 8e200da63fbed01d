//! The top of the file, `[global]`, `[defaults]` and each `[[listener]]`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::de::{DeTable, DeValue};

use super::pool::{read_named_pool, read_pool};
use super::route::{check_pool_names, check_routes, read_routes, ReadRoute};
use super::values::{join, Cx, Value};
use super::FlagDefaults;
use crate::config::listen;
use crate::config::*;

/// Keys a listener may set itself or inherit from `[defaults]`.
#[derive(Clone, Debug, Default)]
struct Inherited {
    mode: Option<Mode>,
    idle: Option<Option<Duration>>,
    fin: Option<Option<Duration>>,
    connect: Option<Option<Duration>>,
    max_conns: Option<usize>,
    max_conns_per_source: Option<usize>,
    max_queued: Option<usize>,
    keepalive: Option<Keepalive>,
    user_timeout: Option<Option<Duration>>,
}

const INHERITED: &[&str] = &[
    "mode",
    "idle-timeout",
    "fin-timeout",
    "connect-timeout",
    "max-conns",
    "max-conns-per-source",
    "max-queued",
    "keepalive",
    "user-timeout",
];

impl Inherited {
    /// Reads `name` if it is an inheritable key; false if it is not one.
    fn read(&mut self, cx: &mut Cx, name: &str, v: &Value<'_>, key: &str) -> bool {
        const MAX: u64 = 1 << 32;
        match name {
            "mode" => {
                self.mode = cx.choice(v, key, |s| s.parse().ok(), &["splice", "copy", "auto"])
            }
            "idle-timeout" => self.idle = cx.duration(v, key),
            "fin-timeout" => self.fin = cx.duration(v, key),
            "connect-timeout" => self.connect = cx.duration(v, key),
            "user-timeout" => {
                self.user_timeout = cx.duration(v, key);
                if let Some(Some(d)) = self.user_timeout {
                    if let Some(problem) = user_timeout_problem(d) {
                        cx.error(&v.span(), key, problem);
                        self.user_timeout = None;
                    }
                }
            }
            "max-conns" => self.max_conns = cx.uint(v, key, 1, MAX).map(|n| n as usize),
            "max-conns-per-source" => {
                self.max_conns_per_source = cx.uint(v, key, 1, MAX).map(|n| n as usize)
            }
            "max-queued" => self.max_queued = cx.uint(v, key, 1, MAX).map(|n| n as usize),
            "keepalive" => self.keepalive = read_keepalive(cx, v, key),
            _ => return false,
        }
        true
    }

    /// `self` over `under`: what a listener sets wins over the defaults.
    fn over(self, under: &Inherited) -> Inherited {
        Inherited {
            mode: self.mode.or(under.mode),
            idle: self.idle.or(under.idle),
            fin: self.fin.or(under.fin),
            connect: self.connect.or(under.connect),
            max_conns: self.max_conns.or(under.max_conns),
            max_conns_per_source: self.max_conns_per_source.or(under.max_conns_per_source),
            max_queued: self.max_queued.or(under.max_queued),
            keepalive: self.keepalive.or(under.keepalive),
            user_timeout: self.user_timeout.or(under.user_timeout),
        }
    }
}

fn read_keepalive(cx: &mut Cx, v: &Value<'_>, key: &str) -> Option<Keepalive> {
    let table = cx.table(v, key)?;
    let (mut idle, mut interval, mut count) = (None, None, None);
    let known = ["idle", "interval", "count"];
    for (k, v) in table.iter() {
        let path = join(key, k.get_ref());
        // What the kernel refuses is refused here, with its line: else
        // every relay would run without keepalive.
        let mut secs = |option| {
            let d = cx.positive_duration(v, &path)?;
            match keepalive_secs_problem(d, option) {
                Some(problem) => {
                    cx.error(&v.span(), &path, problem);
                    None
                }
                None => Some(d),
            }
        };
        match k.get_ref().as_ref() {
            "idle" => idle = secs("TCP_KEEPIDLE"),
            "interval" => interval = secs("TCP_KEEPINTVL"),
            "count" => {
                count = cx
                    .uint(v, &path, 1, MAX_KEEPALIVE_COUNT.into())
                    .map(|n| n as u32)
            }
            _ => cx.unknown(k, key, &known),
        }
    }
    let default = Keepalive {
        idle: Duration::from_secs(60),
        interval: Duration::from_secs(10),
        count: 3,
    };
    Some(Keepalive {
        idle: idle.unwrap_or(default.idle),
        interval: interval.unwrap_or(default.interval),
        count: count.unwrap_or(default.count),
    })
}

pub(super) fn read_root(cx: &mut Cx, root: &DeTable<'_>, flags: &FlagDefaults) -> Option<Config> {
    let mut config = Config::single(([127, 0, 0, 1], 0).into(), Vec::new(), Mode::Splice);
    config.listeners.clear();
    let mut defaults = Inherited::default();
    let mut listeners = None;
    let mut pools = None;
    for (k, v) in root.iter() {
        let name = k.get_ref().as_ref();
        match name {
            "defaults" => {
                if let Some(t) = cx.table(v, name) {
                    for (k, v) in t.iter() {
                        let key = join("defaults", k.get_ref());
                        if !defaults.read(cx, k.get_ref(), v, &key) {
                            cx.unknown(k, "defaults", INHERITED);
                        }
                    }
                }
            }
            "global" => read_global(cx, v, &mut config),
            "listener" => listeners = Some(v),
            "pool" => pools = Some(v),
            "admin" => {
                if let Some(text) = cx.string(v, "admin") {
                    match crate::config::resolve(text) {
                        Ok(addrs) => config.ops.admin = addrs.first().copied(),
                        Err(e) => cx.error(&v.span(), "admin", e),
                    }
                }
            }
            _ => cx.unknown(k, "", &["admin", "global", "defaults", "pool", "listener"]),
        }
    }
    let flagged = Inherited {
        mode: flags.mode,
        idle: flags.idle_timeout,
        fin: flags.fin_timeout,
        connect: flags.connect_timeout,
        ..Inherited::default()
    };
    let defaults = flagged.over(&defaults);
    if let Some(v) = pools {
        read_pools(cx, v, &mut config);
    }
    let Some(listeners) = listeners else {
        cx.error(
            &(0..0),
            "listener",
            "no [[listener]] table: a config needs at least one",
        );
        return None;
    };
    let DeValue::Array(items) = listeners.get_ref() else {
        cx.error(
            &listeners.span(),
            "listener",
            "expected [[listener]] tables",
        );
        return None;
    };
    let mut names: HashMap<String, usize> = HashMap::new();
    // (as written, as bound, listener, line) of every address so far.
    let mut addresses: Vec<(SocketAddr, SocketAddr, String, usize)> = Vec::new();
    let v6only = listen::bindv6only();
    for (i, item) in items.iter().enumerate() {
        let Some(table) = cx.table(item, &format!("listener[{i}]")) else {
            continue;
        };
        let (read, routes) = read_listener(cx, table, i, &item.span(), &defaults);
        check_pool_names(cx, &config.pools, &routes);
        if let Some(l) = read {
            let span_of = |key: &str| table.get(key).map_or(item.span(), |v| v.span());
            let (name_span, listen_span) = (span_of("name"), span_of("listen"));
            let line = cx.line(&name_span);
            if let Some(first) = names.insert(l.name.clone(), line) {
                cx.error(
                    &name_span,
                    &format!("listener[{}].name", l.name),
                    format!("the name is already used by the listener on line {first}"),
                );
            }
            let line = cx.line(&listen_span);
            let key = format!("listener[{}].listen", l.name);
            let dual = listen::dual_stack(&l.listen, v6only);
            for &addr in &l.listen {
                // A mapped address an IPv6-only socket cannot bind is
                // reported as an overlap if it is one, since that is what
                // the user must change.
                let bindable = listen::claims(addr, dual);
                let claims = bindable.clone().or_else(|| listen::claims(addr, true));
                let claims = claims.unwrap_or_default();
                let clash = addresses.iter().find_map(|(other, taken, owner, at)| {
                    let c = claims.iter().find(|&&c| listen::overlaps(*taken, c))?;
                    Some((other, *taken, *c, owner, at))
                });
                if let Some((other, taken, claimed, owner, at)) = clash {
                    let wide = |written: &SocketAddr, bound: SocketAddr| {
                        written.is_ipv6() && written.ip().is_unspecified() && bound.is_ipv4()
                    };
                    let why = if wide(&addr, claimed) || wide(other, taken) {
                        ": a [::] takes IPv4 too where its listener has no IPv4 address (and net.ipv6.bindv6only is 0)"
                    } else {
                        ""
                    };
                    cx.error(
                        &listen_span,
                        &key,
                        format!("{addr} overlaps {other} of listener '{owner}' (line {at}){why}"),
                    );
                } else if bindable.is_none() {
                    cx.error(
                        &listen_span,
                        &key,
                        format!(
                            "{addr} is IPv4-mapped, which an IPv6-only socket cannot bind ({}): write it as {}",
                            if v6only { "net.ipv6.bindv6only is 1" } else { "this listener also has IPv4 addresses" },
                            SocketAddr::from((canonical_v4(addr), addr.port()))
                        ),
                    );
                }
                for c in claims {
                    addresses.push((addr, c, l.name.clone(), line));
                }
            }
            config.listeners.push(l);
        }
    }
    // Every name was checked above, with its line.
    let _ = config.link_pools();
    Some(config)
}

/// The `[[pool]]` tables: named pools, each name once.
fn read_pools(cx: &mut Cx, v: &Value<'_>, config: &mut Config) {
    let DeValue::Array(items) = v.get_ref() else {
        cx.error(&v.span(), "pool", "expected [[pool]] tables");
        return;
    };
    let mut lines: HashMap<String, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let Some(p) = read_named_pool(cx, item, i) else {
            continue;
        };
        let span = item
            .get_ref()
            .as_table()
            .and_then(|t| t.get("name"))
            .map_or(item.span(), |n| n.span());
        let line = cx.line(&span);
        if let Some(first) = lines.insert(p.name.clone(), line) {
            cx.error(
                &span,
                &format!("pool[{}].name", p.name),
                format!("the name is already used by the pool on line {first}"),
            );
            continue;
        }
        config.pools.push(p);
    }
}

/// The IPv4 address an IPv4-mapped one stands for (else unspecified).
fn canonical_v4(addr: SocketAddr) -> std::net::Ipv4Addr {
    match addr {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped(),
        SocketAddr::V4(v4) => Some(*v4.ip()),
    }
    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)
}

fn read_global(cx: &mut Cx, v: &Value<'_>, config: &mut Config) {
    let Some(t) = cx.table(v, "global") else {
        return;
    };
    let known = [
        "workers",
        "loop",
        "max-conns",
        "pipe-size",
        "max-pipes",
        "pipe-budget",
        "drain-timeout",
        "stats-group",
    ];
    for (k, v) in t.iter() {
        let key = join("global", k.get_ref());
        match k.get_ref().as_ref() {
            "workers" => {
                if let Some(n) = cx.uint(v, &key, 1, 1024) {
                    config.workers = n as usize;
                }
            }
            "loop" => {
                if let Some(name) = cx.string(v, &key) {
                    match name.parse() {
                        Ok(event_loop) => config.event_loop = event_loop,
                        Err(e) => cx.error(&v.span(), &key, e),
                    }
                }
            }
            "max-conns" => config.max_relays = cx.uint(v, &key, 1, 1 << 32).map(|n| n as usize),
            "pipe-size" => {
                if let Some(n) = cx.size(v, &key) {
                    config.pipe_size = n;
                }
            }
            "max-pipes" => {
                if let Some(n) = cx.uint(v, &key, 0, 1 << 32) {
                    config.max_pipes_per_worker = n as usize;
                }
            }
            "pipe-budget" => {
                if let Some(n) = cx.size(v, &key) {
                    config.pipe_budget = n;
                }
            }
            "drain-timeout" => {
                if let Some(d) = cx.duration(v, &key) {
                    config.drain_timeout = d;
                }
            }
            "stats-group" => {
                if let Some(name) = cx.string(v, &key) {
                    match crate::ops::StatsGroup::lookup(name) {
                        Ok(group) => config.ops.stats_group = Some(group),
                        Err(e) => cx.error(&v.span(), &key, e),
                    }
                }
            }
            _ => cx.unknown(k, "global", &known),
        }
    }
}

fn read_listener(
    cx: &mut Cx,
    t: &DeTable<'_>,
    index: usize,
    span: &Range<usize>,
    defaults: &Inherited,
) -> (Option<ListenerConfig>, Vec<ReadRoute>) {
    let name = t
        .get("name")
        .and_then(|v| v.get_ref().as_str())
        .map(str::to_string);
    let path = format!(
        "listener[{}]",
        name.as_deref().unwrap_or(&index.to_string())
    );
    let known: Vec<&str> = [
        "name",
        "listen",
        "allow",
        "deny",
        "accept-proxy",
        "protocol",
        "first-packet-timeout",
        "pool",
        "route",
    ]
    .into_iter()
    .chain(INHERITED.iter().copied())
    .collect();
    let mut own = Inherited::default();
    let mut listen = Vec::new();
    let mut listen_seen = false;
    let mut access = Access::default();
    let mut accept_proxy = None;
    let mut protocol = Protocol::None;
    let mut first_packet_timeout = None;
    let mut pool = None;
    let mut routes: Vec<ReadRoute> = Vec::new();
    for (k, v) in t.iter() {
        let name_k = k.get_ref().as_ref();
        let key = join(&path, name_k);
        if own.read(cx, name_k, v, &key) {
            continue;
        }
        match name_k {
            "name" => {
                if let Some(s) = cx.string(v, &key) {
                    if s.trim().is_empty() || s.chars().any(char::is_control) {
                        cx.error(
                            &v.span(),
                            &key,
                            "must be a non-empty name without control characters",
                        );
                    }
                }
            }
            "listen" => {
                listen_seen = true;
                for (i, (text, span)) in cx.strings(v, &key).into_iter().enumerate() {
                    match resolve_listen(text) {
                        Ok(addrs) => listen.extend(addrs),
                        Err(e) => cx.error(&span, &format!("{key}[{i}]"), e),
                    }
                }
                if listen.is_empty() && !cx.errors.iter().any(|d| d.key.starts_with(&key)) {
                    cx.error(&v.span(), &key, "no address to listen on");
                }
            }
            "allow" => access.allow = cx.cidrs(v, &key),
            "deny" => access.deny = cx.cidrs(v, &key),
            "accept-proxy" => {
                if let Some(at) = cx.table(v, &key) {
                    let mut trusted = Vec::new();
                    let mut timeout = AcceptProxy::DEFAULT_TIMEOUT;
                    for (k2, v2) in at.iter() {
                        match k2.get_ref().as_ref() {
                            "trusted" => trusted = cx.cidrs(v2, &join(&key, "trusted")),
                            "timeout" => {
                                if let Some(d) = cx.positive_duration(v2, &join(&key, "timeout")) {
                                    timeout = d;
                                }
                            }
                            _ => cx.unknown(k2, &key, &["trusted", "timeout"]),
                        }
                    }
                    if trusted.is_empty() {
                        cx.error(
                            &v.span(),
                            &key,
                            "trusted lists no source: PROXY headers would be accepted from nobody",
                        );
                    }
                    accept_proxy = Some(AcceptProxy { trusted, timeout });
                }
            }
            "protocol" => {
                if let Some(p) = cx.choice(v, &key, Protocol::parse, Protocol::CHOICES) {
                    protocol = p;
                }
            }
            "first-packet-timeout" => {
                first_packet_timeout = cx.positive_duration(v, &key).map(|d| (d, v.span()));
            }
            "pool" => pool = read_pool(cx, v, &key, false),
            "route" => routes = read_routes(cx, v, &path),
            _ => cx.unknown(k, &path, &known),
        }
    }
    if let (Some((_, at)), Protocol::None) = (&first_packet_timeout, protocol) {
        cx.error(
            at,
            &join(&path, "first-packet-timeout"),
            "applies only with protocol = \"postgres\" or \"tls\" (nothing else reads a first packet)",
        );
    }
    check_routes(cx, protocol, &routes);
    let Some(name) = name else {
        cx.error(span, &path, "missing key 'name'");
        return (None, routes);
    };
    if !listen_seen {
        cx.error(span, &path, "missing key 'listen'");
    }
    if let (Some(_), Some(first)) = (t.get("pool"), routes.first()) {
        cx.error(
            &first.span,
            &join(&path, "route"),
            "a listener has either its own [listener.pool] or [[listener.route]] tables, not both",
        );
    }
    let pool = match pool {
        Some(pool) if routes.is_empty() => pool,
        Some(_) => return (None, routes),
        None if !routes.is_empty() => PoolConfig::new(Vec::new()),
        None => {
            if !t.contains_key("pool") && !t.contains_key("route") {
                cx.error(
                    span,
                    &join(&path, "pool"),
                    "missing [listener.pool] with at least one server (or [[listener.route]] tables leading to [[pool]]s)",
                );
            }
            return (None, routes);
        }
    };
    let s = own.over(defaults);
    let base = Timeouts::default();
    let config = ListenerConfig {
        name,
        listen,
        pool,
        routes: routes.iter().map(|r| r.route.clone()).collect(),
        route_pools: Vec::new(),
        mode: s.mode.unwrap_or(Mode::Splice),
        timeouts: Timeouts {
            idle: s.idle.unwrap_or(base.idle),
            fin: s.fin.unwrap_or(base.fin),
            connect: s.connect.unwrap_or(base.connect),
        },
        max_conns: s.max_conns,
        max_conns_per_source: s.max_conns_per_source,
        max_queued: s.max_queued,
        access,
        accept_proxy,
        protocol,
        first_packet_timeout: first_packet_timeout
            .map_or(crate::config::DEFAULT_FIRST_PACKET_TIMEOUT, |(d, _)| d),
        keepalive: s.keepalive,
        user_timeout: s.user_timeout.flatten(),
    };
    (Some(config), routes)
}
