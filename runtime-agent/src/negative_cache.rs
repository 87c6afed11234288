//! Remembers images the engine said it does not have, so a supervisor retrying a start does not
//! hammer the engine. Pure: the caller passes `now`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// First time an image is remembered as missing.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(2);
/// Longest time an image is remembered as missing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Most images remembered at once (the oldest entry is dropped beyond this).
pub const MAX_ENTRIES: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Entry {
    until: Instant,
    backoff: Duration,
}

/// Missing images with a doubling backoff per image.
#[derive(Debug, Default)]
pub struct NegativeCache {
    entries: HashMap<String, Entry>,
}

impl NegativeCache {
    /// If `image` is remembered as missing at `now`, the time left before the engine is asked
    /// again.
    pub fn check(&self, image: &str, now: Instant) -> Option<Duration> {
        let e = self.entries.get(image)?;
        (now < e.until).then(|| e.until - now)
    }

    /// Records that the engine said `image` is missing; returns how long it is remembered.
    /// Each miss after the previous window ended doubles the window, up to [`MAX_BACKOFF`].
    pub fn record_missing(&mut self, image: &str, now: Instant) -> Duration {
        let backoff = match self.entries.get(image) {
            Some(e) => (e.backoff * 2).min(MAX_BACKOFF),
            None => INITIAL_BACKOFF,
        };
        if self.entries.len() >= MAX_ENTRIES
            && !self.entries.contains_key(image)
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.until)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        self.entries.insert(
            image.to_string(),
            Entry {
                until: now + backoff,
                backoff,
            },
        );
        backoff
    }

    /// Forgets `image` (it was found).
    pub fn clear(&mut self, image: &str) {
        self.entries.remove(image);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_image_is_remembered_until_its_window_ends() {
        let mut c = NegativeCache::default();
        let t0 = Instant::now();
        assert_eq!(c.check("img", t0), None);
        assert_eq!(c.record_missing("img", t0), INITIAL_BACKOFF);
        assert_eq!(
            c.check("img", t0 + Duration::from_secs(1)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(c.check("img", t0 + INITIAL_BACKOFF), None);
        assert_eq!(c.check("other", t0), None);
    }

    #[test]
    fn repeated_misses_double_the_window_up_to_the_cap() {
        let mut c = NegativeCache::default();
        let mut now = Instant::now();
        let mut seen = vec![];
        for _ in 0..8 {
            let b = c.record_missing("img", now);
            seen.push(b.as_secs());
            now += b;
        }
        assert_eq!(seen, [2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn a_found_image_is_forgotten_and_starts_again_from_the_first_window() {
        let mut c = NegativeCache::default();
        let t0 = Instant::now();
        c.record_missing("img", t0);
        c.record_missing("img", t0);
        c.clear("img");
        assert_eq!(c.check("img", t0), None);
        assert_eq!(c.record_missing("img", t0), INITIAL_BACKOFF);
    }

    #[test]
    fn the_cache_never_grows_past_its_cap() {
        let mut c = NegativeCache::default();
        let t0 = Instant::now();
        for i in 0..(MAX_ENTRIES + 10) {
            c.record_missing(&format!("img{i}"), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(c.entries.len(), MAX_ENTRIES);
        assert_eq!(c.check("img0", t0), None, "the oldest entry was dropped");
    }
}
