//! The config file (TOML): read with toml's spanned document tree so that
//! every problem, not just the first, is reported with its key and line.
//!
//! Each table has one reader that walks its keys once: a known key is
//! converted (and checked), an unknown one is an error. Keys a listener can
//! inherit from `[defaults]` are read by one shared function, so both
//! places accept exactly the same spelling.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::*;

/// One problem in a config file, at a line, naming the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based; 0 when the problem has no place (an unreadable file).
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 if self.key.is_empty() => f.write_str(&self.message),
            0 => write!(f, "{}: {}", self.key, self.message),
            n => write!(f, "line {n}: {}: {}", self.key, self.message),
        }
    }
}

/// A valid config file, and the keys it uses that `spliced run` cannot
/// carry out yet (each is refused by `run`, reported as a note by `check`).
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    pub unsupported: Vec<Diagnostic>,
}

/// Settings given as command-line flags, which replace the file's
/// `[defaults]` (a listener that sets a key itself keeps its own).
#[derive(Clone, Debug, Default)]
pub struct FlagDefaults {
    pub mode: Option<Mode>,
    pub idle_timeout: Option<Option<Duration>>,
    pub fin_timeout: Option<Option<Duration>>,
    pub connect_timeout: Option<Option<Duration>>,
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path, flags: &FlagDefaults) -> Result<Loaded, Vec<Diagnostic>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic {
            line: 0,
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }]
    })?;
    parse_str(&text, flags)
}

/// Parses and validates a config file's text.
pub fn parse_str(text: &str, flags: &FlagDefaults) -> Result<Loaded, Vec<Diagnostic>> {
    let mut cx = Cx::new(text);
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let line = e.span().map_or(0, |s| cx.line(&s));
            let message = e.message().trim().replace('\n', "; ");
            return Err(vec![Diagnostic {
                line,
                key: "(syntax)".into(),
                message,
            }]);
        }
    };
    let config = read_root(&mut cx, root.get_ref(), flags);
    match config {
        Some(config) if cx.errors.is_empty() => Ok(Loaded {
            config,
            unsupported: cx.unsupported,
        }),
        _ => {
            cx.errors.sort_by_key(|d| d.line);
            Err(cx.errors)
        }
    }
}

type Value<'i> = Spanned<DeValue<'i>>;

struct Cx {
    line_starts: Vec<usize>,
    errors: Vec<Diagnostic>,
    unsupported: Vec<Diagnostic>,
}

impl Cx {
    fn new(text: &str) -> Cx {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Cx {
            line_starts,
            errors: Vec::new(),
            unsupported: Vec::new(),
        }
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.line_starts.partition_point(|&s| s <= span.start)
    }

