//! A hybrid logical clock (Kulkarni et al., 2014): a timestamp that stays close to wall time,
//! never goes backwards on one node, and is larger than every timestamp the node has seen.
//!
//! A timestamp packs 48 bits of unix milliseconds and a 16-bit logical counter into a `u64`, so
//! comparing timestamps is comparing integers. The clock is sans-I/O: the caller passes the wall
//! time in; nothing here reads a clock.

use serde::{Deserialize, Serialize};

use crate::MembershipError;

/// A hybrid logical timestamp: `(unix_ms << 16) | logical`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct HlcTimestamp(pub u64);

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MAX: u64 = (1 << LOGICAL_BITS) - 1;
const WALL_MAX: u64 = (1 << 48) - 1;

impl HlcTimestamp {
    /// A timestamp from wall milliseconds and a logical counter.
    pub fn new(wall_ms: u64, logical: u16) -> Self {
        Self((wall_ms.min(WALL_MAX) << LOGICAL_BITS) | u64::from(logical))
    }

    /// The wall-clock part, unix milliseconds.
    pub fn wall_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter.
    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MAX) as u16
    }

    /// The next timestamp after this one (logical + 1, carrying into the wall part).
    fn successor(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

/// One node's hybrid logical clock.
#[derive(Clone, Debug)]
pub struct HlcClock {
    last: HlcTimestamp,
    max_skew_ms: u64,
}

/// How far ahead of our wall clock a remote timestamp may be before it is refused (60 s).
pub const DEFAULT_MAX_SKEW_MS: u64 = 60_000;

impl HlcClock {
    /// A clock that refuses remote timestamps more than `max_skew_ms` ahead of local wall time.
    pub fn new(max_skew_ms: u64) -> Self {
        Self {
            last: HlcTimestamp::default(),
            max_skew_ms,
        }
    }

    /// A clock resuming after `last` (e.g. the value persisted before a restart), so it never
    /// issues a timestamp it issued before even if the wall clock stepped back.
    pub fn resume(last: HlcTimestamp, max_skew_ms: u64) -> Self {
        Self { last, max_skew_ms }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> HlcTimestamp {
        self.last
    }

    /// A timestamp for a local event (a write) at wall time `wall_ms`: strictly greater than
    /// every timestamp issued or observed before.
    pub fn now(&mut self, wall_ms: u64) -> HlcTimestamp {
        let candidate = HlcTimestamp::new(wall_ms, 0);
        self.last = if candidate > self.last {
            candidate
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Takes a remote timestamp into account (a received record). Refuses one further ahead of
    /// `wall_ms` than the skew bound, so a node with a runaway clock cannot drag everyone's
    /// clock into the future.
    pub fn observe(&mut self, remote: HlcTimestamp, wall_ms: u64) -> Result<(), MembershipError> {
        if remote.wall_ms() > wall_ms.saturating_add(self.max_skew_ms) {
            return Err(MembershipError::State(format!(
                "remote timestamp {} ms is {} ms ahead of the local clock (bound {} ms)",
                remote.wall_ms(),
                remote.wall_ms() - wall_ms,
                self.max_skew_ms
            )));
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_timestamp_keeps_its_wall_and_logical_parts() {
        let t = HlcTimestamp::new(1_700_000_000_000, 7);
        assert_eq!(t.wall_ms(), 1_700_000_000_000);
        assert_eq!(t.logical(), 7);
    }

    #[test]
    fn a_clock_stepping_back_still_issues_larger_timestamps() {
        let mut c = HlcClock::new(DEFAULT_MAX_SKEW_MS);
        let a = c.now(10_000);
        let b = c.now(5_000);
        assert!(b > a);
        assert_eq!(b.wall_ms(), 10_000);
    }

    #[test]
    fn a_timestamp_far_in_the_future_is_refused_and_not_adopted() {
        let mut c = HlcClock::new(1_000);
        let before = c.now(10_000);
        assert!(c.observe(HlcTimestamp::new(20_000, 0), 10_000).is_err());
        assert_eq!(c.last(), before);
        c.observe(HlcTimestamp::new(10_500, 3), 10_000).unwrap();
        assert!(c.now(10_000) > HlcTimestamp::new(10_500, 3));
    }

    proptest! {
        #[test]
        fn the_clock_is_monotonic_whatever_the_wall_clock_and_remote_stamps_do(
            steps in proptest::collection::vec((0u64..1_000_000, any::<bool>(), 0u64..1_200_000), 1..200)
        ) {
            let mut c = HlcClock::new(100_000);
            let mut prev = HlcTimestamp::default();
            for (wall, remote, remote_wall) in steps {
                if remote {
                    let r = HlcTimestamp::new(remote_wall, 0);
                    if c.observe(r, wall).is_ok() {
                        prop_assert!(c.last() >= r);
                    }
                    prop_assert!(c.last() >= prev);
                    prev = c.last();
                } else {
                    let t = c.now(wall);
                    prop_assert!(t > prev);
                    prop_assert!(t.wall_ms() >= wall.min(WALL_MAX));
                    prev = t;
                }
            }
        }
    }
}
