//! `[listener.pool]` and `[[pool]]`, their servers and health tables.

use std::collections::HashMap;
use std::ops::Range;

use toml::de::DeValue;

use super::values::{join, Cx, Value};
use crate::config::*;

/// A `[[pool]]` table: `name` and every key of a `[listener.pool]`.
pub(super) fn read_named_pool(cx: &mut Cx, v: &Value<'_>, index: usize) -> Option<NamedPool> {
    let t = cx.table(v, &format!("pool[{index}]"))?;
    let name = match t.get("name") {
        Some(n) => {
            let name = cx.string(n, &format!("pool[{index}].name"))?;
            if name.trim().is_empty() || name.chars().any(char::is_control) {
                cx.error(
                    &n.span(),
                    &format!("pool[{index}].name"),
                    "must be a non-empty name without control characters",
                );
                return None;
            }
            name.to_string()
        }
        None => {
            cx.error(&v.span(), &format!("pool[{index}]"), "missing key 'name'");
            return None;
        }
    };
    let config = read_pool(cx, v, &format!("pool[{name}]"), true)?;
    Some(NamedPool { name, config })
}

/// A pool's table; `named`: a `[[pool]]`, whose `name` was read already.
pub(super) fn read_pool(cx: &mut Cx, v: &Value<'_>, path: &str, named: bool) -> Option<PoolConfig> {
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
        "queue-timeout",
    ];
    let mut servers_seen = false;
    for (k, v) in t.iter() {
        let key = join(path, k.get_ref());
        match k.get_ref().as_ref() {
            "name" if named => {}
            "balance" => {
                if let Some(b) = cx.choice(v, &key, Balance::parse, Balance::CHOICES) {
                    pool.balance = b;
                }
            }
            "retries" => pool.retries = cx.uint(v, &key, 0, 1000).map(|n| n as usize),
            "on-down" => {
                if let Some(o) = cx.choice(v, &key, OnDown::parse, OnDown::CHOICES) {
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
            "queue-timeout" => {
                if let Some(d) = cx.duration(v, &key) {
                    pool.queue_timeout = d;
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
                        "check-port" => {
                            server.check_port = cx.uint(v, &key, 1, 65535).map(|n| n as u16);
                        }
                        _ => cx.unknown(k, &at, &["address", "weight", "backup", "check-port"]),
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
        "max-lag",
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
            "max-lag" => {
                h.max_lag = cx.size(v, &key).map(|n| n as u64);
                if h.max_lag == Some(0) {
                    cx.error(&v.span(), &key, "must be positive");
                }
            }
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
        Some(c @ (Check::Tcp | Check::Mysql)) if h.role != Role::Any => {
            let span = t.get("role").map_or(v.span(), |r| r.span());
            cx.error(
                &span,
                &join(path, "role"),
                format!("a {c} check cannot tell roles: use redis, postgres or http"),
            );
        }
        Some(Check::Postgres) if h.role != Role::Any && h.user.is_none() => {
            cx.error(
                &v.span(),
                &join(path, "user"),
                "a role check logs in: set user (and password-file if needed)",
            );
        }
        _ => {}
    }
    if let Some(lag) = t.get("max-lag") {
        let lag_check = matches!(h.check, Some(Check::Postgres | Check::Redis));
        let lag_role = matches!(h.role, Role::Replica | Role::PreferReplica);
        if h.check.is_some() && !(lag_check && lag_role) {
            cx.error(
                &lag.span(),
                &join(path, "max-lag"),
                "applies to check = \"postgres\" or \"redis\" with role = \"replica\" or \"prefer-replica\"",
            );
        }
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
