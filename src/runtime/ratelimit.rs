//! Rate limits for log lines a peer can trigger: a hostile or broken peer
//! sending malformed cells (or BEGINs the exit policy refuses) as fast as
//! it can must not fill the disk. Each kind of line goes through one
//! process-wide token bucket (`PER_SEC` a second, bursts of as many); what
//! does not fit is counted, and the next line that gets through is
//! preceded by one "N more ... suppressed" line. Metrics count every event
//! either way.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// Lines of one kind per second, and the burst allowed.
pub const PER_SEC: u32 = 10;

/// A token bucket: `capacity` tokens, refilled at `capacity` per `period`.
/// Kept in nanoseconds of credit (a token costs `period / capacity`), so
/// the arithmetic is exact.
#[derive(Debug)]
pub struct TokenBucket {
    /// Credit when full: `period`.
    full: u128,
    /// Credit one token costs.
    cost: u128,
    credit: u128,
    last: Instant,
    /// Denied since the last allowed take.
    suppressed: u64,
}

impl TokenBucket {
    /// A full bucket of `capacity` tokens that refills `capacity` per `period`.
    pub fn new(capacity: u32, period: Duration, now: Instant) -> TokenBucket {
        let full = period.as_nanos().max(1);
        let cost = (full / u128::from(capacity.max(1))).max(1);
        TokenBucket {
            full,
            cost,
            credit: full,
            last: now,
            suppressed: 0,
        }
    }

    /// Takes one token at `now`. `Some(n)`: allowed, and `n` takes were
    /// denied since the last allowed one. `None`: denied (and counted).
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        self.credit = (self.credit + elapsed).min(self.full);
        if self.credit >= self.cost {
            self.credit -= self.cost;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

static VIOLATIONS: Mutex<Option<TokenBucket>> = parking_lot::const_mutex(None);
static REFUSALS: Mutex<Option<TokenBucket>> = parking_lot::const_mutex(None);

/// Takes a token from `bucket`; logs the "N more suppressed" line itself
/// when it is due.
fn allowed(bucket: &Mutex<Option<TokenBucket>>, what: &str) -> bool {
    let now = Instant::now();
    let allowed = bucket
        .lock()
        .get_or_insert_with(|| TokenBucket::new(PER_SEC, Duration::from_secs(1), now))
        .take(now);
    match allowed {
        Some(0) => true,
        Some(n) => {
            tracing::warn!("{n} more {what} suppressed (at most {PER_SEC} logged a second)");
            true
        }
        None => false,
    }
}

/// May a protocol-violation warning be logged now? Call as
/// `if ratelimit::violation_warning() { tracing::warn!(...) }`.
pub fn violation_warning() -> bool {
    allowed(&VIOLATIONS, "protocol violations")
}

/// May an exit-policy refusal be logged now?
pub fn refusal_line() -> bool {
    allowed(&REFUSALS, "exit-policy refusals")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_burst_of_capacity_then_denied_and_counted() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, SEC, t0);
        for _ in 0..10 {
            assert_eq!(b.take(t0), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(b.take(t0), None);
        }
        // A tenth of a second later: one token, and the count of the denied.
        assert_eq!(b.take(t0 + SEC / 10), Some(25));
        assert_eq!(b.take(t0 + SEC / 10), None);
        assert_eq!(b.take(t0 + SEC / 5), Some(1));
    }

    #[test]
    fn refills_to_capacity_only() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, SEC, t0);
        let later = t0 + 100 * SEC;
        let allowed = (0..50).filter(|_| b.take(later).is_some()).count();
        assert_eq!(allowed, 10, "no more than one burst after a long quiet");
    }

    #[test]
    fn steady_rate_is_allowed() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, SEC, t0);
        // 10 a second for 10 seconds, after the initial burst is spent.
        (0..10).for_each(|_| assert!(b.take(t0).is_some()));
        for i in 1..=100u32 {
            assert_eq!(b.take(t0 + SEC / 10 * i), Some(0), "take {i}");
        }
    }

    #[test]
    fn time_going_backwards_does_not_panic_or_refill() {
        let t0 = Instant::now() + SEC;
        let mut b = TokenBucket::new(1, SEC, t0);
        assert!(b.take(t0).is_some());
        assert!(b.take(t0 - SEC / 2).is_none());
    }

    #[test]
    fn the_process_limiter_lets_a_burst_through_then_suppresses() {
        let allowed = (0..1000).filter(|_| violation_warning()).count();
        assert!((1..=PER_SEC as usize + 1).contains(&allowed), "{allowed}");
    }
}
