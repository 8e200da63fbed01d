//! Held clients (`queue-timeout`) through a real PostgreSQL failover: the
//! primary is stopped with `-m immediate` while a client opens a new
//! connection and INSERTs every 50 ms through the primary listener, and
//! the replica is promoted 3 s later. With parking no connect fails and
//! every INSERT lands on the new primary; without it, the same run shows
//! the refusals. With no promotion, held clients are refused at their
//! queue-timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::common::pace;
use crate::fixture::{
    free_port, loopback, pg_bin, primary_and_replica, write_secret, Pg, PgConn, Proxy, TempDir,
    WireError, CLIENT_USER,
};
use crate::routing::{pg_login, settle_on, ListenerToml};

/// How often the client loop starts a new client.
const EVERY: Duration = Duration::from_millis(50);
const INSERT: &str =
    "INSERT INTO writes (port) VALUES (current_setting('port')) RETURNING id, port";

/// What one client saw.
#[derive(Debug, Clone)]
enum Outcome {
    /// Its INSERT landed: (id, port of the server that took it).
    Inserted(String, String),
    /// It could not log in through the listener.
    ConnectFailed(String),
    /// It logged in, then its INSERT failed (its server died under it).
    SessionFailed(String),
}

impl Outcome {
    /// Why it failed, if it did.
    fn error(&self) -> Option<&str> {
        match self {
            Outcome::Inserted(..) => None,
            Outcome::ConnectFailed(e) | Outcome::SessionFailed(e) => Some(e),
        }
    }
}

#[derive(Debug, Clone)]
struct Client {
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

fn one_client(addr: SocketAddr, timeout: Duration) -> Outcome {
    let mut conn = match PgConn::connect(addr, CLIENT_USER, None, timeout) {
        Ok(c) => c,
        Err(e) => return Outcome::ConnectFailed(e.to_string()),
    };
    match conn.query_line(INSERT) {
        Ok(row) => {
            let (id, port) = row.split_once('|').unwrap_or((&row, ""));
            Outcome::Inserted(id.to_string(), port.to_string())
        }
        Err(e) => Outcome::SessionFailed(e.to_string()),
    }
}

/// Starts a new client every [`EVERY`], each on its own thread (a held
/// client does not hold up the next), until stopped.
struct Clients {
    stop: Arc<AtomicBool>,
    ticker: JoinHandle<Vec<JoinHandle<Client>>>,
}

impl Clients {
    fn spawn(addr: SocketAddr, timeout: Duration) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let ticker = thread::spawn(move || {
            let mut handles = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                handles.push(thread::spawn(move || {
                    let start = Instant::now();
                    let outcome = one_client(addr, timeout);
                    Client {
                        start,
                        end: Instant::now(),
                        outcome,
                    }
                }));
                pace(EVERY);
            }
            handles
        });
        Clients { stop, ticker }
    }

    /// Stops starting clients and waits for every one started.
    fn finish(self) -> Vec<Client> {
        self.stop.store(true, Ordering::SeqCst);
        let handles = self.ticker.join().expect("client ticker panicked");
        let mut out: Vec<Client> = handles
            .into_iter()
            .map(|h| h.join().expect("a client panicked"))
            .collect();
        out.sort_by_key(|c| c.start);
        out
    }
}

/// A `pg-rw` listener (role primary) over `pair` with `queue_timeout`.
fn rw_listener(port: u16, pair: (&Pg, &Pg), pass: &std::path::Path, queue_timeout: &str) -> String {
    ListenerToml {
        name: "pg-rw",
        port,
        servers: &[pair.0.port, pair.1.port],
        check: "postgres",
        role: "primary",
        pool_extra: &format!("queue-timeout = \"{queue_timeout}\""),
        health_extra: &pg_login(pass, "150ms"),
    }
    .render()
}

/// What a failover run saw, split at the primary's exit.
struct Run {
    clients: Vec<Client>,
    stopped_at: Instant,
    promoted_at: Instant,
}

impl Run {
    /// Clients started after the primary exited.
    fn after_stop(&self) -> impl Iterator<Item = &Client> {
        self.clients.iter().filter(|c| c.start >= self.stopped_at)
    }

