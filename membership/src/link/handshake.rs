//! The Noise XX handshake with certificates in the payloads (sans-I/O).
//!
//! ```text
//! initiator -> responder   preamble "SHL1" + kind byte (clear; the kind picks the prologue)
//! initiator -> responder   msg1: e                              (empty payload)
//! responder -> initiator   msg2: e, ee, s, es + payload(responder cert, session index)
//!            the initiator verifies the responder's certificate before answering
//! initiator -> responder   msg3: s, se + payload(initiator cert, session index, UDP address)
//!            the responder verifies, then confirms with one transport message
//! ```
//! A certificate must chain to the node's CA, be within its validity and name the key the peer
//! used in the handshake. The kind byte selects a distinct prologue per plane, so a handshake
//! meant for one plane fails on another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use snow::params::NoiseParams;
use snow::{HandshakeState, StatelessTransportState, TransportState};

use crate::cert::{CertRejection, Certificate, MAX_CERT_LEN, NodeCredentials, Reader};
use crate::error::MembershipError;

/// The Noise protocol of every link: XX, X25519, AES-256-GCM (ring), SHA-256 (ring).
pub const XX_PATTERN: &str = "Noise_XX_25519_AESGCM_SHA256";
/// The bytes a client sends before msg1.
pub const PREAMBLE_MAGIC: &[u8; 4] = b"SHL1";
/// Preamble length: magic + kind byte.
pub const PREAMBLE_LEN: usize = 5;
/// Noise's largest message.
pub const MAX_NOISE_MSG: usize = 65535;
/// AEAD tag length.
pub const TAG_LEN: usize = 16;
/// XX msg1 with an empty payload is exactly one ephemeral key.
pub const MSG1_LEN: usize = 32;
const PAYLOAD_VERSION: u8 = 1;
const CONFIRM: &[u8] = b"shoal-link-ok";

/// Parses one of this module's constant Noise protocol names.
pub(crate) fn noise_params(pattern: &'static str) -> NoiseParams {
    pattern
        .parse()
        .expect("the constant Noise patterns of this crate parse")
}

/// The planes a stream can serve; each has its own Noise prologue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plane {
    /// State sync, joins, renewals.
    Control,
    /// Service traffic.
    Data,
    /// The management API.
    Management,
}

/// What a handshake sets up: the datagram session of the gossip socket, or a stream of a plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkKind {
    /// A session for the Noise-sealed gossip datagrams.
    Gossip,
    /// A stream of one plane.
    Stream(Plane),
}

