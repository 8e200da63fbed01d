//! `[[listener.route]]` tables, and the checks that need the whole file:
//! the route table's rules, and that every route's pool is defined.

use std::ops::Range;

use toml::de::DeValue;

use super::values::{join, Cx, Value};
use crate::config::*;

/// One route as read, with where each of its keys is, for errors.
pub(super) struct ReadRoute {
    pub(super) route: RouteConfig,
    /// The route's table.
    pub(super) span: Range<usize>,
    /// (key, span of its value).
    keys: Vec<(String, Range<usize>)>,
    /// The route's key path, `listener[pg].route[0]`.
    pub(super) path: String,
}

impl ReadRoute {
    /// Where `key` is written, else the route's table.
    pub(super) fn span_of(&self, key: &str) -> Range<usize> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map_or(self.span.clone(), |(_, s)| s.clone())
    }
}

const KEYS: [&str; 5] = ["server-name", "alpn", "database", "user", "pool"];

/// Reads a listener's `route` array of tables.
pub(super) fn read_routes(cx: &mut Cx, v: &Value<'_>, path: &str) -> Vec<ReadRoute> {
    let key = join(path, "route");
    let DeValue::Array(items) = v.get_ref() else {
        cx.error(&v.span(), &key, "expected [[listener.route]] tables");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let Some(t) = cx.table(item, &at) else {
            continue;
        };
        let mut r = ReadRoute {
            route: RouteConfig::default(),
            span: item.span(),
            keys: Vec::new(),
            path: at.clone(),
        };
        for (k, v) in t.iter() {
            let name = k.get_ref().as_ref();
            let key = join(&at, name);
            if !KEYS.contains(&name) {
                cx.unknown(k, &at, &KEYS);
                continue;
            }
            let Some(text) = cx.string(v, &key) else {
                continue;
            };
            r.keys.push((name.to_string(), v.span()));
            let text = text.to_string();
            match name {
                // DNS names are case-insensitive; the hello's is lower-cased too.
                "server-name" => r.route.server_name = Some(text.to_ascii_lowercase()),
                "alpn" => r.route.alpn = Some(text),
                "database" => r.route.database = Some(text),
                "user" => r.route.user = Some(text),
                _ => r.route.pool = text,
            }
        }
        out.push(r);
    }
    out
}

/// Reports the problems of one listener's route table at their keys.
pub(super) fn check_routes(cx: &mut Cx, protocol: Protocol, routes: &[ReadRoute]) {
    let configs: Vec<RouteConfig> = routes.iter().map(|r| r.route.clone()).collect();
    for (i, key, problem) in route_problems(protocol, &configs) {
        let r = &routes[i];
        cx.error(&r.span_of(key), &join(&r.path, key), problem);
    }
}

/// Reports every route whose pool no `[[pool]]` defines.
pub(super) fn check_pool_names(cx: &mut Cx, pools: &[NamedPool], routes: &[ReadRoute]) {
    for r in routes {
        let name = &r.route.pool;
        if !name.is_empty() && !pools.iter().any(|p| &p.name == name) {
            let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
            let defined = if known.is_empty() {
                "no [[pool]] is defined".to_string()
            } else {
                format!("defined: {}", known.join(", "))
            };
            cx.error(
                &r.span_of("pool"),
                &join(&r.path, "pool"),
                format!("no [[pool]] is named '{name}' ({defined})"),
            );
        }
    }
}
