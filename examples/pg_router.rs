//! pg_router: a PostgreSQL front end that picks a server by database name
//! and then gets out of the data path.
//!
//! It accepts with tokio, reads the client's startup packet (answering an
//! SSLRequest with `N`, so the client continues in plain text), picks the
//! server for the requested database, connects, and hands both sockets to
//! a spliced [`Runtime`] together with the startup packet it read. From
//! there the kernel moves the bytes; this program never touches them again.
//!
//! ```text
//! cargo run --example pg_router -- 127.0.0.1:6432 127.0.0.1:5432 analytics=127.0.0.1:5433
//! psql -h 127.0.0.1 -p 6432 -d analytics    # reaches the server on 5433
//! ```
//!
//! Arguments: the listen address, the default server, then any number of
//! `DATABASE=SERVER` routes.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use spliced::{Mode, Runtime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The protocol code of an SSLRequest (in place of a version number).
const SSL_REQUEST: u32 = 80_877_103;
/// Startup packets longer than this are refused, as PostgreSQL does.
const MAX_STARTUP: usize = 10_000;

struct Routes {
    default: SocketAddr,
    by_database: HashMap<String, SocketAddr>,
}

fn parse_args() -> Result<(SocketAddr, Routes), String> {
    let usage = "usage: pg_router LISTEN DEFAULT_SERVER [DATABASE=SERVER ...]";
    let mut args = std::env::args().skip(1);
    let addr = |s: Option<String>| -> Result<SocketAddr, String> {
        let s = s.ok_or(usage)?;
        s.parse().map_err(|e| format!("'{s}': {e}"))
    };
    let listen = addr(args.next())?;
    let default = addr(args.next())?;
    let mut by_database = HashMap::new();
    for route in args {
        let (db, server) = route
            .split_once('=')
            .ok_or_else(|| format!("'{route}' is not DATABASE=SERVER"))?;
        by_database.insert(db.to_string(), addr(Some(server.to_string()))?);
    }
    Ok((
        listen,
        Routes {
            default,
            by_database,
        },
    ))
}

/// Reads one length-prefixed startup packet (the length counts itself).
async fn read_packet(client: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = client.read_u32().await? as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad startup packet length",
        ));
    }
    let mut packet = Vec::with_capacity(len);
    packet.extend_from_slice(&(len as u32).to_be_bytes());
    packet.resize(len, 0);
    client.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

/// The `database` parameter of a startup packet (default: the user name).
fn database(packet: &[u8]) -> Option<String> {
    let mut fields = packet.get(8..)?.split(|&b| b == 0);
    let mut user = None;
    while let (Some(key), Some(value)) = (fields.next(), fields.next()) {
        let value = String::from_utf8_lossy(value).into_owned();
        match key {
            b"database" => return Some(value),
            b"user" => user = Some(value),
            b"" => break,
            _ => {}
        }
    }
    user
}

async fn route(mut client: TcpStream, runtime: &Runtime, routes: &Routes) -> io::Result<()> {
    let mut packet = read_packet(&mut client).await?;
    if u32::from_be_bytes(packet[4..8].try_into().expect("8 bytes")) == SSL_REQUEST {
        client.write_all(b"N").await?;
        packet = read_packet(&mut client).await?;
    }
    let server = database(&packet)
        .and_then(|db| routes.by_database.get(&db).copied())
        .unwrap_or(routes.default);
    let upstream = TcpStream::connect(server).await?;
    let pair = runtime
        .handoff_with_read(client.into_std()?, packet, upstream.into_std()?, Vec::new())
        .map_err(|e| io::Error::other(e.to_string()))?;
    eprintln!(
        "pg_router: relay {} to {server} handed to spliced",
        pair.id()
    );
    // Dropping the handle leaves the pair running; a program that wants
    // the outcome awaits `pair.finished()` instead.
    Ok(())
}

fn main() {
    let (listen, routes) = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("pg_router: {e}");
            std::process::exit(2);
        }
    };
    let spliced = match Runtime::builder().workers(1).mode(Mode::Splice).start() {
        Ok(runtime) => Arc::new(runtime),
        Err(e) => {
            eprintln!("pg_router: cannot start spliced: {e}");
            std::process::exit(1);
        }
    };
    let routes = Arc::new(routes);
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    tokio.block_on(async move {
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("pg_router: cannot listen on {listen}: {e}");
                std::process::exit(1);
            }
        };
        eprintln!("pg_router: listening on {listen}");
        loop {
            let Ok((client, peer)) = listener.accept().await else {
                continue;
            };
            let (spliced, routes) = (Arc::clone(&spliced), Arc::clone(&routes));
            tokio::spawn(async move {
                if let Err(e) = route(client, &spliced, &routes).await {
                    eprintln!("pg_router: client {peer}: {e}");
                }
            });
        }
    });
}
