//! How the cluster state travels: small deltas as foca custom broadcasts ([`gossip`]), and
//! anti-entropy and lease messages over Noise control streams ([`protocol`]).

pub mod filter;
pub mod gossip;
pub mod protocol;

pub use gossip::{DeltaBroadcasts, DeltaSink};
pub use protocol::{ControlMsg, SyncPlan};
