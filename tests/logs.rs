//! The access log: `--log-format json` close and progress lines carry the
//! documented fields, and nothing else.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

/// The fields of the close line, as docs/OPERATIONS.md lists them.
const CLOSE_FIELDS: &[&str] = &[
    "timestamp",
    "level",
    "target",
    "message",
    "relay",
    "client",
    "listener",
    "upstream",
    "bytes_c2u",
    "bytes_u2c",
    "duration_ms",
    "engine_c2u",
    "engine_u2c",
    "reason",
];

fn json_lines(proxy: &Spliced, message: &str) -> Vec<serde_json::Map<String, Value>> {
    proxy
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.as_object().cloned())
        .filter(|o| o.get("message").and_then(Value::as_str) == Some(message))
        .collect()
}

fn keys(o: &serde_json::Map<String, Value>) -> BTreeSet<&str> {
    o.keys().map(String::as_str).collect()
}

#[test]
fn json_close_and_progress_lines_carry_the_documented_fields() {
    let upstream = echo_server();
    let proxy = Spliced::run(&[
        "--upstream",
        &upstream.addr.to_string(),
        "--log-format",
        "json",
        "--log-interval",
        "200ms",
    ]);
    // Every line is JSON.
    for line in proxy.logs() {
        serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    let mut c = connect(proxy.addr);
    round_trip(&mut c, &pattern(3, 5000), T);
    wait_until(T, "a progress line", || {
        !json_lines(&proxy, "relay progress").is_empty()
    });
    let local = c.local_addr().unwrap().to_string();
    drop(c);
    wait_until(T, "the close line", || {
        !json_lines(&proxy, "relay closed").is_empty()
    });
    let close = &json_lines(&proxy, "relay closed")[0];
    let want: BTreeSet<&str> = CLOSE_FIELDS.iter().copied().collect();
    assert_eq!(keys(close), want, "{close:?}");
    assert_eq!(close["client"], local.as_str());
    // A listener from flags is named by its --listen text.
    assert_eq!(close["listener"], "127.0.0.1:0");
    assert_eq!(close["upstream"], upstream.addr.to_string().as_str());
    assert_eq!(close["bytes_c2u"], 5000);
    assert_eq!(close["bytes_u2c"], 5000);
    assert_eq!(close["engine_c2u"], "splice");
    assert_eq!(close["reason"], "eof");
    assert_eq!(close["level"], "INFO");
    assert!(close["duration_ms"].as_u64().unwrap() >= 200);
    let progress = &json_lines(&proxy, "relay progress")[0];
    let want_progress: BTreeSet<&str> = want.iter().copied().filter(|&k| k != "reason").collect();
    assert_eq!(keys(progress), want_progress, "{progress:?}");
    assert_eq!(progress["relay"], close["relay"]);
}

#[test]
fn without_log_interval_no_progress_is_logged() {
    let upstream = echo_server();
    let proxy = Spliced::run(&["--upstream", &upstream.addr.to_string()]);
    let mut c = connect(proxy.addr);
    round_trip(&mut c, b"x", T);
    drop(c);
    wait_until(T, "the close line", || {
        proxy.logs().iter().any(|l| l.contains("relay closed"))
    });
    assert!(!proxy.logs().iter().any(|l| l.contains("relay progress")));
    let close = proxy
        .logs()
        .into_iter()
        .find(|l| l.contains("relay closed"))
        .unwrap();
    for field in ["relay=", "client=", "listener=", "bytes_c2u=", "reason=eof"] {
        assert!(close.contains(field), "{field} missing: {close}");
    }
}

/// In the text log a listener is named as the close line names it,
/// `listener=NAME`, in warnings too (not `listener="NAME"`).
#[test]
fn warnings_name_the_listener_as_the_close_line_does() {
    let dead = refused_addr();
    let proxy = Spliced::run(&["--upstream", &dead.to_string()]);
    let c = connect(proxy.addr);
    wait_until(T, "the connect failure warning", || {
        proxy
            .logs()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("upstream connect failed"))
    });
    drop(c);
    let warning = proxy
        .logs()
        .into_iter()
        .find(|l| l.contains("WARN") && l.contains("upstream connect failed"))
        .unwrap();
    assert!(
        warning.contains("listener=127.0.0.1:0 ") && !warning.contains("listener=\""),
        "{warning}"
    );
}
