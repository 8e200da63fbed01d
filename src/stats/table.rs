//! The counter tables' vocabulary and the macro that turns one table into a
//! block of atomics, its summed snapshot and the description every reader
//! (`/metrics`, `spliced stats`, the stats file's layout check) works from.

/// Whether a value only grows or goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum Kind {
    Counter,
    Gauge,
}

/// What a counter is kept for: each listener (relays, bytes, closes), each
/// worker (pipes, buffers, timers, which relays of every listener share),
/// or each server of a listener's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum Scope {
    Listener,
    Worker,
    Server,
}

/// The `/metrics` family a counter is a member of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    /// The family's name (a counter's without `_total`, which the encoder
    /// adds).
    pub family: &'static str,
    /// The labels that tell this member from the family's others, after
    /// those of its scope (`listener`, `worker`, `listener` and `server`).
    pub labels: &'static [(&'static str, &'static str)],
    /// The family's help text, given on one member of the family only.
    pub help: Option<&'static str>,
}

/// Where a counter is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shown {
    pub metric: Option<Metric>,
    /// The `spliced stats` column it goes into, as is or as a rate or share.
    pub column: Option<&'static str>,
}

/// One row of a counter table: what a value is called and means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterInfo {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub help: &'static str,
    pub shown: Shown,
}

/// Counters kept per reason of an enum (an array of counters, one per
/// reason), shown as one family with the reason as a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByReasonInfo {
    pub name: &'static str,
    pub scope: Scope,
    pub family: &'static str,
    pub help: &'static str,
    /// The label the reason goes into.
    pub label: &'static str,
    /// The reasons' label values, in array order.
    pub reasons: &'static [&'static str],
}

/// A latency histogram: counts per bucket (an array, one past the last
/// bound), with its count and sum kept by two counters of the table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HistogramInfo {
    pub name: &'static str,
    pub scope: Scope,
    pub family: &'static str,
    pub help: &'static str,
    /// Upper bounds of the buckets, in seconds.
    pub bounds: &'static [f64],
    /// The counter of observations.
    pub count: &'static str,
    /// The counter of their sum, in microseconds.
    pub sum_micros: &'static str,
}

/// Everything one counter table declares, in the block's layout order:
/// its counters, then its per-reason arrays, then its histograms' buckets.
#[derive(Clone, Copy, Debug)]
pub struct Table {
    pub counters: &'static [CounterInfo],
    pub by_reason: &'static [ByReasonInfo],
    pub histograms: &'static [HistogramInfo],
}

impl Table {
    /// Where the counter `name` is in [`Table::counters`] (and in
    /// [`Values::values`]).
    pub fn position(&self, name: &str) -> Option<usize> {
        self.counters.iter().position(|c| c.name == name)
    }

    /// Every name of the block, in layout order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> {
        let counters = self.counters.iter().map(|c| c.name);
        let by_reason = self.by_reason.iter().map(|r| r.name);
        counters
            .chain(by_reason)
            .chain(self.histograms.iter().map(|h| h.name))
    }
}

/// A histogram's values in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramValues<'a> {
    pub count: u64,
    pub sum_micros: u64,
    /// Per bucket (not cumulative), the last one past the last bound.
    pub buckets: &'a [u64],
}

/// A summed snapshot read by the description of its table.
pub trait Values {
    /// Each counter's value, in the order of [`Table::counters`].
    fn values(&self) -> Vec<u64>;
    /// Each per-reason array, in the order of [`Table::by_reason`].
    fn by_reason(&self) -> Vec<&[u64]>;
    /// Each histogram, in the order of [`Table::histograms`].
    fn histograms(&self) -> Vec<HistogramValues<'_>>;
    /// Every word of the snapshot, counters, per-reason arrays and
    /// buckets in layout order, to change one at a time (tests).
    fn words_mut(&mut self) -> Vec<&mut u64>;
}

/// Where a counter is shown: `[]` (a histogram's count or sum only),
/// `[column "HEAD"]`, or `["family" {label = "value", ..} "help", column
/// "HEAD"]` with the labels, the help (on one member of the family) and the
/// column each optional.
macro_rules! shown {
    (@help) => { None };
    (@help $help:literal) => { Some($help) };
    (@column) => { None };
    (@column $column:literal) => { Some($column) };
    () => {
        $crate::stats::Shown { metric: None, column: None }
    };
    (column $column:literal) => {
        $crate::stats::Shown { metric: None, column: Some($column) }
    };
    ($family:literal $({$($key:ident = $value:literal),+})? $($help:literal)? $(, column $column:literal)?) => {
        $crate::stats::Shown {
            metric: Some($crate::stats::Metric {
                family: $family,
                labels: &[$($((stringify!($key), $value)),+)?],
                help: shown!(@help $($help)?),
            }),
            column: shown!(@column $($column)?),
        }
    };
}

