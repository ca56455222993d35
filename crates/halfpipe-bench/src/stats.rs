//! The arithmetic of the report: throughput, percentiles, Jain's index.

use std::time::Duration;

pub const MIB: f64 = 1024.0 * 1024.0;

/// MiB per second; 0 for an empty interval.
pub fn mib_s(bytes: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / MIB / s
    } else {
        0.0
    }
}

/// The nearest-rank percentile `p` (0 < p <= 100) of sorted samples: the
/// smallest sample with at least p% of the samples at or below it. None for
/// no samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Jain's fairness index (Σx)² / (n·Σx²): 1 when all shares are equal, 1/n
/// when one takes everything. 0 for no samples or all zero.
pub fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    if xs.is_empty() || squares == 0.0 {
        0.0
    } else {
        sum * sum / (xs.len() as f64 * squares)
    }
}

/// Latency summary in microseconds, from samples in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn summarize(nanos: &mut [u64]) -> Summary {
    nanos.sort_unstable();
    let us = |v: Option<u64>| v.map_or(0.0, |n| n as f64 / 1000.0);
    let mean = if nanos.is_empty() {
        0.0
    } else {
        nanos.iter().map(|&n| n as f64).sum::<f64>() / nanos.len() as f64 / 1000.0
    };
    Summary {
        p50: us(percentile(nanos, 50.0)),
        p90: us(percentile(nanos, 90.0)),
        p99: us(percentile(nanos, 99.0)),
        max: us(nanos.last().copied()),
        mean,
    }
}

/// The median of a few samples (sorts them).
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 90.0), Some(90));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.1), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        // Ten samples: p99 is the largest, p50 the fifth.
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 99.0), Some(10));
        assert_eq!(percentile(&v, 50.0), Some(5));
    }

    #[test]
    fn summary_in_microseconds() {
        let mut ns = vec![3000, 1000, 2000, 4000];
        let s = summarize(&mut ns);
        assert_eq!(s.p50, 2.0);
        assert_eq!(s.max, 4.0);
        assert_eq!(s.mean, 2.5);
        assert_eq!(summarize(&mut []).p99, 0.0);
    }

    #[test]
    fn jains_index() {
        assert_eq!(jain(&[5.0, 5.0, 5.0, 5.0]), 1.0);
        assert_eq!(jain(&[1.0, 0.0, 0.0, 0.0]), 0.25);
        // (1+2+3)^2 / (3 * 14) = 36/42
        assert!((jain(&[1.0, 2.0, 3.0]) - 36.0 / 42.0).abs() < 1e-12);
        assert_eq!(jain(&[]), 0.0);
        assert_eq!(jain(&[0.0, 0.0]), 0.0);
    }

    #[test]
    fn throughput_and_median() {
        assert_eq!(mib_s(1 << 20, Duration::from_millis(500)), 2.0);
        assert_eq!(mib_s(1, Duration::ZERO), 0.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
