//! A relay's image as one line of a `relays` message:
//!
//! ```text
//! id=7 listener=pg route=2,db.example client=ADDR upstream=ADDR
//! age=NS idle=NS half=0|1 frozen=NS c2u=DIRECTION u2c=DIRECTION
//! ```
//!
//! A DIRECTION is `STATE,PENDING,IN,OUT,ENGINE,FLAGS,CARRY`: `open`,
//! `eof` or `shut`; the bytes its buffer holds; the bytes it took in and
//! wrote out; `splice` or `copy`; `s` (spliced a byte), `u` (urgent data
//! seen), `f` (fell back to copy), or `-`; and `none`, `pipe` or `bytes`
//! (where the pending bytes travel).

use std::collections::HashMap;
use std::time::Duration;

use super::protocol::{escape, unescape};
use crate::engine::{Engine, SlotImage};
use crate::relay::core::CoreImage;
use crate::relay::direction::{DirState, DirectionImage};
use crate::relay::image::{Carry, RelayImage};
use crate::relay::RouteTag;

pub(super) fn encode(image: &RelayImage) -> String {
    let mut line = format!("id={} listener={}", image.id, escape(&image.listener));
    if let Some(route) = &image.route {
        line.push_str(&format!(" route={}", route.position));
        if let Some(name) = &route.server_name {
            line.push(',');
            line.push_str(&escape(name));
        }
    }
    if let Some(a) = image.client_addr {
        line.push_str(&format!(" client={a}"));
    }
    if let Some(a) = image.upstream_addr {
        line.push_str(&format!(" upstream={a}"));
    }
    let core = &image.core;
    line.push_str(&format!(
        " age={} idle={} half={} frozen={} c2u={} u2c={}",
        core.age.as_nanos(),
        core.idle.as_nanos(),
        u8::from(core.half_closed),
        image.frozen_at,
        direction(&core.c2u, &image.c2u, image.c2u_carry),
        direction(&core.u2c, &image.u2c, image.u2c_carry),
    ));
    line
}

fn direction(d: &DirectionImage, slot: &SlotImage, carry: Carry) -> String {
    let state = match d.state {
        DirState::Open => "open",
        DirState::SourceEof => "eof",
        DirState::Shut => "shut",
    };
    let mut flags = String::new();
    for (on, c) in [
        (slot.spliced_any, 's'),
        (slot.urgent, 'u'),
        (slot.fell_back, 'f'),
    ] {
        if on {
            flags.push(c);
        }
    }
    if flags.is_empty() {
        flags.push('-');
    }
    let carry = match carry {
        Carry::Nothing => "none",
        Carry::Pipe => "pipe",
        Carry::Bytes(_) => "bytes",
    };
    format!(
        "{state},{},{},{},{},{flags},{carry}",
        d.pending,
        d.bytes_in,
        d.bytes_out,
        slot.engine.as_str()
    )
}

/// A line's image; `None` if a field is missing or malformed.
pub(super) fn decode(line: &str) -> Option<RelayImage> {
    let mut fields = HashMap::new();
    for part in line.split(' ').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=')?;
        fields.insert(name, value);
    }
    let number = |name: &str| fields.get(name)?.parse::<u64>().ok();
    let addr = |name: &str| match fields.get(name) {
        None => Some(None),
        Some(a) => a.parse().ok().map(Some),
    };
    let route = match fields.get("route") {
        None => None,
        Some(r) => {
            let (position, name) = match r.split_once(',') {
                Some((p, n)) => (p, Some(unescape(n)?.into_boxed_str())),
                None => (*r, None),
            };
            Some(RouteTag {
                position: position.parse().ok()?,
                server_name: name,
            })
        }
    };
    let (c2u, c2u_slot, c2u_carry) = read_direction(fields.get("c2u")?)?;
    let (u2c, u2c_slot, u2c_carry) = read_direction(fields.get("u2c")?)?;
    Some(RelayImage {
        id: number("id")?,
        listener: unescape(fields.get("listener")?)?,
        route,
        client_addr: addr("client")?,
        upstream_addr: addr("upstream")?,
        core: CoreImage {
            c2u,
            u2c,
            age: Duration::from_nanos(number("age")?),
            idle: Duration::from_nanos(number("idle")?),
            half_closed: match *fields.get("half")? {
                "1" => true,
                "0" => false,
                _ => return None,
            },
        },
        c2u: c2u_slot,
        u2c: u2c_slot,
        c2u_carry,
        u2c_carry,
        frozen_at: number("frozen")?,
    })
}

