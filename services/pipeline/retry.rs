//! Which failures are retried, and how long to wait before the next attempt.

use std::time::Duration;
use tonic::Code;

/// Whether a failed attempt may succeed if tried again (on another instance
/// where one exists). Input errors and permanent refusals are not retried.
pub fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unknown
    )
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay ceiling after the first failed attempt.
    pub base: Duration,
    /// Largest delay ceiling.
    pub max: Duration,
}

impl Backoff {
    /// The delay after failed attempt `attempt` (1-based): a random duration
    /// in `[ceiling/2, ceiling]`, where the ceiling doubles per attempt up to
    /// `max`. Half the ceiling is kept so retries never bunch up at zero; the
    /// random half spreads out records that failed together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(1 << attempt.saturating_sub(1).min(20)).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_bounded() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1) };
        for _ in 0..100 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100), "{d1:?}");
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400), "{d3:?}");
            let d30 = b.delay(30);
            assert!(d30 >= Duration::from_millis(500) && d30 <= Duration::from_secs(1), "{d30:?}");
        }
    }

    #[test]
    fn classification() {
        assert!(is_transient(Code::Unavailable));
        assert!(is_transient(Code::DeadlineExceeded));
        assert!(!is_transient(Code::InvalidArgument));
        assert!(!is_transient(Code::FailedPrecondition));
        assert!(!is_transient(Code::Cancelled));
    }
}
