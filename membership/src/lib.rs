//! `shoal-membership` will own who is in the cluster and how nodes talk to each other: node
//! identity and certificates signed by the cluster authority, Noise-encrypted links (UDP datagrams
//! and TCP streams), the foca SWIM driver with seeds, the replicated cluster state store and the
//! leader lease. It is the only crate that knows foca and snow.

pub mod cert;
pub mod codec;
pub mod core;
pub mod driver;
pub mod error;
pub mod handle;
pub mod identity;
pub mod lease;
pub mod link;
pub mod state;
pub mod sync;

pub use error::MembershipError;