fn read_direction(text: &str) -> Option<(DirectionImage, SlotImage, Carry)> {
    let parts: Vec<&str> = text.split(',').collect();
    let [state, pending, bytes_in, bytes_out, engine, flags, carry] = parts[..] else {
        return None;
    };
    let state = match state {
        "open" => DirState::Open,
        "eof" => DirState::SourceEof,
        "shut" => DirState::Shut,
        _ => return None,
    };
    let pending: usize = pending.parse().ok()?;
    let engine = match engine {
        "splice" => Engine::Splice,
        "copy" => Engine::Copy,
        _ => return None,
    };
    if flags != "-" && !flags.chars().all(|c| "suf".contains(c)) {
        return None;
    }
    let carry = match carry {
        "none" if pending == 0 => Carry::Nothing,
        "pipe" if pending > 0 => Carry::Pipe,
        "bytes" if pending > 0 => Carry::Bytes(pending),
        _ => return None,
    };
    Some((
        DirectionImage {
            state,
            pending,
            bytes_in: bytes_in.parse().ok()?,
            bytes_out: bytes_out.parse().ok()?,
        },
        SlotImage {
            engine,
            spliced_any: flags.contains('s'),
            urgent: flags.contains('u'),
            fell_back: flags.contains('f'),
        },
        carry,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> RelayImage {
        let slot = SlotImage {
            engine: Engine::Splice,
            spliced_any: true,
            urgent: false,
            fell_back: false,
        };
        RelayImage {
            id: 41,
            listener: "pg main=1%".into(),
            route: Some(RouteTag {
                position: 2,
                server_name: Some("db.example".into()),
            }),
            client_addr: Some("127.0.0.1:40000".parse().unwrap()),
            upstream_addr: Some("[::1]:5432".parse().unwrap()),
            core: CoreImage {
                c2u: DirectionImage {
                    state: DirState::Open,
                    pending: 70_003,
                    bytes_in: 1 << 40,
                    bytes_out: (1 << 40) - 70_003,
                },
                u2c: DirectionImage {
                    state: DirState::SourceEof,
                    pending: 12,
                    bytes_in: 99,
                    bytes_out: 87,
                },
                age: Duration::from_secs(3600),
                idle: Duration::from_millis(15),
                half_closed: true,
            },
            c2u: slot,
            u2c: SlotImage {
                engine: Engine::Copy,
                spliced_any: false,
                urgent: true,
                fell_back: true,
            },
            c2u_carry: Carry::Pipe,
            u2c_carry: Carry::Bytes(12),
            frozen_at: 123_456_789,
        }
    }

    #[test]
    fn an_image_reads_back_as_written() {
        let mut a = image();
        assert_eq!(decode(&encode(&a)), Some(a.clone()));
        a.route = None;
        a.client_addr = None;
        a.upstream_addr = None;
        a.core.u2c = DirectionImage {
            state: DirState::Shut,
            pending: 0,
            bytes_in: 5,
            bytes_out: 5,
        };
        a.u2c_carry = Carry::Nothing;
        assert_eq!(decode(&encode(&a)), Some(a));
    }

    #[test]
    fn a_malformed_line_is_refused() {
        let line = encode(&image());
        for bad in [
            line.replace("c2u=open", "c2u=half"),
            line.replace(",pipe", ",none"),
            line.replace("half=1", "half=2"),
            line.replace("id=41 ", ""),
            line.replace("listener=", "listener"),
            line.replace(",splice,", ",uring,"),
            line.replace(",s,", ",x,"),
        ] {
            assert_eq!(decode(&bad), None, "{bad}");
        }
    }
}