    /// Clients started before the primary exited that failed: sessions of
    /// the dead primary, which may fail.
    fn in_flight_failures(&self) -> usize {
        self.clients
            .iter()
            .filter(|c| c.start < self.stopped_at)
            .filter(|c| !matches!(c.outcome, Outcome::Inserted(..)))
            .count()
    }

    fn failed_connects(&self) -> Vec<&Client> {
        self.after_stop()
            .filter(|c| matches!(c.outcome, Outcome::ConnectFailed(_)))
            .collect()
    }

    fn failed_sessions(&self) -> Vec<&Client> {
        self.after_stop()
            .filter(|c| matches!(c.outcome, Outcome::SessionFailed(_)))
            .collect()
    }

    fn inserted_after_stop(&self) -> Vec<(&str, &str)> {
        self.after_stop()
            .filter_map(|c| match &c.outcome {
                Outcome::Inserted(id, port) => Some((id.as_str(), port.as_str())),
                _ => None,
            })
            .collect()
    }

    /// The longest a served client took, from its start to its INSERT's
    /// answer.
    fn longest_wait(&self) -> Duration {
        self.clients
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Inserted(..)))
            .map(|c| c.end - c.start)
            .max()
            .unwrap_or_default()
    }

    fn summary(&self, what: &str) -> String {
        let served = self
            .clients
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Inserted(..)))
            .count();
        let first_error = self
            .after_stop()
            .find_map(|c| c.outcome.error())
            .map(|e| format!(" (the first: {e})"))
            .unwrap_or_default();
        format!(
            "{what}: {} clients, {served} INSERTs served; after the stop: {} failed connects, {} failed sessions{first_error}; \
             {} in-flight sessions of the dead primary failed; longest wait of a served client {:?}; promotion {:?} after the stop",
            self.clients.len(),
            self.failed_connects().len(),
            self.failed_sessions().len(),
            self.in_flight_failures(),
            self.longest_wait(),
            self.promoted_at - self.stopped_at
        )
    }
}

