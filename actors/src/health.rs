//! Health policy: what probe results mean. Pure: the health actor runs the checks and feeds the
//! results in with `now`; this says which probes are due, when an instance must be restarted
//! (liveness or startup failing `failure_threshold` times in a row) and whether it may take
//! traffic (readiness).
//!
//! Until the startup probe (if any) succeeds, no other probe runs and the instance is not ready.
//! Without a readiness probe, a running instance is ready once startup has passed. With one, it
//! is ready after `success_threshold` consecutive successes and not ready after
//! `failure_threshold` consecutive failures; readiness never restarts anything.

use shoal_config::{Health, Probe};

/// The three probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// Startup.
    Startup,
    /// Liveness.
    Liveness,
    /// Readiness.
    Readiness,
}

/// What a probe result changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    Nothing,
    /// Restart the instance: this probe failed too often.
    Restart {
        /// Which probe.
        probe: ProbeKind,
        /// Consecutive failures seen.
        failures: u32,
    },
    /// The instance became ready (true) or not ready (false).
    Ready(bool),
}

#[derive(Clone, Debug, Default)]
struct Track {
    failures: u32,
    successes: u32,
    next_ms: u64,
}

/// Probe bookkeeping for one running instance.
#[derive(Clone, Debug)]
pub struct HealthTracker {
    health: Health,
    started: bool,
    ready: bool,
    tracks: [Track; 3],
}

fn idx(k: ProbeKind) -> usize {
    match k {
        ProbeKind::Startup => 0,
        ProbeKind::Liveness => 1,
        ProbeKind::Readiness => 2,
    }
}

impl HealthTracker {
    /// A tracker for an instance that started at `started_ms`.
    pub fn new(health: &Health, started_ms: u64) -> Self {
        let mut t = HealthTracker {
            health: health.clone(),
            started: health.startup.is_none(),
            ready: false,
            tracks: Default::default(),
        };
        for k in [
            ProbeKind::Startup,
            ProbeKind::Liveness,
            ProbeKind::Readiness,
        ] {
            if let Some(p) = t.probe(k) {
                t.tracks[idx(k)].next_ms = started_ms + p.initial_delay.as_millis() as u64;
            }
        }
        t.ready = t.started && health.readiness.is_none();
        t
    }

    /// The probe of this kind, if the service has one.
    pub fn probe(&self, k: ProbeKind) -> Option<&Probe> {
        match k {
            ProbeKind::Startup => self.health.startup.as_ref(),
            ProbeKind::Liveness => self.health.liveness.as_ref(),
            ProbeKind::Readiness => self.health.readiness.as_ref(),
        }
    }

    /// Whether the instance may receive traffic.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Whether the startup probe (if any) has passed.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The probes to run now.
    pub fn due(&self, now_ms: u64) -> Vec<ProbeKind> {
        let kinds: &[ProbeKind] = if self.started {
            &[ProbeKind::Liveness, ProbeKind::Readiness]
        } else {
            &[ProbeKind::Startup]
        };
        kinds
            .iter()
            .copied()
            .filter(|k| self.probe(*k).is_some() && self.tracks[idx(*k)].next_ms <= now_ms)
            .collect()
    }

    /// When the next probe is due (ms), if any probe is configured.
    pub fn next_due(&self) -> Option<u64> {
        let kinds: &[ProbeKind] = if self.started {
            &[ProbeKind::Liveness, ProbeKind::Readiness]
        } else {
            &[ProbeKind::Startup]
        };
        kinds
            .iter()
            .filter(|k| self.probe(**k).is_some())
            .map(|k| self.tracks[idx(*k)].next_ms)
            .min()
    }

