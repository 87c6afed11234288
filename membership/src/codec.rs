//! The wire codec foca uses for SWIM headers and member updates: bincode 2 (serde, varint
//! integers) with a hard cap on every item.
//!
//! Each item (a header or a member) is encoded into a fixed scratch buffer of [`MAX_ITEM_BYTES`]
//! first, so an encoder never leaves a partial item in foca's packet buffer, and decoding reads
//! at most [`MAX_ITEM_BYTES`] from the input with bincode's allocation limit set to the same
//! value, so garbage can neither allocate without bound nor panic; it only yields an error.

use bytes::{Buf, BufMut};
use foca::{Codec, Header, Member};

use crate::error::MembershipError;
use crate::identity::NodeIdentity;

/// The largest encoded header or member accepted or produced. A header holds at most three
/// identities (≈ 40 bytes each); anything larger is not ours.
pub const MAX_ITEM_BYTES: usize = 256;

type Cfg = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_ITEM_BYTES>,
>;

fn cfg() -> Cfg {
    bincode::config::standard().with_limit::<MAX_ITEM_BYTES>()
}

/// foca's codec for [`NodeIdentity`]: bincode, bounded.
#[derive(Debug, Default, Clone, Copy)]
pub struct BincodeCodec;

impl BincodeCodec {
    fn encode<V: serde::Serialize>(value: &V, mut buf: impl BufMut) -> Result<(), MembershipError> {
        let mut scratch = [0u8; MAX_ITEM_BYTES];
        let n = bincode::serde::encode_into_slice(value, &mut scratch, cfg())
            .map_err(|e| MembershipError::Encode(e.to_string()))?;
        if buf.remaining_mut() < n {
            return Err(MembershipError::Encode(format!(
                "{n} bytes do not fit in the {} left in the packet",
                buf.remaining_mut()
            )));
        }
        buf.put_slice(&scratch[..n]);
        Ok(())
    }

    fn decode<V: serde::de::DeserializeOwned>(mut buf: impl Buf) -> Result<V, MembershipError> {
        // foca hands us contiguous slices; a split buffer whose first chunk ends mid-item would
        // decode as truncated, which is an error, never a wrong value.
        let take = buf.remaining().min(MAX_ITEM_BYTES);
        let chunk = buf.chunk();
        let window = &chunk[..chunk.len().min(take)];
        let (value, used) = bincode::serde::decode_from_slice::<V, _>(window, cfg())
            .map_err(|e| MembershipError::Decode(e.to_string()))?;
        buf.advance(used);
        Ok(value)
    }
}

impl Codec<NodeIdentity> for BincodeCodec {
    type Error = MembershipError;

    fn encode_header(
        &mut self,
        header: &Header<NodeIdentity>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        Self::encode(header, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<NodeIdentity>, Self::Error> {
        Self::decode(buf)
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeIdentity>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        Self::encode(member, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<NodeIdentity>, Self::Error> {
        Self::decode(buf)
    }
}

/// Decodes only the header at the start of a SWIM packet, returning it and its encoded length.
/// The core uses it to check that the sender named in the header is the authenticated peer.
pub fn peek_header(packet: &[u8]) -> Result<(Header<NodeIdentity>, usize), MembershipError> {
    let window = &packet[..packet.len().min(MAX_ITEM_BYTES)];
    bincode::serde::decode_from_slice(window, cfg())
        .map_err(|e| MembershipError::Decode(e.to_string()))
}

/// Encodes a header on its own (used to rewrite the destination of an announce to a seed).
pub fn encode_header(header: &Header<NodeIdentity>) -> Result<Vec<u8>, MembershipError> {
    let mut out = Vec::with_capacity(64);
    BincodeCodec::encode(header, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::{Message, State};
    use proptest::prelude::*;

    fn ident(b: u8, port: u16, epoch: u64) -> NodeIdentity {
        NodeIdentity::new([b; 16], format!("127.0.0.1:{port}").parse().unwrap(), epoch)
    }

    #[test]
    fn headers_and_members_round_trip() {
        let mut c = BincodeCodec;
        let h = Header {
            src: ident(1, 7000, 5),
            src_incarnation: 3,
            dst: ident(2, 7001, u64::MAX),
            message: Message::PingReq {
                target: ident(3, 7002, 9),
                probe_number: 7,
            },
        };
        let m = Member::new(ident(4, 7003, 1), 65535, State::Suspect);
        let mut buf = Vec::new();
        c.encode_header(&h, &mut buf).unwrap();
        c.encode_member(&m, &mut buf).unwrap();
        let mut rd = &buf[..];
        assert_eq!(c.decode_header(&mut rd).unwrap(), h);
        assert_eq!(c.decode_member(&mut rd).unwrap(), m);
        assert!(rd.is_empty(), "decoders consume exactly one item each");
    }

    #[test]
    fn an_item_that_does_not_fit_leaves_the_buffer_untouched() {
        let mut c = BincodeCodec;
        let m = Member::new(ident(4, 7003, 1), 1, State::Alive);
        let mut space = [0u8; 8];
        let mut dst = &mut space[..];
        assert!(c.encode_member(&m, &mut dst).is_err());
        assert_eq!(dst.len(), 8);
        assert_eq!(space, [0u8; 8]);
    }

    #[test]
    fn a_truncated_header_is_an_error() {
        let mut c = BincodeCodec;
        let h = Header {
            src: ident(1, 7000, 5),
            src_incarnation: 3,
            dst: ident(2, 7001, 6),
            message: Message::Announce,
        };
        let mut buf = Vec::new();
        c.encode_header(&h, &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(c.decode_header(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut c = BincodeCodec;
            let _ = c.decode_header(&bytes[..]);
            let _ = c.decode_member(&bytes[..]);
            let _ = peek_header(&bytes);
        }

        #[test]
        fn mutated_valid_packets_never_panic_the_decoders(
            flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8),
            epoch in any::<u64>(),
        ) {
            let mut c = BincodeCodec;
            let h = Header {
                src: ident(1, 7000, epoch),
                src_incarnation: 3,
                dst: ident(2, 7001, 6),
                message: Message::Gossip,
            };
            let mut buf = Vec::new();
            c.encode_header(&h, &mut buf).unwrap();
            c.encode_member(&Member::alive(ident(9, 9, epoch)), &mut buf).unwrap();
            for (i, v) in flips {
                let n = buf.len();
                buf[i % n] ^= v;
            }
            let mut rd = &buf[..];
            if c.decode_header(&mut rd).is_ok() {
                let _ = c.decode_member(&mut rd);
            }
        }
    }
}
