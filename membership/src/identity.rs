//! The SWIM identity of a node: who it is (`node_id`), where it listens (`addr`) and which life
//! of the process this is (`boot_epoch`).
//!
//! foca keys members by [`foca::Identity::Addr`], which here is the 16-byte node id taken from the
//! node's certificate — never the socket address, so a node that changes address or restarts is
//! still the same member. A restart (or foca's automatic `renew()` after being wrongly declared
//! down) produces a larger `boot_epoch`, and the larger epoch wins every conflict between two
//! identities with the same node id.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A node id: 16 bytes, bound to the node by its certificate.
pub type NodeIdBytes = [u8; 16];

/// The all-zero node id, used only as the destination of an announce to a seed whose node id
/// is not known yet (see [`NodeIdentity::seed_placeholder`]).
pub const UNKNOWN_NODE_ID: NodeIdBytes = [0u8; 16];

/// Formats a node id as 32 lowercase hex characters.
pub fn node_id_hex(id: &NodeIdBytes) -> String {
    let mut s = String::with_capacity(32);
    for b in id {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The identity foca gossips about: `{node_id, addr, boot_epoch}`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// The node id from the node's certificate; foca's `Addr`.
    pub node_id: NodeIdBytes,
    /// The address other nodes send datagrams to (the advertised gossip address).
    pub addr: SocketAddr,
    /// Which life of the node this is: larger wins. Set from the wall clock at boot (unix
    /// milliseconds) and bumped by one on every `renew()`.
    pub boot_epoch: u64,
}

impl NodeIdentity {
    /// A new identity.
    pub fn new(node_id: NodeIdBytes, addr: SocketAddr, boot_epoch: u64) -> Self {
        Self {
            node_id,
            addr,
            boot_epoch,
        }
    }

    /// The destination identity used to announce to a seed known only by its address. The
    /// receiving core recognises the all-zero node id and treats the announce as addressed to
    /// itself (see `MembershipCore::handle`).
    pub fn seed_placeholder(addr: SocketAddr) -> Self {
        Self::new(UNKNOWN_NODE_ID, addr, 0)
    }

    /// Whether this is a seed placeholder rather than a real member.
    pub fn is_placeholder(&self) -> bool {
        self.node_id == UNKNOWN_NODE_ID
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = node_id_hex(&self.node_id);
        write!(f, "{}@{}#{}", &hex[..8], self.addr, self.boot_epoch)
    }
}

impl foca::Identity for NodeIdentity {
    type Addr = NodeIdBytes;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            boot_epoch: self.boot_epoch.saturating_add(1),
            ..*self
        })
    }

    fn addr(&self) -> NodeIdBytes {
        self.node_id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.boot_epoch > adversary.boot_epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    fn id(epoch: u64) -> NodeIdentity {
        NodeIdentity::new([7; 16], "127.0.0.1:7946".parse().unwrap(), epoch)
    }

    #[test]
    fn renewing_keeps_the_node_id_and_address_and_bumps_the_epoch() {
        let a = id(10);
        let b = a.renew().unwrap();
        assert_eq!(b.node_id, a.node_id);
        assert_eq!(b.addr, a.addr);
        assert_eq!(b.boot_epoch, 11);
        assert_eq!(a.addr(), b.addr());
    }

    #[test]
    fn the_larger_epoch_wins_an_address_conflict() {
        assert!(id(11).win_addr_conflict(&id(10)));
        assert!(!id(10).win_addr_conflict(&id(11)));
        assert!(!id(10).win_addr_conflict(&id(10)));
    }

    #[test]
    fn node_ids_print_as_lowercase_hex() {
        let mut n = [0u8; 16];
        n[0] = 0xab;
        n[15] = 0x01;
        assert_eq!(node_id_hex(&n), "ab000000000000000000000000000001");
    }
}
