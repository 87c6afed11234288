//! The leader lease: a sans-I/O state machine for the candidate and the voter (gossip.md §3.2,
//! a single-value majority lease with epoch fencing; no log, no Raft).
//!
//! * The candidate (the lowest-id alive voter, or the current holder renewing) records its
//!   local monotonic time `t0` and asks every voter for a lease at an epoch: the epoch it holds
//!   when renewing, otherwise one more than the highest epoch it has seen.
//! * A voter grants iff it has no unexpired promise to another candidate, the epoch is not
//!   below its persisted highest epoch, and an equal epoch belongs to the same holder (so two
//!   holders never share an epoch). It persists (epoch, holder) before answering and promises
//!   not to grant anyone else for `P = T × (1 + ρ)` of its own clock.
//! * With grants from a majority of the voters for one request, the candidate leads until
//!   `t0 + T × (1 − ρ)` of its own clock, and renews every `T / 3`.
//!
//! Safety under a clock-rate drift bound ρ (every clock runs at a rate in [1 − ρ, 1 + ρ] of
//! real time; no synchronised wall clocks): the holder's lease ends, in real time, at most
//! `T(1−ρ)/(1−ρ) = T` after it sent the request; each granting voter received the request after
//! it was sent and refuses others for at least `T(1+ρ)/(1+ρ) = T` of real time after that. Any
//! other candidate needs a majority, which contains one of those voters, so it can only win
//! after the first lease has ended. A voter that restarts forgets its promise (only the
//! epoch is persisted), so it grants no other holder for `P` after it boots.
//!
//! Times are `Duration`s since an arbitrary origin of the node's monotonic clock.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::NodeId;

/// Lease parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeaseConfig {
    /// Lease duration T.
    pub duration: Duration,
    /// The clock-rate drift bound ρ (0.05 = every clock within ±5 % of real time).
    pub drift: f64,
}

impl Default for LeaseConfig {
    /// T = 3 s, ρ = 5 %.
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(3),
            drift: 0.05,
        }
    }
}

impl LeaseConfig {
    /// How long a holder may consider itself leader after sending a request: T × (1 − ρ).
    pub fn holder_validity(&self) -> Duration {
        self.duration.mul_f64(1.0 - self.drift)
    }

    /// How long a voter refuses other candidates after a grant: T × (1 + ρ).
    pub fn promise(&self) -> Duration {
        self.duration.mul_f64(1.0 + self.drift)
    }

    /// How often the holder renews (and a candidate retries): T / 3.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }
}

/// The number of grants that make a majority of `voters`.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// A lease request (candidate → voter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// The candidate.
    pub candidate: NodeId,
    /// The epoch asked for.
    pub epoch: u64,
    /// The candidate's round number (matches replies to requests).
    pub round: u64,
}

/// A voter's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReply {
    /// The voter.
    pub voter: NodeId,
    /// The round answered.
    pub round: u64,
    /// Whether the lease is granted.
    pub granted: bool,
    /// The voter's highest epoch (after this request).
    pub max_epoch: u64,
    /// Who holds the voter's promise, if anyone (a hint for the refused candidate).
    pub promised_to: Option<NodeId>,
}

/// What a voter persists: its highest epoch and who it was granted to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoterDurable {
    /// The highest epoch granted.
    pub max_epoch: u64,
    /// The holder it was granted to.
    pub holder: NodeId,
}

#[derive(Clone, Copy, Debug)]
struct Promise {
    holder: NodeId,
    until: Duration,
}

/// The voter side.
#[derive(Clone, Debug)]
pub struct Voter {
    id: NodeId,
    cfg: LeaseConfig,
    durable: VoterDurable,
    promise: Option<Promise>,
    quarantine_until: Duration,
}

impl Voter {
    /// A voter starting at local time `now` with what it persisted before (default for a new
    /// node). It grants no new holder until one promise length after `now`.
    pub fn new(id: NodeId, cfg: LeaseConfig, durable: VoterDurable, now: Duration) -> Self {
        Self {
            id,
            cfg,
            durable,
            promise: None,
            quarantine_until: now + cfg.promise(),
        }
    }

    /// What must be persisted.
    pub fn durable(&self) -> VoterDurable {
        self.durable
    }