impl LinkKind {
    /// The wire byte of the preamble.
    pub fn to_byte(self) -> u8 {
        match self {
            LinkKind::Gossip => 0,
            LinkKind::Stream(Plane::Control) => 1,
            LinkKind::Stream(Plane::Data) => 2,
            LinkKind::Stream(Plane::Management) => 3,
        }
    }

    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => LinkKind::Gossip,
            1 => LinkKind::Stream(Plane::Control),
            2 => LinkKind::Stream(Plane::Data),
            3 => LinkKind::Stream(Plane::Management),
            _ => return None,
        })
    }

    /// The Noise prologue (domain separation between planes).
    pub fn prologue(self) -> &'static [u8] {
        match self {
            LinkKind::Gossip => b"shoal/v1/gossip",
            LinkKind::Stream(Plane::Control) => b"shoal/v1/control",
            LinkKind::Stream(Plane::Data) => b"shoal/v1/data",
            LinkKind::Stream(Plane::Management) => b"shoal/v1/management",
        }
    }

    /// The preamble bytes.
    pub fn preamble(self) -> [u8; PREAMBLE_LEN] {
        let mut p = [0u8; PREAMBLE_LEN];
        p[..4].copy_from_slice(PREAMBLE_MAGIC);
        p[4] = self.to_byte();
        p
    }

    /// Strictly parses a preamble.
    pub fn parse_preamble(bytes: &[u8]) -> Result<Self, MembershipError> {
        let bad = |reason: &str| MembershipError::Malformed {
            what: "link preamble",
            reason: reason.into(),
        };
        if bytes.len() != PREAMBLE_LEN || &bytes[..4] != PREAMBLE_MAGIC {
            return Err(bad("wrong magic"));
        }
        LinkKind::from_byte(bytes[4]).ok_or_else(|| bad("unknown link kind"))
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The peer's certificate was refused.
    Rejected(CertRejection),
    /// The Noise messages did not authenticate or were out of protocol.
    Protocol(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Rejected(r) => write!(f, "peer certificate refused: {r}"),
            HandshakeError::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

impl From<HandshakeError> for MembershipError {
    fn from(e: HandshakeError) -> Self {
        match e {
            HandshakeError::Rejected(r) => MembershipError::CertRejected(r),
            HandshakeError::Protocol(reason) => MembershipError::Handshake {
                peer: "peer".into(),
                reason,
            },
        }
    }
}

fn proto(e: impl std::fmt::Display) -> HandshakeError {
    HandshakeError::Protocol(e.to_string())
}

/// What travels inside the encrypted handshake payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakePayload {
    /// The index the sender wants on the datagrams it receives (0 for streams).
    pub session_index: u32,
    /// The sender's gossip (UDP) address, sent by a gossip initiator.
    pub udp_addr: Option<SocketAddr>,
    /// The sender's encoded certificate.
    pub cert: Vec<u8>,
}

impl HandshakePayload {
    /// Encodes: `version u8 | session_index u32 | addr tag u8 (0, 4, 6) + ip + port u16 |
    /// cert_len u16 | cert`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.cert.len());
        out.push(PAYLOAD_VERSION);
        out.extend_from_slice(&self.session_index.to_be_bytes());
        match self.udp_addr {
            None => out.push(0),
            Some(SocketAddr::V4(a)) => {
                out.push(4);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
            Some(SocketAddr::V6(a)) => {
                out.push(6);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
        }
        out.extend_from_slice(&(self.cert.len().min(u16::MAX as usize) as u16).to_be_bytes());
        out.extend_from_slice(&self.cert);
        out
    }

    /// Strictly decodes (bounded, no trailing bytes).
    pub fn decode(bytes: &[u8]) -> Result<Self, MembershipError> {
        let mut r = Reader::new(bytes, "handshake payload");
        if r.u8()? != PAYLOAD_VERSION {
            return Err(r.err("unsupported version"));
        }
        let session_index = r.u32()?;
        let udp_addr = match r.u8()? {
            0 => None,
            4 => {
                let ip: [u8; 4] = r.array()?;
                Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), r.u16()?))
            }
            6 => {
                let ip: [u8; 16] = r.array()?;
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), r.u16()?))
            }
            t => return Err(r.err(format!("unknown address tag {t}"))),
        };
        let len = r.u16()? as usize;
        if len > MAX_CERT_LEN {
            return Err(r.err("certificate too long"));
        }
        let cert = r.bytes(len)?.to_vec();
        if r.consumed() != 0 {
            return Err(r.err("trailing bytes"));
        }
        r.finish()?;
        Ok(HandshakePayload {
            session_index,
            udp_addr,
            cert,
        })
    }
}

/// The authenticated peer of a completed handshake.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's verified certificate.
    pub peer: Arc<Certificate>,
    /// The datagram index the peer asked for (gossip).
    pub peer_session_index: u32,
    /// The gossip address the peer announced (gossip initiators only).
    pub peer_udp_addr: Option<SocketAddr>,
    /// The index this side asked for.
    pub local_session_index: u32,
}

/// A completed handshake on the responder side: the peer and the keys.
pub struct Established {
    /// Who the peer is.
    pub info: PeerInfo,
    hs: HandshakeState,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("peer", &self.info.peer.name)
            .finish_non_exhaustive()
    }
}

impl Established {
    /// Keys for a stream (in-order transport).
    pub fn into_transport(self) -> Result<TransportState, MembershipError> {
        self.hs
            .into_transport_mode()
            .map_err(|e| MembershipError::Crypto(e.to_string()))
    }

    /// Keys for datagrams (explicit nonces).
    pub fn into_stateless(self) -> Result<StatelessTransportState, MembershipError> {
        self.hs
            .into_stateless_transport_mode()
            .map_err(|e| MembershipError::Crypto(e.to_string()))
    }
}

fn build(
    kind: LinkKind,
    creds: &NodeCredentials,
    initiator: bool,
) -> Result<HandshakeState, MembershipError> {
    let b = snow::Builder::new(noise_params(XX_PATTERN))
        .local_private_key(creds.private_key())
        .and_then(|b| b.prologue(kind.prologue()))
        .map_err(|e| MembershipError::Crypto(e.to_string()))?;
    if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
    .map_err(|e| MembershipError::Crypto(e.to_string()))
}

