//! Endpoint choice: round robin, least connections and smooth weighted round robin, as a pure
//! state machine over a slice of candidates. No clock, no socket, no randomness: the same
//! sequence of calls gives the same sequence of choices.
//!
//! Rules every policy keeps:
//! - an endpoint that is not ready, or is draining, is never chosen;
//! - an endpoint listed in `tried` (a connect to it failed during this request) is not chosen
//!   again for that request;
//! - weight 0 takes an endpoint out of weighted choice (a canary at 0 %); if every eligible
//!   endpoint has weight 0, the choice falls back to plain round robin among them so that a
//!   service with ready instances never refuses traffic because of its weights.

/// How a route spreads connections (TCP mode) or requests (HTTP mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Each eligible endpoint in turn.
    #[default]
    RoundRobin,
    /// The eligible endpoint with the fewest active connections; ties go round robin.
    LeastConnections,
    /// Smooth weighted round robin (nginx's algorithm): over any window of `sum(weights)`
    /// choices each endpoint gets exactly its weight, interleaved rather than in bursts.
    Weighted,
}

/// What the picker needs to know about one endpoint at the moment of choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Relative share under [`Policy::Weighted`].
    pub weight: u32,
    /// Passed its readiness checks.
    pub ready: bool,
    /// Being stopped or replaced: keeps its open connections, gets no new ones.
    pub draining: bool,
    /// Connections (or requests) in flight through this node's proxy.
    pub active: u64,
}

impl Candidate {
    /// Ready, not draining.
    pub fn eligible(&self) -> bool {
        self.ready && !self.draining
    }
}

/// The picker's state for one route (one per published port).
#[derive(Debug, Clone, Default)]
pub struct Picker {
    policy: Policy,
    next: u64,
    current: Vec<i64>,
}

