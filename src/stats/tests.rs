use super::*;

#[test]
fn each_table_names_every_value_once_with_help() {
    for (table, words) in [
        (COUNTERS, Stats::default().words_mut().len()),
        (SERVER_COUNTERS, ServerStats::default().words_mut().len()),
    ] {
        let mut names: Vec<&str> = table.names().collect();
        names.sort();
        names.dedup();
        assert_eq!(
            names.len(),
            table.names().count(),
            "a name is declared twice"
        );
        assert!(table.counters.iter().all(|c| !c.help.trim().is_empty()));
        let arrays: usize = table
            .by_reason
            .iter()
            .map(|r| r.reasons.len())
            .sum::<usize>()
            + table
                .histograms
                .iter()
                .map(|h| h.bounds.len() + 1)
                .sum::<usize>();
        assert_eq!(table.counters.len() + arrays, words);
    }
    assert!(COUNTERS.counters.iter().any(|c| c.scope == Scope::Worker));
}

/// The members of one `/metrics` family agree on kind, scope and label
/// names, differ in label values, and one of them gives the help.
#[test]
fn families_are_consistent() {
    for table in [COUNTERS, SERVER_COUNTERS] {
        let members = |family: &str| -> Vec<(&CounterInfo, Metric)> {
            table
                .counters
                .iter()
                .filter_map(|c| c.shown.metric.map(|m| (c, m)))
                .filter(|(_, m)| m.family == family)
                .collect()
        };
        for c in table.counters {
            let Some(m) = c.shown.metric else { continue };
            assert!(m.family.starts_with("spliced_"), "{}", m.family);
            let all = members(m.family);
            let (first, first_m) = all[0];
            let keys = |m: &Metric| m.labels.iter().map(|l| l.0).collect::<Vec<_>>();
            assert_eq!((c.kind, c.scope), (first.kind, first.scope), "{}", c.name);
            assert_eq!(keys(&m), keys(&first_m), "{}", c.name);
            let same = all.iter().filter(|(_, o)| o.labels == m.labels).count();
            assert_eq!(same, 1, "{}: two members with the same labels", c.name);
            let helps = all.iter().filter(|(_, o)| o.help.is_some()).count();
            assert_eq!(helps, 1, "{}: give its help once", m.family);
        }
        // A counter no family shows is a histogram's count or sum.
        for c in table.counters {
            if c.shown.metric.is_none() && c.shown.column.is_none() {
                assert!(
                    table
                        .histograms
                        .iter()
                        .any(|h| h.count == c.name || h.sum_micros == c.name),
                    "{} is shown nowhere",
                    c.name
                );
            }
        }
        for h in table.histograms {
            assert!(table.position(h.count).is_some() && table.position(h.sum_micros).is_some());
        }
    }
}

#[test]
fn sums_add_workers_and_keep_the_table_order() {
    let (a, b) = (CounterBlock::default(), CounterBlock::default());
    CounterBlock::add(&a.bytes_spliced, 5);
    CounterBlock::add(&b.bytes_spliced, 7);
    CounterBlock::add(&b.relays_active, 2);
    CounterBlock::sub(&b.relays_active, 1);
    b.closed(CloseReason::Idle);
    b.connected(std::time::Duration::from_millis(3));
    let s = Stats::sum([&a, &b]);
    assert_eq!(s.bytes_spliced, 12);
    assert_eq!(s.relays_active, 1);
    assert_eq!(s.closed(CloseReason::Idle), 1);
    assert_eq!(s.closed_total(), 1);
    let at = |name| COUNTERS.position(name).unwrap();
    assert_eq!(s.values()[at("bytes_spliced")], 12);
    assert_eq!(COUNTERS.counters[at("relays_active")].kind, Kind::Gauge);
    assert_eq!(s.by_reason()[0][CloseReason::Idle as usize], 1);
    let h = s.histograms()[0];
    assert_eq!((h.count, h.sum_micros), (1, 3000));
    assert_eq!(h.buckets.iter().sum::<u64>(), 1);
    let doubled = s.clone() + s.clone();
    assert_eq!(doubled.bytes_spliced, 24);
    assert_eq!(doubled.connect_buckets.iter().sum::<u64>(), 2);
}

#[test]
fn server_sums_add_workers() {
    let (a, b) = (ServerBlock::default(), ServerBlock::default());
    a.moved(true, false, 4);
    b.moved(true, false, 6);
    b.connected(std::time::Duration::from_secs(9));
    let mut s = ServerStats::sum([&a, &b]);
    assert_eq!((s.bytes_u2c(), s.connects), (10, 1));
    assert_eq!(s.connect_buckets[CONNECT_BUCKETS.len()], 1);
    s += &s.clone();
    assert_eq!((s.bytes_u2c_copied, s.connect_micros), (20, 18_000_000));
}
