//! Encrypted, length-prefixed stream frames (sans-I/O).
//!
//! On the wire every Noise message is `u16 big-endian length | ciphertext` (16..=65535 bytes).
//! An application frame is one or more Noise messages: the first plaintext starts with the
//! frame's total length (`u32`), then the bytes follow in chunks of at most
//! [`MAX_CHUNK`] bytes. The receiver refuses a total above its cap before buffering it.

use snow::TransportState;

use crate::error::MembershipError;
use crate::link::handshake::{MAX_NOISE_MSG, TAG_LEN};

const _: () = assert!(MAX_CHUNK + TAG_LEN == MAX_NOISE_MSG);

/// The largest plaintext inside one Noise message.
pub const MAX_CHUNK: usize = MAX_NOISE_MSG - TAG_LEN;
/// Default cap on one application frame.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
/// Length prefix of each Noise message on the wire.
pub const LEN_PREFIX: usize = 2;

/// Splits a byte stream into Noise messages: `u16 length | message`. Returns the message
/// length once `buf` holds a whole message, `None` while more bytes are needed.
pub fn message_len(buf: &[u8]) -> Result<Option<usize>, MembershipError> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if len < TAG_LEN {
        return Err(MembershipError::Malformed {
            what: "stream frame",
            reason: format!("message of {len} bytes"),
        });
    }
    Ok((buf.len() >= LEN_PREFIX + len).then_some(len))
}

/// Prefixes `msg` with its length.
pub fn prefix(msg: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Seals and opens application frames over an established stream.
pub struct StreamCodec {
    ts: TransportState,
    max_frame: usize,
    /// Received wire bytes; `rx[rx_start..]` is not yet consumed.
    rx: Vec<u8>,
    rx_start: usize,
    scratch: Vec<u8>,
    plain: Vec<u8>,
    partial: Option<(usize, Vec<u8>)>,
    broken: bool,
}

impl std::fmt::Debug for StreamCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCodec")
            .field("buffered", &self.buffered())
            .finish_non_exhaustive()
    }
}

/// How much a read may append to the receive buffer at once.
pub const READ_CHUNK: usize = 64 * 1024;

impl StreamCodec {
    /// Wraps stream keys; frames above `max_frame` bytes are refused both ways.
    pub fn new(ts: TransportState, max_frame: usize) -> Self {
        StreamCodec {
            ts,
            max_frame,
            rx: Vec::new(),
            rx_start: 0,
            scratch: Vec::new(),
            plain: Vec::new(),
            partial: None,
            broken: false,
        }
    }

    /// The wire bytes of one application frame.
    pub fn seal_frame(&mut self, payload: &[u8]) -> Result<Vec<u8>, MembershipError> {
        if payload.len() > self.max_frame || payload.len() > u32::MAX as usize {
            return Err(MembershipError::FrameTooLarge {
                len: payload.len(),
                max: self.max_frame,
            });
        }
        let crypto = |e: snow::Error| MembershipError::Crypto(e.to_string());
        let chunks = 1 + payload
            .len()
            .saturating_sub(MAX_CHUNK - 4)
            .div_ceil(MAX_CHUNK);
        let mut out = Vec::with_capacity(payload.len() + chunks * (LEN_PREFIX + TAG_LEN) + 4);
        let first_len = payload.len().min(MAX_CHUNK - 4);
        self.scratch.clear();
        self.scratch
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.scratch.extend_from_slice(&payload[..first_len]);
        let mut seal = |plain: &[u8], out: &mut Vec<u8>| -> Result<(), MembershipError> {
            let at = out.len();
            out.resize(at + LEN_PREFIX + plain.len() + TAG_LEN, 0);
            let n = self
                .ts
                .write_message(plain, &mut out[at + LEN_PREFIX..])
                .map_err(crypto)?;
            out[at..at + LEN_PREFIX].copy_from_slice(&(n as u16).to_be_bytes());
            out.truncate(at + LEN_PREFIX + n);
            Ok(())
        };
        seal(&self.scratch, &mut out)?;
        for chunk in payload[first_len..].chunks(MAX_CHUNK) {
            seal(chunk, &mut out)?;
        }
        Ok(out)
    }