    /// A probe finished at `now_ms` with `ok`.
    pub fn record(&mut self, kind: ProbeKind, ok: bool, now_ms: u64) -> Verdict {
        let Some(p) = self.probe(kind).cloned() else {
            return Verdict::Nothing;
        };
        let t = &mut self.tracks[idx(kind)];
        t.next_ms = now_ms + p.interval.as_millis() as u64;
        if ok {
            t.successes += 1;
            t.failures = 0;
        } else {
            t.failures += 1;
            t.successes = 0;
        }
        let (failures, successes) = (t.failures, t.successes);
        match kind {
            ProbeKind::Startup if ok => {
                self.started = true;
                // The other probes start their schedules now.
                for k in [ProbeKind::Liveness, ProbeKind::Readiness] {
                    if let Some(q) = self.probe(k) {
                        self.tracks[idx(k)].next_ms = now_ms + q.initial_delay.as_millis() as u64;
                    }
                }
                if self.health.readiness.is_none() {
                    self.ready = true;
                    return Verdict::Ready(true);
                }
                Verdict::Nothing
            }
            ProbeKind::Startup | ProbeKind::Liveness => {
                if !ok && failures >= p.failure_threshold {
                    Verdict::Restart {
                        probe: kind,
                        failures,
                    }
                } else {
                    Verdict::Nothing
                }
            }
            ProbeKind::Readiness => {
                if !self.ready && ok && successes >= p.success_threshold {
                    self.ready = true;
                    Verdict::Ready(true)
                } else if self.ready && !ok && failures >= p.failure_threshold {
                    self.ready = false;
                    Verdict::Ready(false)
                } else {
                    Verdict::Nothing
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shoal_config::{HttpCheck, TcpCheck};

    use super::*;

    fn probe(interval_ms: u64, failure_threshold: u32, success_threshold: u32) -> Probe {
        let mut p = Probe::new(
            None,
            Some(TcpCheck {
                port: "http".into(),
            }),
            None,
        );
        p.interval = Duration::from_millis(interval_ms);
        p.timeout = Duration::from_millis(interval_ms / 2);
        p.failure_threshold = failure_threshold;
        p.success_threshold = success_threshold;
        p
    }

    #[test]
    fn without_probes_a_running_instance_is_ready_and_nothing_is_due() {
        let t = HealthTracker::new(&Health::default(), 0);
        assert!(t.ready());
        assert!(t.due(1_000_000).is_empty());
        assert_eq!(t.next_due(), None);
    }

    #[test]
    fn liveness_restarts_only_after_failure_threshold_consecutive_failures() {
        let h = Health {
            liveness: Some(probe(1000, 3, 1)),
            ..Health::default()
        };
        let mut t = HealthTracker::new(&h, 0);
        assert_eq!(t.due(0), vec![ProbeKind::Liveness]);
        assert_eq!(t.record(ProbeKind::Liveness, false, 0), Verdict::Nothing);
        assert!(t.due(500).is_empty());
        assert_eq!(t.record(ProbeKind::Liveness, false, 1000), Verdict::Nothing);
        assert_eq!(t.record(ProbeKind::Liveness, true, 2000), Verdict::Nothing);
        assert_eq!(t.record(ProbeKind::Liveness, false, 3000), Verdict::Nothing);
        assert_eq!(t.record(ProbeKind::Liveness, false, 4000), Verdict::Nothing);
        assert_eq!(
            t.record(ProbeKind::Liveness, false, 5000),
            Verdict::Restart {
                probe: ProbeKind::Liveness,
                failures: 3
            }
        );
        assert!(t.ready(), "liveness does not decide readiness");
    }

    #[test]
    fn readiness_flips_with_its_thresholds_and_never_restarts() {
        let h = Health {
            readiness: Some(probe(1000, 2, 2)),
            ..Health::default()
        };
        let mut t = HealthTracker::new(&h, 0);
        assert!(!t.ready(), "not ready before the first successes");
        assert_eq!(t.record(ProbeKind::Readiness, true, 0), Verdict::Nothing);
        assert_eq!(
            t.record(ProbeKind::Readiness, true, 1000),
            Verdict::Ready(true)
        );
        assert_eq!(
            t.record(ProbeKind::Readiness, false, 2000),
            Verdict::Nothing
        );
        assert_eq!(
            t.record(ProbeKind::Readiness, false, 3000),
            Verdict::Ready(false)
        );
        for i in 0..10 {
            assert_eq!(
                t.record(ProbeKind::Readiness, false, 4000 + i),
                Verdict::Nothing
            );
        }
    }

    #[test]
    fn the_startup_probe_holds_back_the_others_then_starts_their_schedules() {
        let mut live = Probe::new(
            Some(HttpCheck {
                path: "/healthz".into(),
                port: "http".into(),
            }),
            None,
            None,
        );
        live.initial_delay = Duration::from_millis(300);
        let h = Health {
            startup: Some(probe(100, 5, 1)),
            liveness: Some(live),
            readiness: None,
        };
        let mut t = HealthTracker::new(&h, 0);
        assert!(!t.ready());
        assert_eq!(t.due(10_000), vec![ProbeKind::Startup]);
        assert_eq!(t.record(ProbeKind::Startup, false, 0), Verdict::Nothing);
        assert_eq!(
            t.record(ProbeKind::Startup, true, 100),
            Verdict::Ready(true)
        );
        assert!(
            t.due(200).is_empty(),
            "liveness waits for its initial delay"
        );
        assert_eq!(t.due(400), vec![ProbeKind::Liveness]);
    }

    #[test]
    fn a_startup_probe_that_keeps_failing_restarts_the_instance() {
        let h = Health {
            startup: Some(probe(100, 2, 1)),
            ..Health::default()
        };
        let mut t = HealthTracker::new(&h, 0);
        assert_eq!(t.record(ProbeKind::Startup, false, 0), Verdict::Nothing);
        assert_eq!(
            t.record(ProbeKind::Startup, false, 100),
            Verdict::Restart {
                probe: ProbeKind::Startup,
                failures: 2
            }
        );
    }
}
