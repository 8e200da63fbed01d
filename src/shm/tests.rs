use super::*;

#[test]
fn blocks_handed_out_are_what_a_reader_sees() {
    let names = vec!["127.0.0.1:6432".to_string(), "handoff".to_string()];
    let arena = Arena::new(2, &names, 0);
    // Held, as a listener holds them: dropped, they give the slot back.
    let l0 = arena.listener_counters(0);
    let l1 = arena.listener_counters(1);
    CounterBlock::add(&l0.blocks[1].bytes_spliced, 10);
    CounterBlock::add(&l1.blocks[0].relays_accepted, 3);
    CounterBlock::add(&arena.worker_block(1).pipes_in_use, 2);
    let snap = arena.snapshot();
    assert_eq!(snap.listeners.len(), 2);
    assert_eq!(snap.listeners[0].name, "127.0.0.1:6432");
    assert_eq!(snap.listeners[0].total().bytes_spliced, 10);
    assert_eq!(snap.listeners[1].workers[0].relays_accepted, 3);
    assert_eq!(snap.workers[1].pipes_in_use, 2);
    assert_eq!(snap.state, InstanceState::Running);
    arena.set_state(State::Draining);
    assert_eq!(arena.snapshot().state, InstanceState::Draining);
}

#[test]
fn a_long_name_is_cut_on_a_char_boundary() {
    let name = "é".repeat(40);
    let arena = Arena::new(1, &[name], 0);
    let got = &arena.snapshot().listeners[0].name;
    assert_eq!(got.len(), 64);
    assert!(got.chars().all(|c| c == 'é'));
}

#[test]
fn instance_names_are_file_names() {
    assert!(check_instance_name("pg-main_1.a").is_ok());
    for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
        assert!(check_instance_name(bad).is_err(), "{bad}");
    }
}
