//! `shoal-actors` will own the node's actix actors — Supervisor, Scheduler, Health and Balancer —
//! as thin shells over pure modules: placement, restart and health policy, endpoint choice, and
//! the rollout and autoscale state machines. It is the only crate that knows actix.