    /// Appends bytes read from the socket.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.compact();
        self.rx.extend_from_slice(bytes);
    }

    /// The receive buffer, compacted and with room for [`READ_CHUNK`] more bytes, for a
    /// socket read to append to (call only after [`StreamCodec::next_frame`] returned `None`).
    pub fn read_buffer(&mut self) -> &mut Vec<u8> {
        self.compact();
        self.rx.reserve(READ_CHUNK);
        &mut self.rx
    }

    fn compact(&mut self) {
        if self.rx_start > 0 {
            self.rx.drain(..self.rx_start);
            self.rx_start = 0;
        }
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.rx.len() - self.rx_start
    }

    /// The next complete frame, if the buffered bytes hold one. An error breaks the stream.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, MembershipError> {
        if self.broken {
            return Err(MembershipError::LinkClosed);
        }
        let r = self.next_frame_inner();
        if r.is_err() {
            self.broken = true;
            self.rx.clear();
            self.rx_start = 0;
            self.partial = None;
        }
        r
    }

    fn next_frame_inner(&mut self) -> Result<Option<Vec<u8>>, MembershipError> {
        loop {
            let Some(len) = message_len(&self.rx[self.rx_start..])? else {
                return Ok(None);
            };
            let msg_at = self.rx_start + LEN_PREFIX;
            // Decrypt into a reused buffer (no per-message allocation or zeroing).
            let mut plain = std::mem::take(&mut self.plain);
            if plain.len() < len {
                plain.resize(len, 0);
            }
            let n = self
                .ts
                .read_message(&self.rx[msg_at..msg_at + len], &mut plain[..len]);
            let result = self.take_chunk(&plain, n, msg_at + len);
            self.plain = plain;
            match result? {
                Some(frame) => return Ok(Some(frame)),
                None => continue,
            }
        }
    }

    /// Consumes one decrypted message (`n` = the decryption result) ending at `consumed`.
    fn take_chunk(
        &mut self,
        plain: &[u8],
        n: Result<usize, snow::Error>,
        consumed: usize,
    ) -> Result<Option<Vec<u8>>, MembershipError> {
        let bad = |reason: &str| MembershipError::Malformed {
            what: "stream frame",
            reason: reason.into(),
        };
        let n = n.map_err(|_| bad("message does not authenticate"))?;
        let plain = &plain[..n];
        self.rx_start = consumed;
        if self.rx_start == self.rx.len() {
            self.rx.clear();
            self.rx_start = 0;
        }
        match self.partial.take() {
            None => {
                if plain.len() < 4 {
                    return Err(bad("first chunk without a length"));
                }
                let total = u32::from_be_bytes([plain[0], plain[1], plain[2], plain[3]]) as usize;
                if total > self.max_frame {
                    return Err(MembershipError::FrameTooLarge {
                        len: total,
                        max: self.max_frame,
                    });
                }
                let data = &plain[4..];
                if data.len() > total {
                    return Err(bad("chunk longer than the frame"));
                }
                if data.len() == total {
                    return Ok(Some(data.to_vec()));
                }
                let mut acc = Vec::with_capacity(total.min(4 * MAX_CHUNK));
                acc.extend_from_slice(data);
                self.partial = Some((total, acc));
                Ok(None)
            }
            Some((total, mut acc)) => {
                if plain.is_empty() || acc.len() + plain.len() > total {
                    return Err(bad("chunk does not fit the frame"));
                }
                acc.extend_from_slice(plain);
                if acc.len() == total {
                    return Ok(Some(acc));
                }
                self.partial = Some((total, acc));
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::CertificateAuthority;
    use crate::link::handshake::{Initiator, LinkKind, Plane, Responder, stream_confirmation};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    fn pair(max: usize) -> (StreamCodec, StreamCodec) {
        let ca = CertificateAuthority::generate(1000).unwrap();
        let a = Arc::new(
            ca.issue("a", &BTreeMap::new(), Duration::from_secs(60), 1000)
                .unwrap(),
        );
        let b = Arc::new(
            ca.issue("b", &BTreeMap::new(), Duration::from_secs(60), 1000)
                .unwrap(),
        );
        let k = LinkKind::Stream(Plane::Data);
        let (i, m1) = Initiator::start(k, a, 0, None).unwrap();
        let mut r = Responder::new(k, b, 0).unwrap();
        let m2 = r.on_msg1(&m1).unwrap();
        let (m3, pending) = i.on_msg2(&m2, 1000).unwrap();
        let mut rts = r.on_msg3(&m3, 1000).unwrap().into_transport().unwrap();
        let c = stream_confirmation(&mut rts).unwrap();
        let (_, its) = pending.confirm_stream(&c).unwrap();
        (StreamCodec::new(its, max), StreamCodec::new(rts, max))
    }

    #[test]
    fn frames_of_every_size_cross_byte_by_byte() {
        let (mut a, mut b) = pair(1 << 20);
        for size in [
            0usize,
            1,
            MAX_CHUNK - 4,
            MAX_CHUNK - 3,
            MAX_CHUNK,
            3 * MAX_CHUNK + 7,
        ] {
            let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let wire = a.seal_frame(&data).unwrap();
            let mut got = None;
            for chunk in wire.chunks(977) {
                b.push_bytes(chunk);
                if let Some(f) = b.next_frame().unwrap() {
                    got = Some(f);
                }
            }
            assert_eq!(got.as_deref(), Some(&data[..]), "size {size}");
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_buffered() {
        let (mut a, mut b) = pair(1 << 20);
        // The sender refuses frames above its cap.
        assert!(matches!(
            a.seal_frame(&vec![0u8; (1 << 20) + 1]),
            Err(MembershipError::FrameTooLarge { .. })
        ));
        // A receiver with a smaller cap refuses on the announced length, from the first chunk.
        b.max_frame = 100;
        let wire = a.seal_frame(&vec![7u8; 500]).unwrap();
        b.push_bytes(&wire);
        assert!(matches!(
            b.next_frame(),
            Err(MembershipError::FrameTooLarge { len: 500, max: 100 })
        ));
        assert!(b.next_frame().is_err(), "a broken stream stays broken");
    }

    #[test]
    fn a_message_shorter_than_a_tag_is_refused() {
        let (_, mut b) = pair(1 << 20);
        b.push_bytes(&[0, 1, 2]);
        assert!(b.next_frame().is_err());
    }

    #[test]
    fn a_tampered_frame_breaks_the_stream() {
        let (mut a, mut b) = pair(1 << 20);
        let mut wire = a.seal_frame(b"hello").unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        b.push_bytes(&wire);
        assert!(b.next_frame().is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_frame_decoder(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let (_, mut b) = pair(1 << 16);
            for c in chunks {
                b.push_bytes(&c);
                let _ = b.next_frame();
            }
        }
    }
}
