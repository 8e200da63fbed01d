use super::*;

fn config(workers: usize, max_relays: Option<usize>) -> Config {
    let mut c = Config::single("127.0.0.1:0".parse().unwrap(), vec![], Mode::Splice);
    c.workers = workers;
    c.max_relays = max_relays;
    c
}

#[test]
fn the_budget_leaves_room_for_the_loop_and_pipes() {
    let b = |workers, max, nofile| fd_budget(&config(workers, max), nofile);
    // 256 - 32 - 8 = 216 left: 86 relays (172 fds), 44 pipe fds.
    assert_eq!(
        b(2, None, 256),
        FdBudget {
            relays: 86,
            pipe_fds: 44
        }
    );
    assert_eq!(b(1, None, 20_000).relays, 7_896);
    assert_eq!(b(2, None, 20_000).relays, 7_894);
    // A lower cap leaves the pipes the rest.
    assert_eq!(
        b(2, Some(100), 20_000),
        FdBudget {
            relays: 100,
            pipe_fds: 19_536
        }
    );
    assert_eq!(b(1, None, 0).relays, 1, "never zero");
}

#[test]
fn sockets_and_pipes_together_never_exceed_the_limit() {
    for workers in [1, 2, 8, 64] {
        for max in [None, Some(1), Some(50), Some(1_000_000)] {
            for nofile in (0..5_000).chain([65_536, 1 << 20]) {
                let b = fd_budget(&config(workers, max), nofile);
                let reserve = (nofile / 8).clamp(16, 256) + 4 * workers as u64;
                let left = nofile.saturating_sub(reserve);
                assert!(b.relays >= 1);
                assert_eq!(b.pipe_fds % 2, 0, "whole pipes");
                if left >= 2 {
                    assert!(
                        2 * b.relays as u64 + b.pipe_fds as u64 <= left,
                        "{workers} workers, max {max:?}, nofile {nofile}: {b:?}"
                    );
                }
            }
        }
    }
}
