//! Routes: which pool a client goes to, by what it showed before its relay
//! started. Pure; the worker reads the bytes (`worker/preface.rs`) and
//! hands over what they said.
//!
//! | file | what lives there |
//! |---|---|
//! | `mod.rs` | what a client showed ([`Shown`]), matching a route, a table's pick |
//! | `startup.rs` | a PostgreSQL client's opening: requests, startup parameters, a TLS hello |
//! | `hello.rs` | the TLS ClientHello, read without terminating TLS (server name, ALPN) |
//!
//! A route matches when every key it sets matches; routes are tried in
//! order and the first that matches wins. A route without keys (the
//! default) matches every client.

pub mod hello;
pub(crate) mod startup;

use crate::config::RouteConfig;

/// What a client showed before its relay started: its TLS ClientHello's
/// server name and ALPN offers, or its PostgreSQL startup parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Shown {
    /// The SNI, lower-cased.
    pub(crate) server_name: Option<String>,
    pub(crate) alpn: Vec<Vec<u8>>,
    /// The `database` startup parameter, or the user's name without one.
    pub(crate) database: Option<String>,
    pub(crate) user: Option<String>,
}

/// Whether `name` (lower-cased) matches `pattern`: equal, or for
/// `*.rest`, one non-empty label (no dot) followed by `.rest`.
pub(crate) fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(rest) => name
            .strip_suffix(rest)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => pattern == name,
    }
}

/// Whether `route` takes a client that showed `shown`.
pub(crate) fn matches(route: &RouteConfig, shown: &Shown) -> bool {
    let server_name = route.server_name.as_deref().is_none_or(|p| {
        shown
            .server_name
            .as_deref()
            .is_some_and(|n| name_matches(p, n))
    });
    let alpn = route
        .alpn
        .as_deref()
        .is_none_or(|a| shown.alpn.iter().any(|o| o == a.as_bytes()));
    let database = route
        .database
        .as_deref()
        .is_none_or(|d| shown.database.as_deref() == Some(d));
    let user = route
        .user
        .as_deref()
        .is_none_or(|u| shown.user.as_deref() == Some(u));
    server_name && alpn && database && user
}

/// The first of `routes` that takes `shown`, by its position.
pub(crate) fn pick(routes: &[RouteConfig], shown: &Shown) -> Option<usize> {
    routes.iter().position(|r| matches(r, shown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_route as route;

    #[test]
    fn wildcards_take_exactly_one_label() {
        assert!(name_matches("*.db.example", "a.db.example"));
        assert!(!name_matches("*.db.example", "db.example"));
        assert!(!name_matches("*.db.example", ".db.example"));
        assert!(!name_matches("*.db.example", "a.b.db.example"));
        assert!(!name_matches("*.db.example", "adb.example"));
        assert!(name_matches("a.db.example", "a.db.example"));
        assert!(!name_matches("a.db.example", "b.db.example"));
    }

    #[test]
    fn the_first_matching_route_wins() {
        let routes = vec![
            route(|r| r.server_name = Some("a.db.example".into())),
            route(|r| r.server_name = Some("*.db.example".into())),
            route(|r| r.alpn = Some("postgresql".into())),
            route(|r| {
                r.database = Some("olap".into());
                r.user = Some("bob".into());
            }),
            route(|r| r.database = Some("olap".into())),
        ];
        let sni = |n: &str| Shown {
            server_name: Some(n.into()),
            ..Shown::default()
        };
        assert_eq!(pick(&routes, &sni("a.db.example")), Some(0));
        assert_eq!(pick(&routes, &sni("b.db.example")), Some(1));
        assert_eq!(pick(&routes, &sni("c.other")), None);
        let alpn = Shown {
            alpn: vec![b"h2".to_vec(), b"postgresql".to_vec()],
            ..Shown::default()
        };
        assert_eq!(pick(&routes, &alpn), Some(2));
        let startup = |d: &str, u: &str| Shown {
            database: Some(d.into()),
            user: Some(u.into()),
            ..Shown::default()
        };
        assert_eq!(pick(&routes, &startup("olap", "bob")), Some(3));
        assert_eq!(pick(&routes, &startup("olap", "eve")), Some(4));
        assert_eq!(pick(&routes, &startup("oltp", "bob")), None);
        let mut with_default = routes.clone();
        with_default.push(route(|_| {}));
        assert_eq!(pick(&with_default, &Shown::default()), Some(5));
    }
}