fn verify_peer(
    hs: &HandshakeState,
    payload: &HandshakePayload,
    creds: &NodeCredentials,
    now_unix: u64,
) -> Result<Arc<Certificate>, HandshakeError> {
    let cert = Certificate::decode(&payload.cert)
        .map_err(|_| HandshakeError::Rejected(CertRejection::Malformed))?;
    let remote = hs
        .get_remote_static()
        .ok_or_else(|| proto("no remote static key"))?;
    cert.verify_for_key(&creds.ca, now_unix, remote)
        .map_err(HandshakeError::Rejected)?;
    Ok(Arc::new(cert))
}

/// The dialing side.
pub struct Initiator {
    hs: HandshakeState,
    creds: Arc<NodeCredentials>,
    local_index: u32,
    udp_addr: Option<SocketAddr>,
}

impl Initiator {
    /// Starts a handshake; returns the preamble + msg1 bytes to send (without framing).
    pub fn start(
        kind: LinkKind,
        creds: Arc<NodeCredentials>,
        local_index: u32,
        udp_addr: Option<SocketAddr>,
    ) -> Result<(Self, Vec<u8>), MembershipError> {
        let mut hs = build(kind, &creds, true)?;
        let mut msg1 = vec![0u8; 64];
        let n = hs
            .write_message(&[], &mut msg1)
            .map_err(|e| MembershipError::Crypto(e.to_string()))?;
        msg1.truncate(n);
        Ok((
            Initiator {
                hs,
                creds,
                local_index,
                udp_addr,
            },
            msg1,
        ))
    }

    /// Reads msg2, verifies the responder's certificate and returns msg3. The session is
    /// complete for this side once [`Initiator::on_confirm`] sees the responder's confirmation.
    pub fn on_msg2(
        mut self,
        msg2: &[u8],
        now_unix: u64,
    ) -> Result<(Vec<u8>, PendingConfirm), HandshakeError> {
        if msg2.len() > MAX_NOISE_MSG {
            return Err(proto("msg2 too long"));
        }
        let mut buf = vec![0u8; msg2.len()];
        let n = self.hs.read_message(msg2, &mut buf).map_err(proto)?;
        let payload = HandshakePayload::decode(&buf[..n]).map_err(proto)?;
        let peer = verify_peer(&self.hs, &payload, &self.creds, now_unix)?;
        let mine = HandshakePayload {
            session_index: self.local_index,
            udp_addr: self.udp_addr,
            cert: self.creds.cert_bytes().to_vec(),
        }
        .encode();
        let mut msg3 = vec![0u8; mine.len() + 128];
        let n = self.hs.write_message(&mine, &mut msg3).map_err(proto)?;
        msg3.truncate(n);
        Ok((
            msg3,
            PendingConfirm(Established {
                info: PeerInfo {
                    peer,
                    peer_session_index: payload.session_index,
                    peer_udp_addr: payload.udp_addr,
                    local_session_index: self.local_index,
                },
                hs: self.hs,
            }),
        ))
    }
}

/// An initiator waiting for the responder's confirmation (the responder accepted msg3).
pub struct PendingConfirm(Established);

impl PendingConfirm {
    /// For streams: reads the confirmation (the responder's first transport message).
    pub fn confirm_stream(self, msg: &[u8]) -> Result<(PeerInfo, TransportState), HandshakeError> {
        let mut ts = self.0.hs.into_transport_mode().map_err(proto)?;
        let mut buf = vec![0u8; msg.len()];
        let n = ts.read_message(msg, &mut buf).map_err(proto)?;
        if &buf[..n] != CONFIRM {
            return Err(proto("bad confirmation"));
        }
        Ok((self.0.info, ts))
    }

    /// For datagram sessions: the keys at once (the initiator's handshake is complete once
    /// msg3 is written); check the confirmation with [`open_datagram_confirmation`].
    pub fn into_datagram(self) -> Result<(PeerInfo, StatelessTransportState), HandshakeError> {
        let ts = self.0.hs.into_stateless_transport_mode().map_err(proto)?;
        Ok((self.0.info, ts))
    }

    /// For datagram sessions: reads the confirmation (sealed with nonce 0).
    pub fn confirm_datagram(
        self,
        msg: &[u8],
    ) -> Result<(PeerInfo, StatelessTransportState), HandshakeError> {
        let ts = self.0.hs.into_stateless_transport_mode().map_err(proto)?;
        let mut buf = vec![0u8; msg.len()];
        let n = ts.read_message(0, msg, &mut buf).map_err(proto)?;
        if &buf[..n] != CONFIRM {
            return Err(proto("bad confirmation"));
        }
        Ok((self.0.info, ts))
    }
}

