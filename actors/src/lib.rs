//! `shoal-actors` owns the node's actix actors — Supervisor, Scheduler, Health (and, later,
//! Balancer) — as thin shells over pure modules: placement, restart and health policy, the
//! reconciler, endpoint choice, and the rollout and autoscale state machines. It is the only crate
//! that knows actix. The pure modules never touch actix, a clock or a socket.
//!
//! ```text
//!  ClusterPort (state store) ──assignments──▶ Supervisor ──starts/stops──▶ ContainerRuntime
//!        ▲   ▲                                   │  ▲ exits (runtime events)
//!        │   └──────── instance reports ─────────┘  │ verdicts
//!        │                                 HealthSet│
//!   Scheduler (leader only) ──plan──▶ publish       ▼
//!                                                Health ──probes──▶ instances
//! ```

pub mod balancer;
pub mod health;
pub mod healthcheck;
pub mod pick;
pub mod placement;
pub mod port;
pub mod proxy;
pub mod reconcile;
pub mod restart;
pub mod scheduler;
pub mod supervisor;