    fn error(&mut self, span: &Range<usize>, key: &str, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            line: self.line(span),
            key: key.into(),
            message: message.into(),
        });
    }

    fn unsupported(&mut self, span: &Range<usize>, key: &str, what: &str) {
        self.unsupported.push(Diagnostic {
            line: self.line(span),
            key: key.into(),
            message: format!("{what} is not supported by `spliced run` yet"),
        });
    }

    fn unknown(&mut self, key: &Spanned<std::borrow::Cow<str>>, path: &str, known: &[&str]) {
        self.error(
            &key.span(),
            &join(path, key.get_ref()),
            format!("unknown key (expected one of: {})", known.join(", ")),
        );
    }

    // Typed values. Each returns None after recording an error.

    fn table<'a, 'i>(&mut self, v: &'a Value<'i>, key: &str) -> Option<&'a DeTable<'i>> {
        let t = v.get_ref().as_table();
        if t.is_none() {
            self.error(
                &v.span(),
                key,
                format!("expected a table, found {}", v.get_ref().type_str()),
            );
        }
        t
    }

    fn string<'a>(&mut self, v: &'a Value<'_>, key: &str) -> Option<&'a str> {
        let s = v.get_ref().as_str();
        if s.is_none() {
            self.error(
                &v.span(),
                key,
                format!("expected a string, found {}", v.get_ref().type_str()),
            );
        }
        s
    }

    fn boolean(&mut self, v: &Value<'_>, key: &str) -> Option<bool> {
        let b = v.get_ref().as_bool();
        if b.is_none() {
            self.error(&v.span(), key, "expected true or false");
        }
        b
    }

    fn uint(&mut self, v: &Value<'_>, key: &str, min: u64, max: u64) -> Option<u64> {
        let n = v
            .get_ref()
            .as_integer()
            .and_then(|i| i.as_str().replace('_', "").parse::<i64>().ok());
        match n {
            Some(n) if n >= min as i64 && n as u64 <= max => Some(n as u64),
            Some(n) => {
                self.error(
                    &v.span(),
                    key,
                    format!("{n} is out of range ({min} to {max})"),
                );
                None
            }
            None => {
                self.error(&v.span(), key, "expected a whole number");
                None
            }
        }
    }

    fn choice<T>(
        &mut self,
        v: &Value<'_>,
        key: &str,
        parse: fn(&str) -> Option<T>,
        choices: &[&str],
    ) -> Option<T> {
        let s = self.string(v, key)?;
        let t = parse(s);
        if t.is_none() {
            self.error(
                &v.span(),
                key,
                format!("unknown value '{s}' (expected {})", choices.join(", ")),
            );
        }
        t
    }

    /// A duration with a unit; `0` (string or number) disables it.
    fn duration(&mut self, v: &Value<'_>, key: &str) -> Option<Option<Duration>> {
        match v.get_ref() {
            DeValue::String(s) => match parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.error(&v.span(), key, e);
                    None
                }
            },
            DeValue::Integer(i) if i.as_str() == "0" => Some(None),
            DeValue::Integer(i) => {
                let n = i.as_str();
                self.error(
                    &v.span(),
                    key,
                    format!(
                        "{n} is a bare number: a duration needs a unit, e.g. \"{n}s\" or \"{n}ms\""
                    ),
                );
                None
            }
            other => {
                self.error(
                    &v.span(),
                    key,
                    format!(
                        "expected a duration such as \"30s\", found {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    /// A duration that must be set (not 0).
    fn positive_duration(&mut self, v: &Value<'_>, key: &str) -> Option<Duration> {
        match self.duration(v, key)? {
            Some(d) => Some(d),
            None => {
                self.error(&v.span(), key, "must be longer than 0");
                None
            }
        }
    }

    fn size(&mut self, v: &Value<'_>, key: &str) -> Option<usize> {
        let parsed = match v.get_ref() {
            DeValue::String(s) => parse_size(s),
            DeValue::Integer(i) => parse_size(i.as_str()),
            other => Err(format!(
                "expected a size such as \"1m\", found {}",
                other.type_str()
            )),
        };
        parsed.map_err(|e| self.error(&v.span(), key, e)).ok()
    }

    /// A string or an array of strings.
    fn strings<'a>(&mut self, v: &'a Value<'_>, key: &str) -> Vec<(&'a str, Range<usize>)> {
        match v.get_ref() {
            DeValue::String(s) => vec![(s.as_ref(), v.span())],
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let s = self.string(item, &format!("{key}[{i}]"))?;
                    Some((s, item.span()))
                })
                .collect(),
            other => {
                self.error(
                    &v.span(),
                    key,
                    format!("expected a list of strings, found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    fn cidrs(&mut self, v: &Value<'_>, key: &str) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for (i, (text, span)) in self.strings(v, key).into_iter().enumerate() {
            match text.parse::<IpNet>() {
                Ok(net) => nets.push(net),
                // A bare address is a network of one.
                Err(_) => match text.parse::<std::net::IpAddr>() {
                    Ok(ip) => nets.push(IpNet::from(ip)),
                    Err(_) => self.error(
                        &span,
                        &format!("{key}[{i}]"),
                        format!("'{text}' is not a CIDR network (e.g. 10.0.0.0/8 or fd00::/8)"),
                    ),
                },
            }
        }
        nets
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Keys a listener may set itself or inherit from `[defaults]`.
#[derive(Clone, Debug, Default)]
struct Inherited {
    mode: Option<Mode>,
    idle: Option<Option<Duration>>,
    fin: Option<Option<Duration>>,
    connect: Option<Option<Duration>>,
    max_conns: Option<usize>,
    max_conns_per_source: Option<usize>,
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
    "keepalive",
    "user-timeout",
];

impl Inherited {
    /// Reads `name` if it is an inheritable key; false if it is not one.
    fn read(&mut self, cx: &mut Cx, name: &str, v: &Value<'_>, key: &str) -> bool {
        const MAX: u64 = 1 << 32;
        match name {
            "mode" => self.mode = cx.choice(v, key, |s| s.parse().ok(), &["splice", "copy"]),
            "idle-timeout" => self.idle = cx.duration(v, key),
            "fin-timeout" => self.fin = cx.duration(v, key),
            "connect-timeout" => self.connect = cx.duration(v, key),
            "user-timeout" => self.user_timeout = cx.duration(v, key),
            "max-conns" => self.max_conns = cx.uint(v, key, 1, MAX).map(|n| n as usize),
            "max-conns-per-source" => {
                self.max_conns_per_source = cx.uint(v, key, 1, MAX).map(|n| n as usize)
            }
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
        match k.get_ref().as_ref() {
            "idle" => idle = cx.positive_duration(v, &path),
            "interval" => interval = cx.positive_duration(v, &path),
            "count" => count = cx.uint(v, &path, 1, 127).map(|n| n as u32),
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

fn read_root(cx: &mut Cx, root: &DeTable<'_>, flags: &FlagDefaults) -> Option<Config> {
    let mut config = Config::single(([127, 0, 0, 1], 0).into(), Vec::new(), Mode::Splice);
    config.listeners.clear();
    let mut defaults = Inherited::default();
    let mut listeners = None;
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
            _ => cx.unknown(k, "", &["global", "defaults", "listener"]),
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
    let mut addresses: Vec<(SocketAddr, String, usize)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(table) = cx.table(item, &format!("listener[{i}]")) else {
            continue;
        };
        if let Some(l) = read_listener(cx, table, i, &item.span(), &defaults) {
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
            for &addr in &l.listen {
                if let Some((other, owner, at)) =
                    addresses.iter().find(|(a, ..)| overlaps(*a, addr))
                {
                    cx.error(
                        &listen_span,
                        &format!("listener[{}].listen", l.name),
                        format!("{addr} overlaps {other} of listener '{owner}' (line {at})"),
                    );
                }
                addresses.push((addr, l.name.clone(), line));
            }
            config.listeners.push(l);
        }
    }
    Some(config)
}

/// Two listen addresses that cannot both be bound: equal, or a wildcard
/// and an address of the same family and port. Port 0 never collides.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn read_global(cx: &mut Cx, v: &Value<'_>, config: &mut Config) {
    let Some(t) = cx.table(v, "global") else {
        return;
    };
    let known = [
        "workers",
        "max-conns",
        "pipe-size",
        "max-pipes",
        "pipe-budget",
        "drain-timeout",
    ];
    for (k, v) in t.iter() {
        let key = join("global", k.get_ref());
        match k.get_ref().as_ref() {
            "workers" => {
                if let Some(n) = cx.uint(v, &key, 1, 1024) {
                    config.workers = n as usize;
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
) -> Option<ListenerConfig> {
    let name = t
        .get("name")
        .and_then(|v| v.get_ref().as_str())
        .map(str::to_string);
    let path = format!(
        "listener[{}]",
        name.as_deref().unwrap_or(&index.to_string())
    );
    let known: Vec<&str> = ["name", "listen", "allow", "deny", "accept-proxy", "pool"]
        .into_iter()
        .chain(INHERITED.iter().copied())
        .collect();
    let mut own = Inherited::default();
    let mut listen = Vec::new();
    let mut listen_seen = false;
    let mut access = Access::default();
    let mut accept_proxy = None;
    let mut pool = None;
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
                    for (k2, v2) in at.iter() {
                        match k2.get_ref().as_ref() {
                            "trusted" => trusted = cx.cidrs(v2, &join(&key, "trusted")),
                            _ => cx.unknown(k2, &key, &["trusted"]),
                        }
                    }
                    if trusted.is_empty() {
                        cx.error(
                            &v.span(),
                            &key,
                            "trusted lists no source: PROXY headers would be accepted from nobody",
                        );
                    }
                    cx.unsupported(&v.span(), &key, "reading PROXY headers (accept-proxy)");
                    accept_proxy = Some(AcceptProxy { trusted });
                }
            }
            "pool" => pool = read_pool(cx, v, &key),
            _ => cx.unknown(k, &path, &known),
        }
    }
    let Some(name) = name else {
        cx.error(span, &path, "missing key 'name'");
        return None;
    };
    if !listen_seen {
        cx.error(span, &path, "missing key 'listen'");
    }
    let Some(pool) = pool else {
        if !t.contains_key("pool") {
            cx.error(
                span,
                &join(&path, "pool"),
                "missing [listener.pool] with at least one server",
            );
        }
        return None;
    };
    let s = own.over(defaults);
    let base = Timeouts::default();
    Some(ListenerConfig {
        name,
        listen,
        pool,
        mode: s.mode.unwrap_or(Mode::Splice),
        timeouts: Timeouts {
            idle: s.idle.unwrap_or(base.idle),
            fin: s.fin.unwrap_or(base.fin),
            connect: s.connect.unwrap_or(base.connect),
        },
        max_conns: s.max_conns,
        max_conns_per_source: s.max_conns_per_source,
        access,
        accept_proxy,
        keepalive: s.keepalive,
        user_timeout: s.user_timeout.flatten(),
    })
}

fn read_pool(cx: &mut Cx, v: &Value<'_>, path: &str) -> Option<PoolConfig> {
    let t = cx.table(v, path)?;
    let mut pool = PoolConfig::new(Vec::new());
    let known = [
        "balance",
        "retries",
        "on-down",
        "resolve-interval",
        "send-proxy",
        "servers",
        "health",
    ];
    let mut servers_seen = false;
    for (k, v) in t.iter() {
        let key = join(path, k.get_ref());
        match k.get_ref().as_ref() {
            "balance" => {
                if let Some(b) = cx.choice(v, &key, Balance::parse, Balance::CHOICES) {
                    pool.balance = b;
                }
            }
            "retries" => pool.retries = cx.uint(v, &key, 0, 1000).map(|n| n as usize),
            "on-down" => {
                if let Some(o) = cx.choice(v, &key, OnDown::parse, OnDown::CHOICES) {
                    if o == OnDown::Kill {
                        cx.unsupported(
                            &v.span(),
                            &key,
                            "resetting a down server's relays (on-down = \"kill\")",
                        );
                    }
                    pool.on_down = o;
                }
            }
            "resolve-interval" => {
                if let Some(d) = cx.duration(v, &key) {
                    pool.resolve_interval = d;
                }
            }
            "send-proxy" => {
                if let Some(p) = cx.choice(v, &key, SendProxy::parse, SendProxy::CHOICES) {
                    if p != SendProxy::None {
                        cx.unsupported(&v.span(), &key, "sending PROXY headers (send-proxy)");
                    }
                    pool.send_proxy = p;
                }
            }
            "servers" => {
                servers_seen = true;
                read_servers(cx, v, &key, &mut pool.servers);
                if pool.servers.is_empty() && !cx.errors.iter().any(|d| d.key.starts_with(&key)) {
                    cx.error(
                        &v.span(),
                        &key,
                        "the pool is empty: list at least one server",
                    );
                }
            }
            "health" => {
                if let Some(h) = read_health(cx, v, &key) {
                    pool.health = h;
                }
            }
            _ => cx.unknown(k, path, &known),
        }
    }
    if !servers_seen {
        cx.error(
            &v.span(),
            &join(path, "servers"),
            "the pool is empty: list at least one server",
        );
    }
    Some(pool)
}

fn read_servers(cx: &mut Cx, v: &Value<'_>, path: &str, out: &mut Vec<ServerConfig>) {
    let DeValue::Array(items) = v.get_ref() else {
        cx.error(
            &v.span(),
            path,
            "expected a list of { address = \"HOST:PORT\" } tables",
        );
        return;
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let mut server = ServerConfig::new(String::new());
        let entry = match item.get_ref() {
            // A bare string is a server with the defaults.
            DeValue::String(s) => {
                server.address = s.to_string();
                Some(())
            }
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    let key = join(&at, k.get_ref());
                    match k.get_ref().as_ref() {
                        "address" => {
                            if let Some(s) = cx.string(v, &key) {
                                server.address = s.to_string();
                            }
                        }
                        "weight" => {
                            if let Some(w) = cx.uint(v, &key, 1, MAX_WEIGHT as u64) {
                                server.weight = w as u32;
                            }
                        }
                        "backup" => {
                            if let Some(b) = cx.boolean(v, &key) {
                                server.backup = b;
                            }
                        }
                        _ => cx.unknown(k, &at, &["address", "weight", "backup"]),
                    }
                }
                Some(())
            }
            other => {
                cx.error(
                    &item.span(),
                    &at,
                    format!(
                        "expected {{ address = \"HOST:PORT\" }}, found {}",
                        other.type_str()
                    ),
                );
                None
            }
        };
        if entry.is_none() {
            continue;
        }
        if server.address.is_empty() {
            cx.error(&item.span(), &at, "missing key 'address'");
            continue;
        }
        if let Err(e) = server.host_port() {
            cx.error(&item.span(), &join(&at, "address"), e);
            continue;
        }
        let line = cx.line(&item.span());
        if let Some(first) = seen.insert(server.address.clone(), line) {
            cx.error(
                &item.span(),
                &join(&at, "address"),
                format!("{} is already listed on line {first}", server.address),
            );
            continue;
        }
        out.push(server);
    }
}

fn read_health(cx: &mut Cx, v: &Value<'_>, path: &str) -> Option<HealthConfig> {
    let t = cx.table(v, path)?;
    let mut h = HealthConfig::default();
    let known = [
        "check",
        "interval",
        "timeout",
        "rise",
        "fall",
        "role",
        "user",
        "password-file",
        "database",
        "port",
        "path",
    ];
    // Keys that only mean something to an active check.
    let mut active_only: Vec<(String, Range<usize>)> = Vec::new();
    for (k, v) in t.iter() {
        let name = k.get_ref().as_ref();
        let key = join(path, name);
        // `interval` also paces passive health's retries of a down server.
        if !matches!(name, "check" | "fall" | "interval") && known.contains(&name) {
            active_only.push((key.clone(), v.span()));
        }
        match name {
            "check" => {
                h.check = cx.choice(v, &key, Check::parse, Check::CHOICES);
                if h.check.is_some() {
                    cx.unsupported(&v.span(), &key, "active health checking (health.check)");
                }
            }
            "interval" => h.interval = cx.positive_duration(v, &key).unwrap_or(h.interval),
            "timeout" => h.timeout = cx.positive_duration(v, &key).unwrap_or(h.timeout),
            "rise" => h.rise = cx.uint(v, &key, 1, 100).map_or(h.rise, |n| n as u32),
            "fall" => h.fall = cx.uint(v, &key, 1, 100).map_or(h.fall, |n| n as u32),
            "role" => {
                h.role = cx
                    .choice(v, &key, Role::parse, Role::CHOICES)
                    .unwrap_or(h.role)
            }
            "user" => h.user = cx.string(v, &key).map(str::to_string),
            "password-file" => h.password_file = cx.string(v, &key).map(str::to_string),
            "database" => h.database = cx.string(v, &key).map(str::to_string),
            "port" => h.port = cx.uint(v, &key, 1, 65535).map(|n| n as u16),
            "path" => {
                h.path = cx.string(v, &key).map(str::to_string);
                if h.path.as_deref().is_some_and(|p| !p.starts_with('/')) {
                    cx.error(&v.span(), &key, "must start with '/'");
                }
            }
            _ => cx.unknown(k, path, &known),
        }
    }
    match h.check {
        None if !t.contains_key("check") => {
            for (key, span) in &active_only {
                cx.error(
                    span,
                    key,
                    "only applies to an active check: set health.check too",
                );
            }
        }
        Some(Check::Http) if h.role != Role::Any => {
            let span = t.get("role").map_or(v.span(), |r| r.span());
            cx.error(
                &span,
                &join(path, "role"),
                "an http check takes the role from its path (e.g. path = \"/primary\")",
            );
        }
        Some(Check::Tcp) if h.role != Role::Any => {
            let span = t.get("role").map_or(v.span(), |r| r.span());
            cx.error(
                &span,
                &join(path, "role"),
                "a tcp check cannot tell roles: use redis, postgres, mysql or http",
            );
        }
        Some(Check::Postgres | Check::Mysql) if h.role != Role::Any && h.user.is_none() => {
            cx.error(
                &v.span(),
                &join(path, "user"),
                "a role check logs in: set user (and password-file if needed)",
            );
        }
        _ => {}
    }
    if h.check != Some(Check::Http) {
        for k in ["port", "path"] {
            if let Some(v) = t.get(k) {
                if h.check.is_some() {
                    cx.error(
                        &v.span(),
                        &join(path, k),
                        "only applies to check = \"http\"",
                    );
                }
            }
        }
    }
    if h.timeout > h.interval {
        cx.error(
            &v.span(),
            &join(path, "timeout"),
            "is longer than interval: probes would overlap",
        );
    }
    Some(h)
}
