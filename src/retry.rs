//! Retry policies: how many attempts a task gets, how long to wait between
//! them, and how long one attempt may take.
//!
//! A failed attempt is retried when the failure may go away by itself: a
//! [`TaskError::retryable`](crate::TaskError::retryable) error, a panic, or
//! a timeout. Invalid input (a fatal error, bad parameters, an unknown
//! entrypoint) is never retried. A retry does not block the partition: the
//! task goes back to PENDING and its message waits in the outbox until due.

use std::time::Duration;

use rand::Rng;

/// How a task is retried. Tasks declare one with
/// [`Task::retry_policy`](crate::Task::retry_policy); the worker's
/// (`--max-attempts`, `--retry-backoff`, `--task-timeout`) applies otherwise.
///
/// ```
/// use std::time::Duration;
/// use kser::RetryPolicy;
///
/// let policy = RetryPolicy {
///     max_attempts: 5,
///     initial_backoff: Duration::from_millis(500),
///     timeout: Some(Duration::from_secs(30)),
///     ..RetryPolicy::NONE
/// };
/// assert_eq!(policy.backoff_without_jitter(1), Duration::from_millis(500));
/// assert_eq!(policy.backoff_without_jitter(3), Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; 1 means no retry.
    pub max_attempts: u32,
    /// The wait before the second attempt.
    pub initial_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// Each wait is this many times the previous one.
    pub multiplier: f64,
    /// Each wait is shortened by up to this fraction, at random (0 to 1), so
    /// tasks that failed together do not all retry at the same moment.
    pub jitter: f64,
    /// How long one attempt may run before it is cancelled and counts as a
    /// failure (`None`: no limit).
    pub timeout: Option<Duration>,
}

impl RetryPolicy {
    /// One attempt, no retry, no timeout: the worker's default.
    pub const NONE: Self = Self {
        max_attempts: 1,
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(300),
        multiplier: 2.0,
        jitter: 0.1,
        timeout: None,
    };

    /// Whether a task that failed on `attempt` (from 1) with an error of
    /// `kind` (`retval.error.kind`) gets another attempt.
    pub fn should_retry(&self, attempt: u32, kind: Option<&str>) -> bool {
        attempt < self.max_attempts && matches!(kind, Some("retryable" | "panic" | "timeout"))
    }

    /// The wait after failed attempt `attempt` (from 1), before jitter:
    /// `initial_backoff * multiplier^(attempt - 1)`, at most `max_backoff`.
    pub fn backoff_without_jitter(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let seconds = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = seconds.min(self.max_backoff.as_secs_f64());
        Duration::try_from_secs_f64(capped).unwrap_or(self.max_backoff)
    }

    /// The wait after failed attempt `attempt`, with jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let full = self.backoff_without_jitter(attempt);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return full;
        }
        full.mul_f64(1.0 - rand::rng().random_range(0.0..=jitter))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            jitter: 0.0,
            ..RetryPolicy::NONE
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = policy();
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(200));
        assert_eq!(policy.backoff(3), Duration::from_millis(350), "capped");
        assert_eq!(
            policy.backoff(60),
            Duration::from_millis(350),
            "no overflow"
        );
    }

    #[test]
    fn jitter_only_shortens_the_wait() {
        let policy = RetryPolicy {
            jitter: 0.5,
            ..policy()
        };
        for _ in 0..100 {
            let wait = policy.backoff(2);
            assert!(wait <= Duration::from_millis(200) && wait >= Duration::from_millis(100));
        }
    }

    #[test]
    fn only_failures_that_may_pass_are_retried() {
        let policy = policy();
        for kind in ["retryable", "panic", "timeout"] {
            assert!(policy.should_retry(1, Some(kind)), "{kind}");
            assert!(
                !policy.should_retry(4, Some(kind)),
                "{kind}: attempts used up"
            );
        }
        for kind in [
            "fatal",
            "invalid_params",
            "unknown_entrypoint",
            "invalid_message",
        ] {
            assert!(!policy.should_retry(1, Some(kind)), "{kind}");
        }
        assert!(!policy.should_retry(1, None));
        assert!(!RetryPolicy::NONE.should_retry(1, Some("retryable")));
    }
}
