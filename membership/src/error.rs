//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in `shoal-membership`.
#[derive(Debug, Error)]
pub enum MembershipError {
    /// A SWIM message or member could not be encoded (too large for the buffer or the cap).
    #[error("cannot encode a membership message: {0}")]
    Encode(String),
    /// Bytes from the network did not decode as a SWIM message (truncated, oversized, garbage).
    #[error("cannot decode a membership message: {0}")]
    Decode(String),
    /// foca refused an input or a configuration.
    #[error("swim: {0}")]
    Swim(String),
    /// The datagram transport failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The membership task has stopped.
    #[error("the membership task has stopped")]
    Stopped,
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A file of the cluster authority or of a node's credentials could not be read or written.
    #[error("{}: {error}", path.display())]
    File {
        /// The file or directory concerned.
        path: std::path::PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// Bytes (a certificate, a key, a token, a frame, a handshake payload) are not in the
    /// expected strict format.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A certificate was refused.
    #[error("certificate refused: {0}")]
    CertRejected(#[from] crate::cert::CertRejection),
    /// An admin token was refused.
    #[error("admin token refused: {0}")]
    AdminToken(String),
    /// A caller passed an invalid argument (empty name, bad label, zero validity...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A cryptographic primitive failed (key generation, bad key material).
    #[error("crypto: {0}")]
    Crypto(String),
    /// A Noise handshake did not complete.
    #[error("handshake with {peer} failed: {reason}")]
    Handshake {
        /// The remote address.
        peer: String,
        /// Why it failed.
        reason: String,
    },
    /// A stream frame or a datagram is larger than the cap.
    #[error("frame of {len} bytes exceeds the cap of {max} bytes")]
    FrameTooLarge {
        /// The announced or requested length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The link (stream or socket) is closed.
    #[error("link closed")]
    LinkClosed,
    /// A cluster-state record or sync message was refused (malformed, inconsistent, clock
    /// too far ahead).
    #[error("state: {0}")]
    State(String),
    /// The state database failed.
    #[error("state storage: {0}")]
    Storage(String),
}