/// The accepting side.
pub struct Responder {
    hs: HandshakeState,
    creds: Arc<NodeCredentials>,
    local_index: u32,
    kind: LinkKind,
}

impl Responder {
    /// Prepares to answer a handshake of `kind`.
    pub fn new(
        kind: LinkKind,
        creds: Arc<NodeCredentials>,
        local_index: u32,
    ) -> Result<Self, MembershipError> {
        Ok(Responder {
            hs: build(kind, &creds, false)?,
            creds,
            local_index,
            kind,
        })
    }

    /// Reads msg1 and returns msg2 (carrying this node's certificate).
    pub fn on_msg1(&mut self, msg1: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        if msg1.len() != MSG1_LEN {
            return Err(proto(format!(
                "msg1 of {} bytes, expected {MSG1_LEN}",
                msg1.len()
            )));
        }
        let mut buf = [0u8; MSG1_LEN];
        let n = self.hs.read_message(msg1, &mut buf).map_err(proto)?;
        if n != 0 {
            return Err(proto("msg1 carries a payload"));
        }
        let mine = HandshakePayload {
            session_index: self.local_index,
            udp_addr: None,
            cert: self.creds.cert_bytes().to_vec(),
        }
        .encode();
        let mut msg2 = vec![0u8; mine.len() + 128];
        let n = self.hs.write_message(&mine, &mut msg2).map_err(proto)?;
        msg2.truncate(n);
        Ok(msg2)
    }

    /// Reads msg3 and verifies the initiator's certificate. The caller then sends the
    /// confirmation ([`stream_confirmation`] or [`datagram_confirmation`]).
    pub fn on_msg3(mut self, msg3: &[u8], now_unix: u64) -> Result<Established, HandshakeError> {
        if msg3.len() > MAX_NOISE_MSG {
            return Err(proto("msg3 too long"));
        }
        let mut buf = vec![0u8; msg3.len()];
        let n = self.hs.read_message(msg3, &mut buf).map_err(proto)?;
        let payload = HandshakePayload::decode(&buf[..n]).map_err(proto)?;
        let peer = verify_peer(&self.hs, &payload, &self.creds, now_unix)?;
        if self.kind == LinkKind::Gossip && payload.udp_addr.is_none() {
            return Err(proto("gossip initiator did not announce its address"));
        }
        Ok(Established {
            info: PeerInfo {
                peer,
                peer_session_index: payload.session_index,
                peer_udp_addr: payload.udp_addr,
                local_session_index: self.local_index,
            },
            hs: self.hs,
        })
    }
}

/// Whether `msg` is the responder's datagram-session confirmation under `keys`.
pub fn open_datagram_confirmation(keys: &StatelessTransportState, msg: &[u8]) -> bool {
    if msg.len() > 256 {
        return false;
    }
    let mut buf = [0u8; 256];
    matches!(keys.read_message(0, msg, &mut buf), Ok(n) if &buf[..n] == CONFIRM)
}

/// The responder's confirmation for a stream: its first transport message.
pub fn stream_confirmation(ts: &mut TransportState) -> Result<Vec<u8>, MembershipError> {
    let mut out = vec![0u8; CONFIRM.len() + TAG_LEN];
    let n = ts
        .write_message(CONFIRM, &mut out)
        .map_err(|e| MembershipError::Crypto(e.to_string()))?;
    out.truncate(n);
    Ok(out)
}

