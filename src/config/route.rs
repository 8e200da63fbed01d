//! Named pools (`[[pool]]`) and a listener's routes (`[[listener.route]]`),
//! as validated values, and the rules a route table must keep. The file
//! reader and [`super::Config::validate`] both apply [`route_problems`], so
//! a file and a config built in code are held to the same rules.

use super::{PoolConfig, Protocol};

/// A pool defined once, by name, that routes of any listener may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPool {
    pub name: String,
    pub config: PoolConfig,
}

/// One route of a listener: what a client must show to take it, and the
/// named pool it leads to. Every key that is set must match; a route
/// without any is the default route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteConfig {
    /// The TLS server name (SNI) the client asks for, lower-cased: a name,
    /// or `*.` and a name (any one label in place of the `*`).
    pub server_name: Option<String>,
    /// An ALPN protocol the client offers.
    pub alpn: Option<String>,
    /// A plain-text PostgreSQL client's `database` startup parameter (the
    /// user name when it sends none, as PostgreSQL reads it).
    pub database: Option<String>,
    /// A plain-text PostgreSQL client's `user` startup parameter.
    pub user: Option<String>,
    /// The named pool.
    pub pool: String,
}

impl RouteConfig {
    /// A route with no match key: it takes every client that reaches it.
    pub fn is_default(&self) -> bool {
        self.server_name.is_none()
            && self.alpn.is_none()
            && self.database.is_none()
            && self.user.is_none()
    }

    /// What the route matches on, in the config's words: `server-name=a.db,
    /// alpn=postgresql`, or `default`.
    pub fn describe(&self) -> String {
        let keys = [
            ("server-name", &self.server_name),
            ("alpn", &self.alpn),
            ("database", &self.database),
            ("user", &self.user),
        ];
        let parts: Vec<String> = keys
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect();
        if parts.is_empty() {
            "default".to_string()
        } else {
            parts.join(",")
        }
    }
}

/// The longest ALPN protocol name (its length is one byte on the wire).
pub const MAX_ALPN_LEN: usize = 255;

/// What is wrong with a `server-name` pattern, if anything: it must be a
/// DNS name (letters, digits, `-`, `_`, dots between non-empty labels),
/// optionally starting with a `*.` wildcard label.
pub fn server_name_problem(pattern: &str) -> Option<String> {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    if name.is_empty() || name.len() > 253 {
        return Some(format!("'{pattern}' is not a server name"));
    }
    if name.contains('*') {
        return Some(format!(
            "'{pattern}': a wildcard is only allowed as the whole first label (\"*.db.example\")"
        ));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name.split('.').all(label_ok) {
        return Some(format!(
            "'{pattern}' is not a server name (labels of letters, digits, '-' and '_' between dots)"
        ));
    }
    None
}

/// Which key of route `index` is wrong and why, for every problem of a
/// listener's route table: a route with no pool, a default route that is
/// not the last or not the only one, keys the listener's protocol cannot
/// see (`server-name`/`alpn` need `postgres` or `tls`; `database`/`user`
/// need `postgres`).
pub fn route_problems(
    protocol: Protocol,
    routes: &[RouteConfig],
) -> Vec<(usize, &'static str, String)> {
    let mut out = Vec::new();
    let last = routes.len().saturating_sub(1);
    let mut default_seen = None;
    for (i, r) in routes.iter().enumerate() {
        if r.pool.is_empty() {
            out.push((
                i,
                "pool",
                "a route needs a pool (the name of a [[pool]])".to_string(),
            ));
        }
        if r.is_default() {
            if let Some(first) = default_seen {
                out.push((
                    i,
                    "pool",
                    format!("a second default route (route {first} has no match key already): at most one route may have none"),
                ));
            } else if i != last {
                out.push((
                    i,
                    "pool",
                    "a route without server-name, alpn, database or user is the default route and must be the last".to_string(),
                ));
            }
            default_seen.get_or_insert(i);
        }
        let tls_keys = r.server_name.is_some() || r.alpn.is_some();
        if tls_keys && protocol == Protocol::None {
            let key = if r.server_name.is_some() {
                "server-name"
            } else {
                "alpn"
            };
            out.push((
                i,
                key,
                "needs protocol = \"postgres\" or \"tls\" on the listener (nothing else reads a TLS ClientHello)".to_string(),
            ));
        }
        for (key, set) in [
            ("database", r.database.is_some()),
            ("user", r.user.is_some()),
        ] {
            if set && protocol != Protocol::Postgres {
                out.push((
                    i,
                    key,
                    format!(
                        "needs protocol = \"postgres\" (a {} listener reads no startup packet)",
                        protocol.as_str()
                    ),
                ));
            }
        }
        if let Some(p) = r.server_name.as_deref().and_then(server_name_problem) {
            out.push((i, "server-name", p));
        }
        if let Some(a) = &r.alpn {
            if a.is_empty() || a.len() > MAX_ALPN_LEN {
                out.push((i, "alpn", format!("must be 1 to {MAX_ALPN_LEN} bytes")));
            }
        }
    }
    out
}

/// The route tests' builder: a route to pool `p`, as `f` sets it.
#[cfg(test)]
pub(crate) fn test_route(f: impl FnOnce(&mut RouteConfig)) -> RouteConfig {
    let mut r = RouteConfig {
        pool: "p".into(),
        ..RouteConfig::default()
    };
    f(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::test_route as route;
    use super::*;

    #[test]
    fn the_default_route_is_last_and_alone() {
        let sni = route(|r| r.server_name = Some("a.example".into()));
        let default = route(|_| {});
        assert!(route_problems(Protocol::Tls, &[sni.clone(), default.clone()]).is_empty());
        let p = route_problems(Protocol::Tls, &[default.clone(), sni]);
        assert_eq!(p.len(), 1);
        assert!(p[0].2.contains("must be the last"), "{p:?}");
        let p = route_problems(Protocol::Tls, &[default.clone(), default]);
        assert!(p.iter().any(|x| x.2.contains("second default")), "{p:?}");
    }

    #[test]
    fn keys_need_a_protocol_that_reads_them() {
        let sni = route(|r| r.server_name = Some("a.example".into()));
        let db = route(|r| r.database = Some("x".into()));
        assert_eq!(
            route_problems(Protocol::None, std::slice::from_ref(&sni))[0].1,
            "server-name"
        );
        assert_eq!(
            route_problems(Protocol::Tls, std::slice::from_ref(&db))[0].1,
            "database"
        );
        assert!(route_problems(Protocol::Postgres, &[sni, db]).is_empty());
    }

    #[test]
    fn server_names_and_wildcards() {
        assert_eq!(server_name_problem("a.db.example"), None);
        assert_eq!(server_name_problem("*.db.example"), None);
        assert!(server_name_problem("a.*.example").is_some());
        assert!(server_name_problem("*").is_some());
        assert!(server_name_problem("a..b").is_some());
        assert!(server_name_problem("a b").is_some());
    }

    #[test]
    fn a_route_describes_its_keys() {
        let r = route(|r| {
            r.database = Some("olap".into());
            r.user = Some("bob".into());
        });
        assert_eq!(r.describe(), "database=olap,user=bob");
        assert_eq!(route(|_| {}).describe(), "default");
    }
}
