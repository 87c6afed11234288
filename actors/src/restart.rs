//! Restart policy: when an exited instance comes back. Pure: the supervisor feeds it starts and
//! exits with `now`, and it answers when (or whether) to start the instance again.
//!
//! The first restart is immediate; each further consecutive one waits `base`, `2·base`,
//! `4·base`, … up to `cap`. Running for `reset_after` resets the count. `max_attempts` (0 =
//! unlimited) bounds consecutive restarts.

use shoal_config::{RestartCondition, RestartPolicy};

/// How an instance ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited by itself with this code.
    Code(i64),
    /// The kernel killed it for memory.
    OomKilled,
    /// Its liveness probe failed and the supervisor stopped it.
    Unhealthy,
}

impl Exit {
    fn is_failure(self) -> bool {
        !matches!(self, Exit::Code(0))
    }
}

/// What to do about an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start it again at once.
    RestartNow,
    /// Start it again at this time (ms on the caller's clock).
    RestartAt(u64),
    /// Leave it exited: the policy does not restart this exit.
    Stay,
    /// Leave it exited: too many consecutive restarts.
    GiveUp {
        /// Restarts made before giving up.
        attempts: u32,
    },
}

/// Restart bookkeeping for one slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestartTracker {
    /// Consecutive restarts since the last reset.
    pub consecutive: u32,
    /// Restarts since the slot was first started (what `shoal ps` shows).
    pub total: u32,
    last_start_ms: Option<u64>,
}

impl RestartTracker {
    /// The instance (re)started at `now_ms`.
    pub fn started(&mut self, now_ms: u64) {
        self.last_start_ms = Some(now_ms);
    }

    /// The delay before restart number `n` (1-based) of a run of consecutive restarts.
    pub fn delay_ms(policy: &RestartPolicy, n: u32) -> u64 {
        if n <= 1 {
            return 0;
        }
        let base = policy.backoff.base.as_millis() as u64;
        let cap = policy.backoff.cap.as_millis() as u64;
        let shift = (n - 2).min(40);
        base.saturating_mul(1u64 << shift).min(cap)
    }

    /// The instance ended at `now_ms`; decides whether and when it restarts.
    pub fn exited(&mut self, now_ms: u64, exit: Exit, policy: &RestartPolicy) -> Decision {
        let ran = self.last_start_ms.map_or(0, |s| now_ms.saturating_sub(s));
        if ran >= policy.backoff.reset_after.as_millis() as u64 {
            self.consecutive = 0;
        }
        let wanted = match policy.policy {
            RestartCondition::Always => true,
            RestartCondition::OnFailure => exit.is_failure(),
            RestartCondition::Never => false,
        };
        if !wanted {
            return Decision::Stay;
        }
        if policy.max_attempts != 0 && self.consecutive >= policy.max_attempts {
            return Decision::GiveUp {
                attempts: self.consecutive,
            };
        }
        self.consecutive += 1;
        self.total += 1;
        match Self::delay_ms(policy, self.consecutive) {
            0 => Decision::RestartNow,
            d => Decision::RestartAt(now_ms + d),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy() -> RestartPolicy {
        let mut p = RestartPolicy::default();
        p.backoff.base = Duration::from_millis(200);
        p.backoff.cap = Duration::from_secs(2);
        p.backoff.reset_after = Duration::from_secs(10);
        p
    }

    #[test]
    fn the_first_restart_is_immediate_then_the_delay_doubles_up_to_the_cap() {
        let p = policy();
        let mut t = RestartTracker::default();
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..7 {
            t.started(now);
            now += 100;
            match t.exited(now, Exit::Code(1), &p) {
                Decision::RestartNow => delays.push(0),
                Decision::RestartAt(at) => {
                    delays.push(at - now);
                    now = at;
                }
                d => panic!("unexpected {d:?}"),
            }
        }
        assert_eq!(delays, vec![0, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(t.total, 7);
    }

    #[test]
    fn running_long_enough_resets_the_backoff() {
        let p = policy();
        let mut t = RestartTracker::default();
        t.started(0);
        assert_eq!(t.exited(10, Exit::Code(1), &p), Decision::RestartNow);
        t.started(10);
        assert_eq!(t.exited(20, Exit::Code(1), &p), Decision::RestartAt(220));
        t.started(220);
        assert_eq!(t.exited(20_000, Exit::OomKilled, &p), Decision::RestartNow);
        assert_eq!(t.consecutive, 1);
        assert_eq!(t.total, 3);
    }

    #[test]
    fn on_failure_leaves_a_clean_exit_alone_and_never_never_restarts() {
        let mut p = policy();
        p.policy = RestartCondition::OnFailure;
        let mut t = RestartTracker::default();
        assert_eq!(t.exited(5, Exit::Code(0), &p), Decision::Stay);
        assert_eq!(t.exited(5, Exit::Unhealthy, &p), Decision::RestartNow);
        p.policy = RestartCondition::Never;
        assert_eq!(t.exited(5, Exit::Code(3), &p), Decision::Stay);
    }

    #[test]
    fn max_attempts_gives_up_after_that_many_consecutive_restarts() {
        let mut p = policy();
        p.max_attempts = 2;
        let mut t = RestartTracker::default();
        assert_eq!(t.exited(0, Exit::Code(1), &p), Decision::RestartNow);
        assert!(matches!(
            t.exited(1, Exit::Code(1), &p),
            Decision::RestartAt(_)
        ));
        assert_eq!(
            t.exited(2, Exit::Code(1), &p),
            Decision::GiveUp { attempts: 2 }
        );
    }
}