impl Picker {
    /// A picker for `policy`.
    pub fn new(policy: Policy) -> Self {
        Picker {
            policy,
            next: 0,
            current: Vec::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The index in `candidates` of the endpoint to use, skipping the indices in `tried`;
    /// `None` when no endpoint is eligible.
    pub fn pick(&mut self, candidates: &[Candidate], tried: &[usize]) -> Option<usize> {
        let ok = |i: usize| candidates[i].eligible() && !tried.contains(&i);
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        match self.policy {
            Policy::RoundRobin => self.round_robin(n, ok),
            Policy::LeastConnections => {
                let start = (self.next % n as u64) as usize;
                let mut best: Option<usize> = None;
                for k in 0..n {
                    let i = (start + k) % n;
                    if ok(i) && best.is_none_or(|b| candidates[i].active < candidates[b].active) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    self.next = (b as u64).wrapping_add(1);
                }
                best
            }
            Policy::Weighted => {
                if self.current.len() != n {
                    self.current = vec![0; n];
                }
                let total: i64 = (0..n)
                    .filter(|&i| ok(i))
                    .map(|i| i64::from(candidates[i].weight))
                    .sum();
                if total == 0 {
                    return self.round_robin(n, ok);
                }
                let mut best: Option<usize> = None;
                for (i, c) in candidates.iter().enumerate() {
                    if !ok(i) || c.weight == 0 {
                        continue;
                    }
                    self.current[i] += i64::from(c.weight);
                    if best.is_none_or(|b| self.current[i] > self.current[b]) {
                        best = Some(i);
                    }
                }
                let b = best?;
                self.current[b] -= total;
                Some(b)
            }
        }
    }

    fn round_robin(&mut self, n: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let start = (self.next % n as u64) as usize;
        for k in 0..n {
            let i = (start + k) % n;
            if ok(i) {
                self.next = (i as u64).wrapping_add(1);
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ready(n: usize) -> Vec<Candidate> {
        vec![
            Candidate {
                weight: 1,
                ready: true,
                draining: false,
                active: 0,
            };
            n
        ]
    }

    fn counts(p: &mut Picker, c: &[Candidate], rounds: usize) -> Vec<usize> {
        let mut out = vec![0; c.len()];
        for _ in 0..rounds {
            out[p.pick(c, &[]).unwrap()] += 1;
        }
        out
    }

    #[test]
    fn round_robin_gives_each_endpoint_an_equal_share() {
        let c = ready(6);
        assert_eq!(
            counts(&mut Picker::new(Policy::RoundRobin), &c, 600),
            vec![100; 6]
        );
    }

    #[test]
    fn round_robin_skips_a_not_ready_and_a_draining_endpoint() {
        let mut c = ready(4);
        c[1].ready = false;
        c[2].draining = true;
        assert_eq!(
            counts(&mut Picker::new(Policy::RoundRobin), &c, 100),
            vec![50, 0, 0, 50]
        );
    }

    #[test]
    fn least_connections_prefers_the_idlest_endpoint() {
        let mut c = ready(3);
        c[0].active = 5;
        c[1].active = 1;
        c[2].active = 3;
        let mut p = Picker::new(Policy::LeastConnections);
        assert_eq!(p.pick(&c, &[]), Some(1));
        assert_eq!(p.pick(&c, &[1]), Some(2));
    }

    #[test]
    fn least_connections_rotates_among_equals() {
        let c = ready(3);
        assert_eq!(
            counts(&mut Picker::new(Policy::LeastConnections), &c, 300),
            vec![100; 3]
        );
    }

    #[test]
    fn weighted_choice_follows_the_weights_exactly_over_a_window() {
        let mut c = ready(3);
        c[0].weight = 5;
        c[1].weight = 1;
        c[2].weight = 0;
        assert_eq!(
            counts(&mut Picker::new(Policy::Weighted), &c, 600),
            vec![500, 100, 0]
        );
    }

    #[test]
    fn weighted_choice_interleaves_rather_than_bursts() {
        let mut c = ready(2);
        c[0].weight = 2;
        c[1].weight = 1;
        let mut p = Picker::new(Policy::Weighted);
        let seq: Vec<_> = (0..6).map(|_| p.pick(&c, &[]).unwrap()).collect();
        assert_eq!(seq, vec![0, 1, 0, 0, 1, 0]);
    }

    #[test]
    fn all_zero_weights_fall_back_to_round_robin() {
        let mut c = ready(2);
        c[0].weight = 0;
        c[1].weight = 0;
        assert_eq!(
            counts(&mut Picker::new(Policy::Weighted), &c, 10),
            vec![5, 5]
        );
    }

    #[test]
    fn no_eligible_endpoint_gives_none() {
        let mut c = ready(2);
        c[0].ready = false;
        for policy in [
            Policy::RoundRobin,
            Policy::LeastConnections,
            Policy::Weighted,
        ] {
            let mut p = Picker::new(policy);
            assert_eq!(p.pick(&c, &[1]), None);
            assert_eq!(p.pick(&[], &[]), None);
        }
    }

    fn arb_candidates() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(
            (0u32..10, any::<bool>(), any::<bool>(), 0u64..20).prop_map(
                |(weight, ready, draining, active)| Candidate {
                    weight,
                    ready,
                    draining,
                    active,
                },
            ),
            0..12,
        )
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            Just(Policy::RoundRobin),
            Just(Policy::LeastConnections),
            Just(Policy::Weighted)
        ]
    }

    proptest! {
        #[test]
        fn a_pick_is_always_eligible_and_untried(
            c in arb_candidates(),
            policy in arb_policy(),
            tried in prop::collection::vec(0usize..12, 0..4),
            rounds in 1usize..50,
        ) {
            let mut p = Picker::new(policy);
            let any_ok = (0..c.len()).any(|i| c[i].eligible() && !tried.contains(&i));
            for _ in 0..rounds {
                match p.pick(&c, &tried) {
                    Some(i) => {
                        prop_assert!(c[i].eligible());
                        prop_assert!(!tried.contains(&i));
                    }
                    None => prop_assert!(!any_ok),
                }
            }
        }

        #[test]
        fn retries_exhaust_every_eligible_endpoint_once(
            c in arb_candidates(),
            policy in arb_policy(),
        ) {
            let mut p = Picker::new(policy);
            let mut tried = Vec::new();
            while let Some(i) = p.pick(&c, &tried) {
                prop_assert!(!tried.contains(&i));
                tried.push(i);
            }
            let eligible = c.iter().filter(|x| x.eligible()).count();
            prop_assert_eq!(tried.len(), eligible);
        }

        #[test]
        fn equal_endpoints_share_evenly_under_every_policy(
            n in 1usize..10,
            policy in arb_policy(),
        ) {
            let c = ready(n);
            let got = counts(&mut Picker::new(policy), &c, n * 100);
            for k in got {
                prop_assert_eq!(k, 100);
            }
        }

        #[test]
        fn weighted_shares_match_weights_within_one_per_window(
            w in prop::collection::vec(1u32..8, 1..8),
        ) {
            let mut c = ready(w.len());
            for (x, &wi) in c.iter_mut().zip(&w) {
                x.weight = wi;
            }
            let total: u32 = w.iter().sum();
            let windows = 10usize;
            let got = counts(&mut Picker::new(Policy::Weighted), &c, total as usize * windows);
            for (k, &wi) in got.iter().zip(&w) {
                prop_assert_eq!(*k, wi as usize * windows);
            }
        }
    }
}
