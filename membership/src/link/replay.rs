//! The sliding replay window for datagram counters (sans-I/O).
//!
//! The receiver first asks [`ReplayWindow::check`], then decrypts, and calls
//! [`ReplayWindow::update`] only when decryption succeeded, so a forged datagram with a high
//! counter cannot move the window and block genuine ones.

/// Width of the window in counters.
pub const WINDOW_BITS: u64 = 2048;
const WORDS: usize = (WINDOW_BITS / 64) as usize;

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayRejection {
    /// The counter was already accepted.
    Duplicate,
    /// The counter is older than the window.
    TooOld,
    /// `u64::MAX` is reserved and never valid.
    Reserved,
}

/// Which counters have been accepted: everything above `highest` is new, everything more than
/// [`WINDOW_BITS`] below it is refused, and a bitmap tracks the counters in between.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    highest: Option<u64>,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window: every counter but `u64::MAX` is acceptable.
    pub fn new() -> Self {
        ReplayWindow {
            highest: None,
            bits: [0; WORDS],
        }
    }

    fn slot(counter: u64) -> (usize, u64) {
        let bit = counter % WINDOW_BITS;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// Whether `counter` would be accepted. Does not change the window.
    pub fn check(&self, counter: u64) -> Result<(), ReplayRejection> {
        if counter == u64::MAX {
            return Err(ReplayRejection::Reserved);
        }
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if counter > highest {
            return Ok(());
        }
        if highest - counter >= WINDOW_BITS {
            return Err(ReplayRejection::TooOld);
        }
        let (w, m) = Self::slot(counter);
        if self.bits[w] & m != 0 {
            return Err(ReplayRejection::Duplicate);
        }
        Ok(())
    }

    /// Records `counter` as accepted (call after a successful decryption). Returns the same
    /// result as [`ReplayWindow::check`] and changes nothing when it is an error.
    pub fn update(&mut self, counter: u64) -> Result<(), ReplayRejection> {
        self.check(counter)?;
        match self.highest {
            Some(highest) if counter <= highest => {}
            Some(highest) => {
                let advance = counter - highest;
                if advance >= WINDOW_BITS {
                    self.bits = [0; WORDS];
                } else {
                    // Forget the slots that the counters highest+1 ..= counter reuse.
                    for c in highest + 1..=counter {
                        let (w, m) = Self::slot(c);
                        self.bits[w] &= !m;
                    }
                }
                self.highest = Some(counter);
            }
            None => {
                self.bits = [0; WORDS];
                self.highest = Some(counter);
            }
        }
        let (w, m) = Self::slot(counter);
        self.bits[w] |= m;
        Ok(())
    }

    /// The highest accepted counter.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn a_counter_is_accepted_once() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.update(5), Ok(()));
        assert_eq!(w.check(5), Err(ReplayRejection::Duplicate));
        assert_eq!(w.update(3), Ok(()));
        assert_eq!(w.update(3), Err(ReplayRejection::Duplicate));
        assert_eq!(w.update(5 + WINDOW_BITS), Ok(()));
        assert_eq!(w.check(5), Err(ReplayRejection::TooOld));
        assert_eq!(w.check(6), Ok(()));
        assert_eq!(w.check(u64::MAX), Err(ReplayRejection::Reserved));
    }

    #[test]
    fn a_check_without_update_leaves_the_window_unchanged() {
        let mut w = ReplayWindow::new();
        w.update(10).unwrap();
        // A forged datagram with a huge counter fails to decrypt: only check is called.
        assert_eq!(w.check(1_000_000), Ok(()));
        assert_eq!(w.check(11), Ok(()));
        assert_eq!(w.update(11), Ok(()));
    }

    /// A reference model: a set of accepted counters and the highest one.
    fn model_accepts(accepted: &HashSet<u64>, highest: Option<u64>, c: u64) -> bool {
        if c == u64::MAX || accepted.contains(&c) {
            return false;
        }
        match highest {
            Some(h) => c > h || h - c < WINDOW_BITS,
            None => true,
        }
    }

    proptest! {
        #[test]
        fn the_window_matches_a_set_model_and_moves_only_on_success(
            ops in proptest::collection::vec((0u64..6000, any::<bool>()), 1..400),
            base in prop_oneof![Just(0u64), Just(u64::MAX - 7000), any::<u64>().prop_map(|x| x / 2)],
        ) {
            let mut w = ReplayWindow::new();
            let mut accepted = HashSet::new();
            let mut highest: Option<u64> = None;
            for (off, decrypts) in ops {
                let c = base.saturating_add(off);
                let expected = model_accepts(&accepted, highest, c);
                prop_assert_eq!(w.check(c).is_ok(), expected, "counter {}", c);
                if expected && decrypts {
                    prop_assert!(w.update(c).is_ok());
                    accepted.insert(c);
                    highest = Some(highest.map_or(c, |h| h.max(c)));
                }
                prop_assert_eq!(w.highest(), highest);
            }
            // Every accepted counter is now refused.
            for c in &accepted {
                prop_assert!(w.check(*c).is_err());
            }
        }
    }
}
