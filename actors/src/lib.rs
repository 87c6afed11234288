//! `shoal-actors` owns the node's actix actors — Supervisor, Scheduler, Health and Balancer — as
//! thin shells over pure modules: placement, restart and health policy, endpoint choice, and the
//! rollout and autoscale state machines. It is the only crate that knows actix. The pure modules
//! never touch actix, a clock or a socket.

pub mod health;
pub mod placement;
pub mod restart;