/// Declares a counter table once. From it come the live block (a fixed
/// `repr(C)` layout of plain atomics, placed in the stats file), the summed
/// snapshot with `sum`, `+` and [`Values`], and the [`Table`] that
/// `/metrics`, `spliced stats`'s checks and the stats file's layout
/// fingerprint read.
///
/// A row of `counters` is `/// doc` then `name: Kind per Scope => [shown]`
/// (see `shown!`); of `by_reason`, `name[Enum]: per Scope => "family"
/// {label} "help"`, with `Enum::ALL` and `Enum::NAMES`; of `histograms`,
/// `name[BOUNDS]: per Scope, count counter, micros counter => "family"
/// "help"`.
macro_rules! counter_table {
    (
        $(#[doc = $block_doc:literal])+ block $block:ident;
        $(#[doc = $sum_doc:literal])+ sum $sum:ident;
        $(#[doc = $table_doc:literal])+ table $table:ident;
        counters {
            $($(#[doc = $help:literal])+ $name:ident: $kind:ident per $scope:ident => [$($shown:tt)*],)+
        }
        by_reason {
            $($(#[doc = $r_doc:literal])+ $r_name:ident[$reason:ident]: per $r_scope:ident
                => $r_family:literal {$r_label:ident} $r_help:literal,)*
        }
        histograms {
            $($(#[doc = $h_doc:literal])+ $h_name:ident[$bounds:ident]: per $h_scope:ident,
                count $count:ident, micros $micros:ident => $h_family:literal $h_help:literal,)*
        }
    ) => {
        $crate::sys::shared::word_block! {
            $(#[doc = $block_doc])+
            pub struct $block {
                $($(#[doc = $help])+ pub $name: AtomicU64,)+
                $($(#[doc = $r_doc])+ pub(crate) $r_name: [AtomicU64; $reason::ALL.len()],)*
                $($(#[doc = $h_doc])+ pub(crate) $h_name: [AtomicU64; $bounds.len() + 1],)*
            }
        }

        $(#[doc = $sum_doc])+
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize))]
        pub struct $sum {
            $($(#[doc = $help])+ pub $name: u64,)+
            $($(#[doc = $r_doc])+ pub $r_name: [u64; $reason::ALL.len()],)*
            $($(#[doc = $h_doc])+ pub $h_name: [u64; $bounds.len() + 1],)*
        }

        $(#[doc = $table_doc])+
        pub const $table: $crate::stats::Table = $crate::stats::Table {
            counters: &[$($crate::stats::CounterInfo {
                name: stringify!($name),
                kind: $crate::stats::Kind::$kind,
                scope: $crate::stats::Scope::$scope,
                help: concat!($($help),+),
                shown: shown!($($shown)*),
            },)+],
            by_reason: &[$($crate::stats::ByReasonInfo {
                name: stringify!($r_name),
                scope: $crate::stats::Scope::$r_scope,
                family: $r_family,
                help: $r_help,
                label: stringify!($r_label),
                reasons: &$reason::NAMES,
            },)*],
            histograms: &[$($crate::stats::HistogramInfo {
                name: stringify!($h_name),
                scope: $crate::stats::Scope::$h_scope,
                family: $h_family,
                help: $h_help,
                bounds: &$bounds,
                count: stringify!($count),
                sum_micros: stringify!($micros),
            },)*],
        };

        impl $block {
            /// Adds `from`'s counters, per-reason arrays and histogram
            /// buckets to this block, never its gauges (a live upgrade's
            /// new process carries on from the old one's counts).
            #[allow(dead_code)]
            pub(crate) fn seed(&self, from: &$sum) {
                $(if $crate::stats::Kind::$kind == $crate::stats::Kind::Counter {
                    self.$name.fetch_add(from.$name, Relaxed);
                })+
                $(for (word, v) in self.$r_name.iter().zip(&from.$r_name) {
                    word.fetch_add(*v, Relaxed);
                })*
                $(for (word, v) in self.$h_name.iter().zip(&from.$h_name) {
                    word.fetch_add(*v, Relaxed);
                })*
            }
        }

        impl $sum {
            /// Sums blocks (one per worker) at one moment.
            pub(crate) fn sum<'a>(blocks: impl IntoIterator<Item = &'a $block>) -> $sum {
                let mut s = $sum::default();
                for b in blocks {
                    $(s.$name += b.$name.load(Relaxed);)+
                    $($crate::stats::add_loaded(&mut s.$r_name, &b.$r_name);)*
                    $($crate::stats::add_loaded(&mut s.$h_name, &b.$h_name);)*
                }
                s
            }
        }

        /// Adds another sum (another worker's, another listener's view of
        /// the same thing) field by field.
        impl std::ops::AddAssign<&$sum> for $sum {
            fn add_assign(&mut self, other: &$sum) {
                $(self.$name += other.$name;)+
                $($crate::stats::add_values(&mut self.$r_name, &other.$r_name);)*
                $($crate::stats::add_values(&mut self.$h_name, &other.$h_name);)*
            }
        }

        impl std::ops::Add for $sum {
            type Output = $sum;

            fn add(mut self, other: $sum) -> $sum {
                self += &other;
                self
            }
        }

        impl $crate::stats::Values for $sum {
            fn values(&self) -> Vec<u64> {
                vec![$(self.$name),+]
            }

            fn by_reason(&self) -> Vec<&[u64]> {
                vec![$(&self.$r_name[..]),*]
            }

            fn histograms(&self) -> Vec<$crate::stats::HistogramValues<'_>> {
                vec![$($crate::stats::HistogramValues {
                    count: self.$count,
                    sum_micros: self.$micros,
                    buckets: &self.$h_name[..],
                }),*]
            }

            fn words_mut(&mut self) -> Vec<&mut u64> {
                let mut words: Vec<&mut u64> = vec![$(&mut self.$name),+];
                $(words.extend(self.$r_name.iter_mut());)*
                $(words.extend(self.$h_name.iter_mut());)*
                words
            }
        }
    };
}