    /// Answers a request at local time `now`. When the reply grants, the caller must persist
    /// [`Voter::durable`] before sending it.
    pub fn handle(&mut self, req: &LeaseRequest, now: Duration) -> LeaseReply {
        let live_promise = self.promise.filter(|p| now < p.until);
        let same_holder_epoch =
            req.epoch == self.durable.max_epoch && req.candidate == self.durable.holder;
        let granted = match live_promise {
            Some(p) if p.holder != req.candidate => false,
            _ if now < self.quarantine_until && !same_holder_epoch => false,
            _ if req.epoch < self.durable.max_epoch => false,
            _ if req.epoch == self.durable.max_epoch && !same_holder_epoch => false,
            _ => true,
        };
        if granted {
            self.durable = VoterDurable {
                max_epoch: req.epoch,
                holder: req.candidate,
            };
            self.promise = Some(Promise {
                holder: req.candidate,
                until: now + self.cfg.promise(),
            });
        }
        LeaseReply {
            voter: self.id,
            round: req.round,
            granted,
            max_epoch: self.durable.max_epoch,
            promised_to: self.promise.filter(|p| now < p.until).map(|p| p.holder),
        }
    }
}

#[derive(Clone, Debug)]
struct Round {
    id: u64,
    epoch: u64,
    sent_at: Duration,
    grants: BTreeSet<NodeId>,
    voters: usize,
}

/// The candidate / holder side.
#[derive(Clone, Debug)]
pub struct Candidate {
    id: NodeId,
    cfg: LeaseConfig,
    epoch_seen: u64,
    held: Option<(u64, Duration)>,
    round: Option<Round>,
    next_round: u64,
    last_request: Option<Duration>,
    yield_until: Option<Duration>,
}

/// A change of leadership seen by the candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    /// This node now holds the lease at `epoch` (new or renewed).
    Acquired {
        /// The epoch.
        epoch: u64,
        /// Until when (local time).
        until: Duration,
        /// Whether this is a renewal of the lease already held.
        renewal: bool,
    },
}