/// Starts a primary and a replica, spliced before them with
/// `queue_timeout`, the client loop; stops the primary, promotes the
/// replica 3 s later, and lets the clients run 3 s more.
fn failover_run(bin: &std::path::Path, label: &str, queue_timeout: &str) -> (Run, Pg, TempDir) {
    let dir = TempDir::new(&format!("e2e-parking-{label}"));
    let (mut primary, replica) = primary_and_replica(bin, &dir, "monitor-pw");
    primary.psql("CREATE TABLE writes (id bigserial PRIMARY KEY, port text NOT NULL)");
    let pass = write_secret(&dir, "monitor.pass", "monitor-pw");
    let rw = free_port();
    let _proxy = Proxy::start(
        &dir,
        &format!("parking-{label}"),
        &rw_listener(rw, (&primary, &replica), &pass, queue_timeout),
    );
    let addr = loopback(rw);
    let want = primary.port.to_string();
    settle_on(
        Duration::from_secs(15),
        6,
        "pg-rw reaches the primary",
        || match one_client(addr, Duration::from_secs(2)) {
            Outcome::Inserted(_, port) if port == want => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // Long enough for a held client never to give up before spliced does.
    let clients = Clients::spawn(addr, Duration::from_secs(30));
    pace(Duration::from_secs(1));
    let stopping = Instant::now();
    primary.stop_immediate();
    // Clients begun while the postmaster went down may have reached it:
    // they are its in-flight sessions.
    let stopped_at = Instant::now();
    eprintln!(
        "{label}: the primary took {:?} to exit",
        stopped_at - stopping
    );
    pace(Duration::from_secs(3).saturating_sub(stopping.elapsed()));
    replica.promote();
    let promoted_at = Instant::now();
    pace(Duration::from_secs(3));
    let clients = clients.finish();
    (
        Run {
            clients,
            stopped_at,
            promoted_at,
        },
        replica,
        dir,
    )
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn pg_failover_with_parking_fails_no_connect() {
    let Some(bin) = pg_bin("pg_failover_with_parking_fails_no_connect") else {
        return;
    };
    let (held, new_primary, _dir) = failover_run(&bin, "held", "15s");
    let (refused, ..) = failover_run(&bin, "refused", "0");
    eprintln!("{}", held.summary("with queue-timeout = \"15s\""));
    eprintln!("{}", refused.summary("with queue-timeout = \"0\""));

    let failed = held.failed_connects();
    assert!(
        failed.is_empty(),
        "with parking, {} connects failed after the stop: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let sessions = held.failed_sessions();
    assert!(
        sessions.is_empty(),
        "with parking, {} sessions begun after the stop failed: {:?}",
        sessions.len(),
        &sessions[..sessions.len().min(5)]
    );
    let landed = held.inserted_after_stop();
    assert!(
        landed.len() >= 60,
        "too few INSERTs after the stop: {}",
        held.summary("held")
    );
    let new_port = new_primary.port.to_string();
    let elsewhere: Vec<_> = landed.iter().filter(|(_, p)| *p != new_port).collect();
    assert!(
        elsewhere.is_empty(),
        "INSERTs after the stop landed elsewhere: {elsewhere:?}"
    );
    // Every one is in the new primary's table.
    let ids: Vec<&str> = landed.iter().map(|(id, _)| *id).collect();
    let stored = new_primary.psql(&format!(
        "SELECT count(*) FROM writes WHERE port = '{new_port}' AND id IN ({})",
        ids.join(",")
    ));
    assert_eq!(
        stored,
        ids.len().to_string(),
        "INSERTs answered but not stored"
    );
    // Held clients waited for the promotion, not for their timeout.
    assert!(
        held.longest_wait() < Duration::from_secs(10),
        "a served client waited {:?}",
        held.longest_wait()
    );

    // The same run without parking turns clients away.
    assert!(
        !refused.failed_connects().is_empty(),
        "without parking no connect failed: {}",
        refused.summary("refused")
    );
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn pg_held_clients_are_refused_at_their_queue_timeout_without_a_promotion() {
    let Some(bin) =
        pg_bin("pg_held_clients_are_refused_at_their_queue_timeout_without_a_promotion")
    else {
        return;
    };
    let dir = TempDir::new("e2e-parking-timeout");
    let (mut primary, replica) = primary_and_replica(&bin, &dir, "monitor-pw");
    let pass = write_secret(&dir, "monitor.pass", "monitor-pw");
    let rw = free_port();
    let _proxy = Proxy::start(
        &dir,
        "parking-timeout",
        // A PostgreSQL listener: a refused client is told why.
        &rw_listener(rw, (&primary, &replica), &pass, "3s").replacen(
            "listen = ",
            "protocol = \"postgres\"\nlisten = ",
            1,
        ),
    );
    let addr = loopback(rw);
    settle_on(Duration::from_secs(15), 3, "pg-rw serves", || {
        PgConn::connect(addr, CLIENT_USER, None, Duration::from_secs(2))
            .and_then(|mut c| c.query_line("SELECT 1"))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    primary.stop_immediate();
    let threads: Vec<_> = (0..5)
        .map(|_| {
            thread::spawn(move || {
                let start = Instant::now();
                let r = PgConn::connect(addr, CLIENT_USER, None, Duration::from_secs(20))
                    .map(|_| ())
                    .map_err(|e: WireError| e.to_string());
                (start.elapsed(), r)
            })
        })
        .collect();
    let ends: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("no promotion, queue-timeout 3s: {ends:?}");
    for (took, r) in &ends {
        let e = r.as_ref().expect_err("a client was served with no primary");
        assert!(
            e.contains("57P03: spliced: no primary for listener pg-rw after 3"),
            "not told why: {ends:?}"
        );
        assert!(
            *took >= Duration::from_millis(2900) && *took < Duration::from_secs(8),
            "refused after {took:?}, not at its queue-timeout: {ends:?}"
        );
    }
    // psql, held the same way, is told why at the timeout and prints it.
    let start = Instant::now();
    let out = std::process::Command::new(bin.join("psql"))
        .arg(format!(
            "host=127.0.0.1 port={rw} user={CLIENT_USER} dbname=postgres sslmode=prefer connect_timeout=20"
        ))
        .args(["-c", "SELECT 1"])
        .output()
        .expect("run psql");
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("psql after {took:?}: {}", stderr.trim());
    assert!(!out.status.success(), "psql was served with no primary");
    assert!(
        stderr.contains("FATAL:  spliced: no primary for listener pg-rw after 3"),
        "psql did not print why it was refused: {stderr}"
    );
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(8),
        "psql refused after {took:?}, not at its queue-timeout"
    );
}