/// The responder's confirmation for a datagram session: sealed with nonce 0 (datagram
/// counters start at 1).
pub fn datagram_confirmation(ts: &StatelessTransportState) -> Result<Vec<u8>, MembershipError> {
    let mut out = vec![0u8; CONFIRM.len() + TAG_LEN];
    let n = ts
        .write_message(0, CONFIRM, &mut out)
        .map_err(|e| MembershipError::Crypto(e.to_string()))?;
    out.truncate(n);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{CertificateAuthority, IssueOptions};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    const NOW: u64 = 2_000_000;

    fn creds(ca: &CertificateAuthority, name: &str) -> Arc<NodeCredentials> {
        Arc::new(
            ca.issue(name, &BTreeMap::new(), Duration::from_secs(3600), NOW)
                .unwrap(),
        )
    }

    fn run(
        kind_i: LinkKind,
        kind_r: LinkKind,
        a: Arc<NodeCredentials>,
        b: Arc<NodeCredentials>,
    ) -> (
        Result<Arc<Certificate>, HandshakeError>,
        Result<Arc<Certificate>, HandshakeError>,
    ) {
        let (init, msg1) =
            Initiator::start(kind_i, a, 7, Some("127.0.0.1:9".parse().unwrap())).unwrap();
        let mut resp = Responder::new(kind_r, b, 9).unwrap();
        let msg2 = match resp.on_msg1(&msg1) {
            Ok(m) => m,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let (msg3, pending) = match init.on_msg2(&msg2, NOW) {
            Ok(x) => x,
            Err(e) => return (Err(e), Err(proto("aborted"))),
        };
        let est = match resp.on_msg3(&msg3, NOW) {
            Ok(e) => e,
            Err(e) => return (Err(proto("refused")), Err(e)),
        };
        let peer_of_resp = est.info.peer.clone();
        let mut ts = est.into_transport().unwrap();
        let confirm = stream_confirmation(&mut ts).unwrap();
        let (info, _) = pending.confirm_stream(&confirm).unwrap();
        (Ok(info.peer), Ok(peer_of_resp))
    }

    #[test]
    fn two_nodes_of_one_ca_complete_a_handshake() {
        let ca = CertificateAuthority::generate(NOW).unwrap();
        let (a, b) = (creds(&ca, "a"), creds(&ca, "b"));
        let k = LinkKind::Stream(Plane::Control);
        let (i, r) = run(k, k, a, b);
        assert_eq!(i.unwrap().name, "b");
        assert_eq!(r.unwrap().name, "a");
    }

    #[test]
    fn a_handshake_for_another_plane_fails() {
        let ca = CertificateAuthority::generate(NOW).unwrap();
        let (a, b) = (creds(&ca, "a"), creds(&ca, "b"));
        let (i, _) = run(
            LinkKind::Stream(Plane::Data),
            LinkKind::Stream(Plane::Control),
            a,
            b,
        );
        assert!(matches!(i, Err(HandshakeError::Protocol(_))), "{i:?}");
    }

    #[test]
    fn the_initiator_refuses_a_responder_of_another_ca_before_sending_its_certificate() {
        let ca = CertificateAuthority::generate(NOW).unwrap();
        let other = CertificateAuthority::generate(NOW).unwrap();
        let k = LinkKind::Gossip;
        let (i, _) = run(k, k, creds(&ca, "a"), creds(&other, "b"));
        assert_eq!(
            i.unwrap_err(),
            HandshakeError::Rejected(CertRejection::UnknownCa)
        );
    }

    #[test]
    fn the_responder_refuses_an_expired_or_wrong_key_initiator() {
        let ca = CertificateAuthority::generate(NOW).unwrap();
        let good = creds(&ca, "good");
        let expired = Arc::new(
            ca.issue_with(
                "old",
                &BTreeMap::new(),
                Duration::from_secs(60),
                NOW,
                &IssueOptions {
                    not_before: Some(NOW - 7200),
                    not_after: Some(NOW - 3600),
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let wrong = Arc::new(
            ca.issue_with(
                "wrong",
                &BTreeMap::new(),
                Duration::from_secs(60),
                NOW,
                &IssueOptions {
                    certify_other_key: true,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let k = LinkKind::Gossip;
        let (_, r) = run(k, k, expired, good.clone());
        assert_eq!(
            r.unwrap_err(),
            HandshakeError::Rejected(CertRejection::Expired)
        );
        let (_, r) = run(k, k, wrong, good);
        assert_eq!(
            r.unwrap_err(),
            HandshakeError::Rejected(CertRejection::KeyMismatch)
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_handshake_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = HandshakePayload::decode(&bytes);
            let _ = LinkKind::parse_preamble(&bytes);
            let ca = CertificateAuthority::generate(NOW).unwrap();
            let c = creds(&ca, "r");
            let mut resp = Responder::new(LinkKind::Gossip, c.clone(), 1).unwrap();
            let _ = resp.on_msg1(&bytes);
            let _ = resp.on_msg3(&bytes, NOW);
            let (init, _) = Initiator::start(LinkKind::Gossip, c, 1, None).unwrap();
            let _ = init.on_msg2(&bytes, NOW);
        }
    }
}
