//! Named pools and routes in the config file: what is accepted, how the
//! effective config shows it, and each mistake as one line with its key
//! and line number.

use spliced::config::{effective_toml, parse_str, FlagDefaults};

const POOLS: &str = "[[pool]]\nname = \"a\"\nservers = [\"127.0.0.1:5432\"]\n\n[[pool]]\nname = \"b\"\nservers = [\"127.0.0.1:5433\"]\n[pool.health]\ncheck = \"tcp\"\n\n";

fn listener(protocol: &str, routes: &str) -> String {
    format!("[[listener]]\nname = \"pg\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\n{routes}")
}

/// [`POOLS`] and then a listener speaking `protocol` with `routes`.
fn with_pools(protocol: &str, routes: &str) -> String {
    format!("{POOLS}{}", listener(protocol, routes))
}

/// The one error of `text`, as `line N: key: message`.
fn error_of(text: &str) -> String {
    let errors = parse_str(text, &FlagDefaults::default()).expect_err(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors[0].to_string()
}

#[test]
fn routes_and_named_pools_are_read_and_printed_back() {
    let routes = "[[listener.route]]\nserver-name = \"A.DB.example\"\npool = \"a\"\n[[listener.route]]\ndatabase = \"olap\"\nuser = \"bob\"\npool = \"b\"\n[[listener.route]]\npool = \"a\"\n";
    let text = with_pools("postgres", routes);
    let loaded = parse_str(&text, &FlagDefaults::default()).unwrap();
    let c = &loaded.config;
    assert_eq!(c.pools.len(), 2);
    let l = &c.listeners[0];
    assert_eq!(l.routes.len(), 3);
    assert_eq!(l.routes[0].server_name.as_deref(), Some("a.db.example"));
    let linked: Vec<&str> = l.route_pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(linked, ["a", "b"], "each pool the routes use, once");
    let printed = effective_toml(c);
    assert!(printed.contains("[[pool]]"), "{printed}");
    assert!(printed.contains("[[listener.route]]"), "{printed}");
    assert!(!printed.contains("[listener.pool]"), "{printed}");
    let again = parse_str(&printed, &FlagDefaults::default())
        .unwrap_or_else(|e| panic!("{printed}\n{e:?}"));
    assert_eq!(effective_toml(&again.config), printed, "a fixed point");
    let back = &again.config.listeners[0];
    assert_eq!(back.routes, l.routes);
    let servers = |l: &spliced::config::ListenerConfig| -> Vec<Vec<String>> {
        l.route_pools
            .iter()
            .map(|p| p.config.servers.iter().map(|s| s.address.clone()).collect())
            .collect()
    };
    assert_eq!(servers(back), servers(l));
}

#[test]
fn each_mistake_names_its_key_and_line() {
    let cases = [
        (
            with_pools("postgres", "[[listener.route]]\ndatabase = \"x\"\npool = \"nope\"\n"),
            "line 17: listener[pg].route[0].pool: no [[pool]] is named 'nope' (defined: a, b)",
        ),
        (
            format!("{POOLS}[[pool]]\nname = \"a\"\nservers = [\"127.0.0.1:1\"]\n\n{}", listener("postgres", "[[listener.route]]\npool = \"a\"\n")),
            "line 12: pool[a].name: the name is already used by the pool on line 2",
        ),
        (
            with_pools("postgres", "[[listener.route]]\npool = \"a\"\n[[listener.route]]\nuser = \"x\"\npool = \"b\"\n"),
            "line 16: listener[pg].route[0].pool: a route without server-name, alpn, database or user is the default route and must be the last",
        ),
        (
            with_pools("postgres", "[[listener.route]]\nuser = \"x\"\n"),
            "line 15: listener[pg].route[0].pool: a route needs a pool (the name of a [[pool]])",
        ),
        (
            with_pools("none", "[[listener.route]]\nserver-name = \"a.example\"\npool = \"a\"\n"),
            "line 16: listener[pg].route[0].server-name: needs protocol = \"postgres\" or \"tls\" on the listener (nothing else reads a TLS ClientHello)",
        ),
        (
            with_pools("tls", "[[listener.route]]\ndatabase = \"x\"\npool = \"a\"\n"),
            "line 16: listener[pg].route[0].database: needs protocol = \"postgres\" (a tls listener reads no startup packet)",
        ),
        (
            with_pools("postgres", "[[listener.route]]\npool = \"a\"\n") + "[listener.pool]\nservers = [\"127.0.0.1:1\"]\n",
            "line 15: listener[pg].route: a listener has either its own [listener.pool] or [[listener.route]] tables, not both",
        ),
        (
            with_pools("tls", "[[listener.route]]\nserver-name = \"a.*.example\"\npool = \"a\"\n"),
            "line 16: listener[pg].route[0].server-name: 'a.*.example': a wildcard is only allowed as the whole first label (\"*.db.example\")",
        ),
    ];
    for (text, want) in &cases {
        assert_eq!(&error_of(text), want, "\n{text}");
    }
}