impl Candidate {
    /// A candidate that has seen epochs up to `epoch_seen`.
    pub fn new(id: NodeId, cfg: LeaseConfig, epoch_seen: u64) -> Self {
        Self {
            id,
            cfg,
            epoch_seen,
            held: None,
            round: None,
            next_round: 1,
            last_request: None,
            yield_until: None,
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Takes a higher epoch seen elsewhere (a gossiped lease record, a placement).
    pub fn observe_epoch(&mut self, epoch: u64) {
        self.epoch_seen = self.epoch_seen.max(epoch);
    }

    /// The highest epoch seen.
    pub fn epoch_seen(&self) -> u64 {
        self.epoch_seen
    }

    /// The epoch this node leads at, if its lease is valid at local time `now`.
    pub fn leading(&self, now: Duration) -> Option<u64> {
        self.held.filter(|(_, until)| now < *until).map(|(e, _)| e)
    }

    /// Until when (local time) the current lease is valid, if held.
    pub fn valid_until(&self, now: Duration) -> Option<Duration> {
        self.held.filter(|(_, until)| now < *until).map(|(_, u)| u)
    }

    /// Called periodically (at least every `renew_every`). `should_try` says whether this node
    /// is the candidate (lowest alive voter, or holder). Returns a request to send to every
    /// voter (this node's own voter included), if it is time for one.
    pub fn tick(&mut self, now: Duration, should_try: bool, voters: usize) -> Option<LeaseRequest> {
        let leading = self.leading(now);
        if !should_try && leading.is_none() {
            self.round = None;
            return None;
        }
        if leading.is_none() && self.yield_until.is_some_and(|t| now < t) {
            return None;
        }
        // The holder renews every T/3; a candidate without a lease retries four times as
        // often, so it wins soon after the last promise to a dead holder runs out.
        let every = if leading.is_some() {
            self.cfg.renew_every()
        } else {
            self.cfg.renew_every() / 4
        };
        let due = match self.last_request {
            None => true,
            Some(t) => now >= t + every,
        };
        if !due {
            return None;
        }
        let epoch = match leading {
            Some(e) => e,
            None => self.epoch_seen + 1,
        };
        let id = self.next_round;
        self.next_round += 1;
        self.round = Some(Round {
            id,
            epoch,
            sent_at: now,
            grants: BTreeSet::new(),
            voters,
        });
        self.last_request = Some(now);
        Some(LeaseRequest {
            candidate: self.id,
            epoch,
            round: id,
        })
    }

    /// Takes a voter's reply at local time `now`.
    pub fn on_reply(&mut self, reply: &LeaseReply, now: Duration) -> Option<LeaseEvent> {
        self.epoch_seen = self.epoch_seen.max(reply.max_epoch);
        // Split votes: two candidates (whose membership views differ) each holding promises
        // from a minority would renew them forever. The one with the larger id gives way for a
        // promise length, so the smaller id collects the voters once its rival's promises end.
        // (Only to a rival for the same new epoch or a later one: a promise at an older epoch
        // is a lease that has not run out yet, e.g. a crashed leader's, not a rival.)
        if !reply.granted
            && self.held.is_none_or(|(_, until)| now >= until)
            && reply.promised_to.is_some_and(|p| p < self.id)
            && self
                .round
                .as_ref()
                .is_some_and(|r| r.id == reply.round && reply.max_epoch >= r.epoch)
        {
            self.yield_until = Some(now + self.cfg.promise());
            self.round = None;
            return None;
        }
        let round = self.round.as_mut()?;
        if reply.round != round.id || !reply.granted {
            return None;
        }
        round.grants.insert(reply.voter);
        if round.grants.len() < quorum(round.voters) {
            return None;
        }
        let round = self.round.take()?;
        let until = round.sent_at + self.cfg.holder_validity();
        if until <= now {
            return None;
        }
        let renewal = matches!(self.held, Some((e, u)) if e == round.epoch && now < u);
        let until = match self.held {
            Some((e, u)) if e == round.epoch => u.max(until),
            _ => until,
        };
        self.held = Some((round.epoch, until));
        self.epoch_seen = self.epoch_seen.max(round.epoch);
        Some(LeaseEvent::Acquired {
            epoch: round.epoch,
            until,
            renewal,
        })
    }

    /// Forgets the lease (e.g. on shutdown); voters' promises still run out by themselves.
    pub fn resign(&mut self) {
        self.held = None;
        self.round = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_millis;

    fn cfg() -> LeaseConfig {
        LeaseConfig::default()
    }

    fn voters(n: u8, now: Duration) -> Vec<Voter> {
        (0..n)
            .map(|i| Voter::new([i; 16], cfg(), VoterDurable::default(), now))
            .collect()
    }

    fn ask(c: &mut Candidate, vs: &mut [Voter], now: Duration) -> Option<LeaseEvent> {
        let req = c.tick(now, true, vs.len())?;
        let mut ev = None;
        for v in vs.iter_mut() {
            let r = v.handle(&req, now);
            ev = ev.or(c.on_reply(&r, now));
        }
        ev
    }

    #[test]
    fn a_new_voter_grants_nothing_until_its_quarantine_is_over() {
        let mut vs = voters(3, S(0));
        let mut c = Candidate::new([0; 16], cfg(), 0);
        assert_eq!(ask(&mut c, &mut vs, S(100)), None);
        let ev = ask(&mut c, &mut vs, S(3_200)).expect("granted after the quarantine");
        assert!(matches!(
            ev,
            LeaseEvent::Acquired {
                epoch: 1,
                renewal: false,
                ..
            }
        ));
        assert_eq!(c.leading(S(3_200)), Some(1));
        assert_eq!(
            c.valid_until(S(3_200)),
            Some(S(3_200) + cfg().holder_validity())
        );
    }

    #[test]
    fn a_voter_refuses_another_candidate_while_its_promise_runs_and_grants_after() {
        let mut vs = voters(3, S(0));
        let mut a = Candidate::new([0; 16], cfg(), 0);
        let mut b = Candidate::new([1; 16], cfg(), 0);
        ask(&mut a, &mut vs, S(4_000)).unwrap();
        assert_eq!(ask(&mut b, &mut vs, S(5_000)), None);
        assert_eq!(b.epoch_seen(), 1);
        assert!(b.leading(S(5_000)).is_none());
        // a stops renewing; after the promise (T(1+ρ) = 3.15 s) b — which, not knowing epoch
        // 1, took a for a rival and gave way to the smaller id for as long — wins at epoch 2.
        assert_eq!(ask(&mut b, &mut vs, S(7_200)), None, "b still gives way");
        let ev = ask(&mut b, &mut vs, S(8_200)).unwrap();
        assert!(matches!(ev, LeaseEvent::Acquired { epoch: 2, .. }));
        assert!(a.leading(S(8_200)).is_none(), "a's lease ran out first");
    }

    #[test]
    fn the_holder_renews_at_the_same_epoch_and_its_lease_is_extended() {
        let mut vs = voters(5, S(0));
        let mut a = Candidate::new([0; 16], cfg(), 0);
        ask(&mut a, &mut vs, S(4_000)).unwrap();
        let ev = ask(&mut a, &mut vs, S(5_000)).unwrap();
        assert!(matches!(
            ev,
            LeaseEvent::Acquired {
                epoch: 1,
                renewal: true,
                ..
            }
        ));
        assert_eq!(
            a.valid_until(S(5_000)),
            Some(S(5_000) + cfg().holder_validity())
        );
    }

    #[test]
    fn a_minority_of_grants_makes_no_leader() {
        let mut vs = voters(5, S(0));
        let mut a = Candidate::new([0; 16], cfg(), 0);
        let req = a.tick(S(4_000), true, 5).unwrap();
        for v in vs.iter_mut().take(2) {
            let r = v.handle(&req, S(4_000));
            assert!(r.granted);
            assert_eq!(a.on_reply(&r, S(4_000)), None);
        }
        assert!(a.leading(S(4_000)).is_none());
        let r = vs[2].handle(&req, S(4_000));
        assert!(a.on_reply(&r, S(4_000)).is_some());
    }

    #[test]
    fn two_holders_never_share_an_epoch() {
        let mut vs = voters(3, S(0));
        let mut a = Candidate::new([0; 16], cfg(), 0);
        ask(&mut a, &mut vs, S(4_000)).unwrap();
        // b asks for epoch 1 (it has seen nothing) after a's promises ran out: refused, then
        // it learns epoch 1 and wins epoch 2.
        let mut b = Candidate::new([1; 16], cfg(), 0);
        assert_eq!(ask(&mut b, &mut vs, S(8_000)), None);
        let ev = ask(&mut b, &mut vs, S(9_000)).unwrap();
        assert!(matches!(ev, LeaseEvent::Acquired { epoch: 2, .. }));
    }

    #[test]
    fn a_restarted_voter_may_renew_its_holder_but_grants_no_one_else_at_first() {
        let mut v = Voter::new(
            [9; 16],
            cfg(),
            VoterDurable {
                max_epoch: 4,
                holder: [0; 16],
            },
            S(0),
        );
        let renew = LeaseRequest {
            candidate: [0; 16],
            epoch: 4,
            round: 1,
        };
        assert!(v.handle(&renew, S(10)).granted);
        let mut v = Voter::new(
            [9; 16],
            cfg(),
            VoterDurable {
                max_epoch: 4,
                holder: [0; 16],
            },
            S(0),
        );
        let other = LeaseRequest {
            candidate: [1; 16],
            epoch: 5,
            round: 1,
        };
        assert!(!v.handle(&other, S(10)).granted);
        assert!(v.handle(&other, S(3_200)).granted);
    }

    #[test]
    fn in_a_split_vote_the_larger_id_gives_way_and_the_smaller_wins() {
        // Four voters; candidates 0 and 1 each hold two promises (their own and one more).
        let mut vs = voters(4, S(0));
        let mut a = Candidate::new([0; 16], cfg(), 0);
        let mut b = Candidate::new([1; 16], cfg(), 0);
        let t = S(4_000);
        let ra = a.tick(t, true, 4).unwrap();
        let rb = b.tick(t, true, 4).unwrap();
        for (i, v) in vs.iter_mut().enumerate() {
            let (mine, other) = if i % 2 == 0 { (&ra, &rb) } else { (&rb, &ra) };
            let r1 = v.handle(mine, t);
            let r2 = v.handle(other, t);
            let (c1, c2) = if i % 2 == 0 {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            assert!(c1.on_reply(&r1, t).is_none());
            assert!(c2.on_reply(&r2, t).is_none());
        }
        assert!(a.leading(t).is_none() && b.leading(t).is_none());
        // Both keep asking every T/3: b yields, a wins once b's promises have run out.
        let mut now = t;
        let mut winner = None;
        while now < S(20_000) && winner.is_none() {
            now += S(1_000);
            for c in [&mut a, &mut b] {
                if let Some(req) = c.tick(now, true, 4) {
                    for v in vs.iter_mut() {
                        let r = v.handle(&req, now);
                        if c.on_reply(&r, now).is_some() {
                            winner = Some(c.id());
                        }
                    }
                }
            }
        }
        assert_eq!(winner, Some([0; 16]), "the smaller id wins the split");
    }

    #[test]
    fn a_late_quorum_whose_lease_has_already_run_out_is_not_taken() {
        let mut vs = voters(3, S(0));
        let mut a = Candidate::new([0; 16], cfg(), 0);
        let req = a.tick(S(4_000), true, 3).unwrap();
        let r: Vec<LeaseReply> = vs.iter_mut().map(|v| v.handle(&req, S(4_000))).collect();
        for reply in &r {
            assert_eq!(a.on_reply(reply, S(7_000)), None);
        }
        assert!(a.leading(S(7_000)).is_none());
    }
}
