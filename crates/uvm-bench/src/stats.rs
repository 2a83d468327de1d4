//! Order statistics of a benchmark's samples: median, 90th percentile, maximum.

use std::time::Duration;

use serde::Serialize;

/// Summary of one measurement's samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// How many samples.
    pub n: usize,
    pub min: f64,
    /// The middle sample (the mean of the two middle ones for an even count).
    pub median: f64,
    /// Nearest-rank 90th percentile: the smallest sample with at least 90 % of the samples at or
    /// below it (with 5 samples that is the maximum).
    pub p90: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// The summary of `samples`; `None` when there are none or one is not a number.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Summary {
            n,
            min: sorted[0],
            median,
            p90: nearest_rank(&sorted, 90),
            max: sorted[n - 1],
            mean: sorted.iter().sum::<f64>() / n as f64,
        })
    }

    /// The summary of durations, in milliseconds.
    pub fn of_durations(samples: &[Duration]) -> Option<Summary> {
        Summary::of(&samples.iter().copied().map(ms).collect::<Vec<_>>())
    }
}

/// The nearest-rank `pct` percentile of sorted, non-empty samples.
fn nearest_rank(sorted: &[f64], pct: usize) -> f64 {
    let n = sorted.len();
    // rank = ceil(pct/100 · n), 1-based, at least 1.
    let rank = (pct * n).div_ceil(100).clamp(1, n);
    sorted[rank - 1]
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The median of `samples` (0 when empty): for per-phase breakdowns.
pub fn median(samples: &[f64]) -> f64 {
    Summary::of(samples).map_or(0.0, |s| s.median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_median_is_the_middle_sample() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).expect("samples");
        assert_eq!(s.n, 3);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.median, 3.0);
        assert_eq!(s.max, 5.0);
        assert_eq!(s.mean, 3.0);
    }

    #[test]
    fn even_count_median_averages_the_middle_pair() {
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).expect("samples");
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn p90_is_nearest_rank() {
        // 10 samples: rank ceil(9.0) = 9 → the 9th smallest.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(Summary::of(&ten).expect("samples").p90, 9.0);
        // 5 samples: rank ceil(4.5) = 5 → the maximum.
        let five = [10.0, 20.0, 30.0, 40.0, 50.0];
        assert_eq!(Summary::of(&five).expect("samples").p90, 50.0);
        // 20 samples: rank 18.
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(Summary::of(&twenty).expect("samples").p90, 18.0);
        // 11 samples: rank ceil(9.9) = 10.
        let eleven: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(Summary::of(&eleven).expect("samples").p90, 10.0);
    }

    #[test]
    fn one_sample_is_every_statistic() {
        let s = Summary::of(&[7.5]).expect("samples");
        assert_eq!(
            (s.min, s.median, s.p90, s.max, s.mean),
            (7.5, 7.5, 7.5, 7.5, 7.5)
        );
    }

    #[test]
    fn empty_or_nan_has_no_summary() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn durations_are_summarised_in_milliseconds() {
        let s = Summary::of_durations(&[Duration::from_micros(1500), Duration::from_millis(3)])
            .expect("samples");
        assert_eq!(s.median, 2.25);
        assert_eq!(s.max, 3.0);
    }

    #[test]
    fn order_of_samples_does_not_matter() {
        let a = Summary::of(&[3.0, 1.0, 2.0, 9.0, 4.0]).expect("samples");
        let b = Summary::of(&[9.0, 4.0, 3.0, 2.0, 1.0]).expect("samples");
        assert_eq!(a, b);
    }
}
