//! When a comparison between two medians is a figure and when it is noise.
//!
//! A ratio or a difference of two medians carries the spread of both: the
//! spread of a median is the largest distance of one of its runs from it.
//! A ratio or a difference whose spread is as large as itself says nothing,
//! and is printed as "within noise"; so is an added latency that is not
//! larger than its spread, which covers every negative one (a proxy does not
//! make a round trip faster than no proxy; a negative difference is noise).

use super::measure::Summary;

/// What a comparison states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compared {
    /// `a / b`, printed as `0.57×`.
    Ratio,
    /// The latency a proxy adds over `direct`, `a − b` in µs, printed `+22.3`.
    Added,
}

pub const WITHIN_NOISE: &str = "within noise";

/// The absolute spread of a median: the largest distance of a run from it.
pub fn spread(s: &Summary) -> f64 {
    (s.max - s.median).max(s.median - s.min)
}

/// `a / b` of the medians and its spread (the relative spreads add).
pub fn ratio(a: &Summary, b: &Summary) -> (f64, f64) {
    let r = a.median / b.median;
    let rel = spread(a) / a.median.abs() + spread(b) / b.median.abs();
    (r, (r * rel).abs())
}

/// `a − b` of the medians and its spread (the absolute spreads add).
pub fn difference(a: &Summary, b: &Summary) -> (f64, f64) {
    (a.median - b.median, spread(a) + spread(b))
}

/// Whether a comparison is lost in its spread.
pub fn is_noise(kind: Compared, value: f64, spread: f64) -> bool {
    if !value.is_finite() || !spread.is_finite() {
        return true;
    }
    match kind {
        Compared::Ratio => spread >= value.abs(),
        Compared::Added => value <= spread,
    }
}

/// The text of a comparison: the figure, or "within noise".
pub fn text(kind: Compared, value: f64, spread: f64) -> String {
    if is_noise(kind, value, spread) {
        return WITHIN_NOISE.into();
    }
    match kind {
        Compared::Ratio => format!("{value:.2}×"),
        Compared::Added => format!("+{value:.1}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comparison_inside_its_spread_is_noise() {
        // Ratios: printed while the spread is smaller than the ratio.
        assert_eq!(text(Compared::Ratio, 0.57, 0.05), "0.57×");
        assert_eq!(text(Compared::Ratio, 2.11, 2.0), "2.11×");
        assert_eq!(text(Compared::Ratio, 0.86, 0.86), WITHIN_NOISE);
        assert_eq!(text(Compared::Ratio, 0.5, 3.1), WITHIN_NOISE);
        assert_eq!(text(Compared::Ratio, f64::NAN, 0.0), WITHIN_NOISE);
        assert_eq!(text(Compared::Ratio, f64::INFINITY, 0.0), WITHIN_NOISE);
        // Added latency: printed, with its sign, only above its spread.
        assert_eq!(text(Compared::Added, 22.34, 3.0), "+22.3");
        assert_eq!(text(Compared::Added, 3.0, 3.0), WITHIN_NOISE);
        assert_eq!(text(Compared::Added, 2.0, 40.0), WITHIN_NOISE);
        // Never a negative latency, whatever its spread.
        assert_eq!(text(Compared::Added, -1431.7, 1916.0), WITHIN_NOISE);
        assert_eq!(text(Compared::Added, -5.0, 0.0), WITHIN_NOISE);
        assert_eq!(text(Compared::Added, 0.0, 0.0), WITHIN_NOISE);
        assert_eq!(text(Compared::Added, 1.0, f64::NAN), WITHIN_NOISE);
    }

    #[test]
    fn spreads_of_ratios_and_differences() {
        let s = |v: &[f64]| Summary::of(v).unwrap();
        // 10 ±1 over 20 ±4: 0.5 with 10% + 20% of it.
        let (r, sp) = ratio(&s(&[9.0, 10.0, 11.0]), &s(&[16.0, 20.0, 24.0]));
        assert!(
            (r - 0.5).abs() < 1e-12 && (sp - 0.15).abs() < 1e-12,
            "{r} {sp}"
        );
        // p50 196 (runs 150..4000) against direct 1627 (runs 1600..1650).
        let (d, sp) = difference(&s(&[150.0, 196.0, 3950.0]), &s(&[1600.0, 1627.0, 1650.0]));
        assert!(
            (d + 1431.0).abs() < 1e-9 && (sp - 3781.0).abs() < 1e-9,
            "{d} {sp}"
        );
        assert_eq!(text(Compared::Added, d, sp), WITHIN_NOISE);
    }
}
