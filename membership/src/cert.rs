//! The cluster authority and node certificates.
//!
//! The authority is an Ed25519 key pair (ring). It signs node certificates that bind a node id,
//! a name, labels, roles, the node's X25519 Noise static public key, a validity window and a
//! serial. It also signs the admin token used by mutating API calls.
//!
//! Every format here is a strict, bounded binary layout: a version byte first, every length
//! capped, fields in a canonical order (labels and roles sorted, no duplicates), no trailing
//! bytes. Because decoding is strict, `encode(decode(b)) == b` for every accepted `b`, so the
//! signature is checked over the exact bytes that travelled.
//!
//! Certificate v1 layout (integers big-endian):
//! ```text
//! version u8 = 1 | node_id [16] | serial u64 | name: len u8 (1..=253) + bytes
//! | labels: count u8 (<= 32), each key len u8 (1..=63) + bytes, value len u8 + bytes (keys ascending)
//! | roles: count u8 (<= 8), each len u8 (1..=32) + bytes (ascending)
//! | noise_public_key [32] | not_before u64 | not_after u64 | issuer [32] = SHA-256(CA key)
//! | signature [64] = Ed25519(CA, "shoal-cert-v1\0" || all the bytes before it)
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::error::MembershipError;

/// A node's identifier: 16 random bytes assigned when its certificate is issued.
pub type NodeId = [u8; 16];

/// The current certificate format version.
pub const CERT_VERSION: u8 = 1;
/// The largest encoded certificate accepted (all field caps together stay below it).
pub const MAX_CERT_LEN: usize = 12 * 1024;
/// The longest node name, in bytes.
pub const MAX_NAME_LEN: usize = 253;
/// The most labels a certificate may carry.
pub const MAX_LABELS: usize = 32;
/// The longest label key, in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// The longest label value, in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 255;
/// The most roles a certificate may carry.
pub const MAX_ROLES: usize = 8;
/// The longest role, in bytes.
pub const MAX_ROLE_LEN: usize = 32;
/// Clock skew tolerated at both ends of a validity window, in seconds.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// Roles given to node certificates by default.
pub const DEFAULT_ROLES: [&str; 2] = ["control", "data"];
/// Lifetime of the CA certificate written by [`ca_init`]: ten years.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the admin token written by [`ca_init`]: one year.
pub const ADMIN_TOKEN_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// File names inside a CA directory and a node's certificate directory.
pub mod files {
    /// The CA private key (PKCS#8, Ed25519), mode 0600.
    pub const CA_KEY: &str = "ca.key";
    /// The CA certificate.
    pub const CA_CERT: &str = "ca.crt";
    /// The admin credential signed by the CA.
    pub const ADMIN_TOKEN: &str = "admin.token";
    /// The node's X25519 Noise static private key (32 raw bytes), mode 0600.
    pub const NODE_KEY: &str = "node.key";
    /// The node's certificate.
    pub const NODE_CERT: &str = "node.crt";
}

const CERT_DOMAIN: &[u8] = b"shoal-cert-v1\0";
const CA_DOMAIN: &[u8] = b"shoal-ca-v1\0";
const TOKEN_DOMAIN: &[u8] = b"shoal-admin-token-v1\0";
const TOKEN_PREFIX: &str = "shoal-admin-v1.";
const TOKEN_MAX_TEXT: usize = 512;
const SIG_LEN: usize = 64;

/// Why a certificate was refused. Each reason has its own counter in
/// [`crate::link::LinkMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum CertRejection {
    /// Not issued by the cluster's CA: another issuer, or the signature does not verify.
    #[error("not signed by this cluster's authority")]
    UnknownCa,
    /// The validity window ended.
    #[error("expired")]
    Expired,
    /// The validity window has not started.
    #[error("not yet valid")]
    NotYetValid,
    /// The certificate names another Noise static key than the one the peer used.
    #[error("certificate key differs from the Noise static key")]
    KeyMismatch,
    /// The bytes are not a well-formed certificate.
    #[error("malformed certificate")]
    Malformed,
}

/// Seconds since the Unix epoch, from the system clock.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses strict lower- or upper-case hexadecimal (even length, no prefix, no spaces).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let t = text.as_bytes();
    if !t.len().is_multiple_of(2) {
        return None;
    }
    t.chunks(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

/// A bounded reader over untrusted bytes: every read checks the remaining length.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub(crate) fn err(&self, reason: impl Into<String>) -> MembershipError {
        MembershipError::Malformed {
            what: self.what,
            reason: reason.into(),
        }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], MembershipError> {
        if self.buf.len() < n {
            return Err(self.err(format!(
                "truncated: wanted {n} more bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], MembershipError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, MembershipError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, MembershipError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, MembershipError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, MembershipError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string with a one-byte length in `min..=max`.
    fn short_str(
        &mut self,
        min: usize,
        max: usize,
        field: &str,
    ) -> Result<String, MembershipError> {
        let len = self.u8()? as usize;
        if len < min || len > max {
            return Err(self.err(format!("{field} length {len} outside {min}..={max}")));
        }
        let raw = self.bytes(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.err(format!("{field} is not UTF-8")))
    }

    pub(crate) fn consumed(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn finish(self) -> Result<(), MembershipError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Checks a node name: 1..=253 bytes of ASCII letters, digits, `-`, `_`, `.`.
pub fn validate_name(name: &str) -> Result<(), MembershipError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(is_name_char) {
        return Err(MembershipError::InvalidArgument(format!(
            "node name {name:?} must be 1..={MAX_NAME_LEN} characters of letters, digits, '-', '_', '.'"
        )));
    }
    Ok(())
}

/// Checks a label: key 1..=63 bytes of letters, digits, `-`, `_`, `.`, `/`; value at most 255
/// bytes of UTF-8 without control characters.
pub fn validate_label(key: &str, value: &str) -> Result<(), MembershipError> {
    if key.is_empty()
        || key.len() > MAX_LABEL_KEY_LEN
        || !key.chars().all(|c| is_name_char(c) || c == '/')
    {
        return Err(MembershipError::InvalidArgument(format!(
            "label key {key:?} must be 1..={MAX_LABEL_KEY_LEN} characters of letters, digits, '-', '_', '.', '/'"
        )));
    }
    if value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
        return Err(MembershipError::InvalidArgument(format!(
            "label value for {key:?} must be at most {MAX_LABEL_VALUE_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

fn validate_role(role: &str) -> Result<(), MembershipError> {
    if role.is_empty()
        || role.len() > MAX_ROLE_LEN
        || !role
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(MembershipError::InvalidArgument(format!(
            "role {role:?} must be 1..={MAX_ROLE_LEN} characters of a-z, 0-9, '-'"
        )));
    }
    Ok(())
}

/// A node certificate signed by the cluster authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The node's id (random, assigned at issue).
    pub node_id: NodeId,
    /// The node's name.
    pub name: String,
    /// The node's labels (scheduling constraints match on them).
    pub labels: BTreeMap<String, String>,
    /// The node's roles, sorted, no duplicates (`control`, `data`, ...).
    pub roles: Vec<String>,
    /// The node's X25519 Noise static public key.
    pub noise_public_key: [u8; 32],
    /// Start of validity, Unix seconds.
    pub not_before: u64,
    /// End of validity, Unix seconds.
    pub not_after: u64,
    /// The issue serial (random).
    pub serial: u64,
    /// SHA-256 of the issuing CA's public key.
    pub issuer: [u8; 32],
    /// Ed25519 signature by the CA over the encoded fields above.
    pub signature: [u8; 64],
}

impl Certificate {
    /// The signed part: every field but the signature, in wire order.
    fn encode_tbs(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(CERT_VERSION);
        out.extend_from_slice(&self.node_id);
        out.extend_from_slice(&self.serial.to_be_bytes());
        push_short(&mut out, self.name.as_bytes());
        out.push(self.labels.len().min(255) as u8);
        for (k, v) in &self.labels {
            push_short(&mut out, k.as_bytes());
            push_short(&mut out, v.as_bytes());
        }
        out.push(self.roles.len().min(255) as u8);
        for r in &self.roles {
            push_short(&mut out, r.as_bytes());
        }
        out.extend_from_slice(&self.noise_public_key);
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out.extend_from_slice(&self.issuer);
        out
    }

    /// The wire form (what [`Certificate::decode`] accepts).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_tbs();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Strictly decodes a certificate. Does not check the signature: see [`Certificate::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, MembershipError> {
        let mut r = Reader::new(bytes, "certificate");
        if bytes.len() > MAX_CERT_LEN {
            return Err(r.err(format!(
                "{} bytes exceeds the cap of {MAX_CERT_LEN}",
                bytes.len()
            )));
        }
        let version = r.u8()?;
        if version != CERT_VERSION {
            return Err(r.err(format!("unsupported version {version}")));
        }
        let node_id = r.array()?;
        let serial = r.u64()?;
        let name = r.short_str(1, MAX_NAME_LEN, "name")?;
        validate_name(&name).map_err(|e| r.err(e.to_string()))?;
        let n_labels = r.u8()? as usize;
        if n_labels > MAX_LABELS {
            return Err(r.err(format!("{n_labels} labels exceeds the cap of {MAX_LABELS}")));
        }
        let mut labels = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..n_labels {
            let k = r.short_str(1, MAX_LABEL_KEY_LEN, "label key")?;
            let v = r.short_str(0, MAX_LABEL_VALUE_LEN, "label value")?;
            validate_label(&k, &v).map_err(|e| r.err(e.to_string()))?;
            if last.as_ref().is_some_and(|l| *l >= k) {
                return Err(r.err("label keys not strictly ascending"));
            }
            last = Some(k.clone());
            labels.insert(k, v);
        }
        let n_roles = r.u8()? as usize;
        if n_roles > MAX_ROLES {
            return Err(r.err(format!("{n_roles} roles exceeds the cap of {MAX_ROLES}")));
        }
        let mut roles: Vec<String> = Vec::with_capacity(n_roles);
        for _ in 0..n_roles {
            let role = r.short_str(1, MAX_ROLE_LEN, "role")?;
            validate_role(&role).map_err(|e| r.err(e.to_string()))?;
            if roles.last().is_some_and(|l| *l >= role) {
                return Err(r.err("roles not strictly ascending"));
            }
            roles.push(role);
        }
        let noise_public_key = r.array()?;
        let not_before = r.u64()?;
        let not_after = r.u64()?;
        if not_before >= not_after {
            return Err(r.err("not_before is not before not_after"));
        }
        let issuer = r.array()?;
        let signature = r.array()?;
        r.finish()?;
        Ok(Certificate {
            node_id,
            name,
            labels,
            roles,
            noise_public_key,
            not_before,
            not_after,
            serial,
            issuer,
            signature,
        })
    }

    /// Checks issuer and signature against `ca`, then the validity window at `now_unix` (with
    /// [`CLOCK_SKEW_SECS`] of tolerance). The Noise key binding is checked by
    /// [`Certificate::verify_for_key`].
    pub fn verify(&self, ca: &CaCertificate, now_unix: u64) -> Result<(), CertRejection> {
        self.verify_signature(ca)?;
        if now_unix.saturating_add(CLOCK_SKEW_SECS) < self.not_before {
            return Err(CertRejection::NotYetValid);
        }
        if now_unix > self.not_after.saturating_add(CLOCK_SKEW_SECS) {
            return Err(CertRejection::Expired);
        }
        Ok(())
    }

    /// Checks issuer and signature only (no validity window).
    pub fn verify_signature(&self, ca: &CaCertificate) -> Result<(), CertRejection> {
        if self.issuer != ca.ca_id() {
            return Err(CertRejection::UnknownCa);
        }
        let mut signed = CERT_DOMAIN.to_vec();
        signed.extend_from_slice(&self.encode_tbs());
        UnparsedPublicKey::new(&ED25519, &ca.public_key)
            .verify(&signed, &self.signature)
            .map_err(|_| CertRejection::UnknownCa)
    }

    /// [`Certificate::verify`], then checks that the certificate names `remote_static`, the
    /// key the peer proved it holds during the Noise handshake.
    pub fn verify_for_key(
        &self,
        ca: &CaCertificate,
        now_unix: u64,
        remote_static: &[u8],
    ) -> Result<(), CertRejection> {
        self.verify(ca, now_unix)?;
        if !constant_time_eq(&self.noise_public_key, remote_static) {
            return Err(CertRejection::KeyMismatch);
        }
        Ok(())
    }

    /// The node id as 32 hexadecimal characters.
    pub fn node_id_hex(&self) -> String {
        hex(&self.node_id)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn push_short(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(bytes.len().min(255) as u8);
    out.extend_from_slice(&bytes[..bytes.len().min(255)]);
}

/// The cluster authority's certificate: its Ed25519 public key and validity, self-signed.
///
/// Layout: `version u8 = 1 | public_key [32] | not_before u64 | not_after u64 | signature [64]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertificate {
    /// The authority's Ed25519 public key.
    pub public_key: [u8; 32],
    /// Start of validity, Unix seconds.
    pub not_before: u64,
    /// End of validity, Unix seconds.
    pub not_after: u64,
    /// Ed25519 self-signature over the fields above.
    pub signature: [u8; 64],
}

impl CaCertificate {
    const LEN: usize = 1 + 32 + 8 + 8 + SIG_LEN;

    fn encode_tbs(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.push(CERT_VERSION);
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out
    }

    /// The wire/file form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_tbs();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Strictly decodes a CA certificate and checks its self-signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, MembershipError> {
        let mut r = Reader::new(bytes, "CA certificate");
        if bytes.len() != Self::LEN {
            return Err(r.err(format!("{} bytes, expected {}", bytes.len(), Self::LEN)));
        }
        let version = r.u8()?;
        if version != CERT_VERSION {
            return Err(r.err(format!("unsupported version {version}")));
        }
        let ca = CaCertificate {
            public_key: r.array()?,
            not_before: r.u64()?,
            not_after: r.u64()?,
            signature: r.array()?,
        };
        r.finish()?;
        let mut signed = CA_DOMAIN.to_vec();
        signed.extend_from_slice(&ca.encode_tbs());
        UnparsedPublicKey::new(&ED25519, &ca.public_key)
            .verify(&signed, &ca.signature)
            .map_err(|_| MembershipError::Malformed {
                what: "CA certificate",
                reason: "self-signature does not verify".into(),
            })?;
        Ok(ca)
    }

    /// SHA-256 of the public key: the issuer field of the certificates this CA signs.
    pub fn ca_id(&self) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.public_key);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// An X25519 Noise static key pair.
#[derive(Clone)]
pub struct NoiseKeypair {
    /// The private key (keep secret).
    pub private: [u8; 32],
    /// The public key (goes into the certificate).
    pub public: [u8; 32],
}

impl std::fmt::Debug for NoiseKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseKeypair")
            .field("public", &hex(&self.public))
            .finish_non_exhaustive()
    }
}

impl NoiseKeypair {
    /// Generates a fresh key pair.
    pub fn generate() -> Result<Self, MembershipError> {
        let params = crate::link::handshake::noise_params(crate::link::handshake::XX_PATTERN);
        let kp = snow::Builder::new(params)
            .generate_keypair()
            .map_err(|e| MembershipError::Crypto(format!("X25519 key generation: {e}")))?;
        let mut out = NoiseKeypair {
            private: [0; 32],
            public: [0; 32],
        };
        out.private.copy_from_slice(&kp.private);
        out.public.copy_from_slice(&kp.public);
        Ok(out)
    }
}

/// Whether `private` is the X25519 private key of `public`, checked with a one-message Noise
/// `N` handshake in memory (the responder can only decrypt if it holds the private key).
pub fn x25519_key_matches(private: &[u8; 32], public: &[u8; 32]) -> bool {
    let params = || crate::link::handshake::noise_params("Noise_N_25519_AESGCM_SHA256");
    let Ok(mut init) = snow::Builder::new(params())
        .remote_public_key(public)
        .and_then(|b| b.build_initiator())
    else {
        return false;
    };
    let Ok(mut resp) = snow::Builder::new(params())
        .local_private_key(private)
        .and_then(|b| b.build_responder())
    else {
        return false;
    };
    let mut msg = [0u8; 128];
    let mut payload = [0u8; 128];
    let Ok(n) = init.write_message(b"key check", &mut msg) else {
        return false;
    };
    matches!(resp.read_message(&msg[..n], &mut payload), Ok(9)) && &payload[..9] == b"key check"
}

fn random_bytes<const N: usize>() -> Result<[u8; N], MembershipError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| MembershipError::Crypto("system random generator failed".into()))?;
    Ok(out)
}

/// What a certificate should say, for [`CertificateAuthority::sign`].
#[derive(Debug, Clone)]
pub struct CertFields {
    /// The node id.
    pub node_id: NodeId,
    /// The node name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Roles (sorted and de-duplicated when signing).
    pub roles: Vec<String>,
    /// The Noise static public key the certificate names.
    pub noise_public_key: [u8; 32],
    /// Start of validity, Unix seconds.
    pub not_before: u64,
    /// End of validity, Unix seconds.
    pub not_after: u64,
}

/// Options of [`cert_issue_with`] and [`CertificateAuthority::issue_with`]: the knobs tests
/// need to produce certificates a peer must refuse.
#[derive(Debug, Clone, Default)]
pub struct IssueOptions {
    /// Roles; empty means [`DEFAULT_ROLES`].
    pub roles: Vec<String>,
    /// Overrides the start of validity (default: now).
    pub not_before: Option<u64>,
    /// Overrides the end of validity (default: not_before + validity). Setting it in the
    /// past yields an expired certificate.
    pub not_after: Option<u64>,
    /// Reuses a node id (renewal) instead of a random one.
    pub node_id: Option<NodeId>,
    /// Reuses a Noise key pair instead of generating one.
    pub keypair: Option<NoiseKeypair>,
    /// For refusal tests: the certificate names a fresh, unrelated key instead of the node's
    /// key, so the node's handshakes use a key its certificate does not name.
    pub certify_other_key: bool,
}

/// The cluster authority: the Ed25519 signing key and its certificate.
pub struct CertificateAuthority {
    pkcs8: Vec<u8>,
    key: Ed25519KeyPair,
    cert: CaCertificate,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("ca_id", &hex(&self.cert.ca_id()))
            .finish()
    }
}

impl CertificateAuthority {
    /// Generates a new authority valid for [`CA_VALIDITY`] from `now_unix`.
    pub fn generate(now_unix: u64) -> Result<Self, MembershipError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| MembershipError::Crypto("Ed25519 key generation failed".into()))?;
        let pkcs8 = doc.as_ref().to_vec();
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| MembershipError::Crypto(format!("Ed25519 key: {e}")))?;
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(key.public_key().as_ref());
        let mut cert = CaCertificate {
            public_key,
            not_before: now_unix.saturating_sub(CLOCK_SKEW_SECS),
            not_after: now_unix.saturating_add(CA_VALIDITY.as_secs()),
            signature: [0; 64],
        };
        let mut signed = CA_DOMAIN.to_vec();
        signed.extend_from_slice(&cert.encode_tbs());
        cert.signature.copy_from_slice(key.sign(&signed).as_ref());
        Ok(CertificateAuthority { pkcs8, key, cert })
    }

    /// Loads `dir/ca.key` and `dir/ca.crt` and checks they belong together.
    pub fn load(dir: &Path) -> Result<Self, MembershipError> {
        let pkcs8 = read_file(&dir.join(files::CA_KEY), 1024)?;
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| MembershipError::Malformed {
            what: "CA key",
            reason: format!("{}: {e}", dir.join(files::CA_KEY).display()),
        })?;
        let cert = CaCertificate::decode(&read_file(&dir.join(files::CA_CERT), 1024)?)?;
        if key.public_key().as_ref() != cert.public_key {
            return Err(MembershipError::InvalidArgument(format!(
                "{} and {} do not belong together",
                dir.join(files::CA_KEY).display(),
                dir.join(files::CA_CERT).display()
            )));
        }
        Ok(CertificateAuthority { pkcs8, key, cert })
    }

    /// The authority's certificate (what nodes trust).
    pub fn certificate(&self) -> &CaCertificate {
        &self.cert
    }

    /// Signs exactly `fields` (no checks on validity dates: tests use this to make expired or
    /// not-yet-valid certificates). Names, labels and roles are validated.
    pub fn sign(&self, fields: CertFields) -> Result<Certificate, MembershipError> {
        validate_name(&fields.name)?;
        if fields.labels.len() > MAX_LABELS {
            return Err(MembershipError::InvalidArgument(format!(
                "{} labels exceeds the cap of {MAX_LABELS}",
                fields.labels.len()
            )));
        }
        for (k, v) in &fields.labels {
            validate_label(k, v)?;
        }
        let mut roles = fields.roles;
        roles.sort();
        roles.dedup();
        if roles.len() > MAX_ROLES {
            return Err(MembershipError::InvalidArgument(format!(
                "{} roles exceeds the cap of {MAX_ROLES}",
                roles.len()
            )));
        }
        for r in &roles {
            validate_role(r)?;
        }
        if fields.not_before >= fields.not_after {
            return Err(MembershipError::InvalidArgument(
                "the validity window is empty (not_before >= not_after)".into(),
            ));
        }
        let mut cert = Certificate {
            node_id: fields.node_id,
            name: fields.name,
            labels: fields.labels,
            roles,
            noise_public_key: fields.noise_public_key,
            not_before: fields.not_before,
            not_after: fields.not_after,
            serial: u64::from_be_bytes(random_bytes()?),
            issuer: self.cert.ca_id(),
            signature: [0; 64],
        };
        let mut signed = CERT_DOMAIN.to_vec();
        signed.extend_from_slice(&cert.encode_tbs());
        cert.signature
            .copy_from_slice(self.key.sign(&signed).as_ref());
        Ok(cert)
    }

    /// Issues credentials for a new node (fresh key, random node id) valid for `validity`
    /// from `now_unix`.
    pub fn issue(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        validity: Duration,
        now_unix: u64,
    ) -> Result<NodeCredentials, MembershipError> {
        self.issue_with(name, labels, validity, now_unix, &IssueOptions::default())
    }

    /// [`CertificateAuthority::issue`] with options (expired, wrong-key... certificates).
    /// The returned credentials skip the key check, so a wrong-key node can still try to
    /// connect and be refused by its peers.
    pub fn issue_with(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        validity: Duration,
        now_unix: u64,
        opts: &IssueOptions,
    ) -> Result<NodeCredentials, MembershipError> {
        if validity.is_zero() && opts.not_after.is_none() {
            return Err(MembershipError::InvalidArgument(
                "validity must be positive".into(),
            ));
        }
        let keypair = match &opts.keypair {
            Some(k) => k.clone(),
            None => NoiseKeypair::generate()?,
        };
        let certified = if opts.certify_other_key {
            NoiseKeypair::generate()?.public
        } else {
            keypair.public
        };
        let not_before = opts.not_before.unwrap_or(now_unix);
        let not_after = opts
            .not_after
            .unwrap_or_else(|| not_before.saturating_add(validity.as_secs().max(1)));
        let roles = if opts.roles.is_empty() {
            DEFAULT_ROLES.iter().map(|s| s.to_string()).collect()
        } else {
            opts.roles.clone()
        };
        let cert = self.sign(CertFields {
            node_id: match opts.node_id {
                Some(id) => id,
                None => random_bytes()?,
            },
            name: name.to_string(),
            labels: labels.clone(),
            roles,
            noise_public_key: certified,
            not_before,
            not_after,
        })?;
        Ok(NodeCredentials::new_unchecked(
            cert,
            self.cert.clone(),
            keypair.private,
        ))
    }

    /// An admin credential signed by this authority, valid for `validity` from `now_unix`.
    pub fn admin_token(
        &self,
        validity: Duration,
        now_unix: u64,
    ) -> Result<String, MembershipError> {
        let mut body = vec![CERT_VERSION];
        body.extend_from_slice(&self.cert.ca_id());
        body.extend_from_slice(&random_bytes::<16>()?);
        body.extend_from_slice(&now_unix.saturating_sub(CLOCK_SKEW_SECS).to_be_bytes());
        body.extend_from_slice(&now_unix.saturating_add(validity.as_secs()).to_be_bytes());
        let mut signed = TOKEN_DOMAIN.to_vec();
        signed.extend_from_slice(&body);
        body.extend_from_slice(self.key.sign(&signed).as_ref());
        Ok(format!("{TOKEN_PREFIX}{}", hex(&body)))
    }
}

/// A parsed (not yet verified) admin token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// The issuing CA's id.
    pub issuer: [u8; 32],
    /// A random id (for audit logs and revocation).
    pub token_id: [u8; 16],
    /// Start of validity, Unix seconds.
    pub not_before: u64,
    /// End of validity, Unix seconds.
    pub not_after: u64,
    signed: Vec<u8>,
    signature: [u8; 64],
}

impl AdminToken {
    const BODY_LEN: usize = 1 + 32 + 16 + 8 + 8;

    /// Strictly parses the text form `shoal-admin-v1.<hex>` (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Self, MembershipError> {
        let bad = |reason: &str| MembershipError::AdminToken(reason.to_string());
        if text.len() > TOKEN_MAX_TEXT {
            return Err(bad("too long"));
        }
        let hex_part = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| bad("wrong prefix"))?;
        let raw = unhex(hex_part).ok_or_else(|| bad("not hexadecimal"))?;
        if raw.len() != Self::BODY_LEN + SIG_LEN {
            return Err(bad("wrong length"));
        }
        let mut r = Reader::new(&raw, "admin token");
        if r.u8()? != CERT_VERSION {
            return Err(bad("unsupported version"));
        }
        let issuer = r.array()?;
        let token_id = r.array()?;
        let not_before = r.u64()?;
        let not_after = r.u64()?;
        let signature = r.array()?;
        r.finish()?;
        Ok(AdminToken {
            issuer,
            token_id,
            not_before,
            not_after,
            signed: raw[..Self::BODY_LEN].to_vec(),
            signature,
        })
    }

    /// Checks issuer, signature and validity.
    pub fn verify(&self, ca: &CaCertificate, now_unix: u64) -> Result<(), MembershipError> {
        if self.issuer != ca.ca_id() {
            return Err(MembershipError::AdminToken(
                "issued by another authority".into(),
            ));
        }
        let mut signed = TOKEN_DOMAIN.to_vec();
        signed.extend_from_slice(&self.signed);
        UnparsedPublicKey::new(&ED25519, &ca.public_key)
            .verify(&signed, &self.signature)
            .map_err(|_| MembershipError::AdminToken("bad signature".into()))?;
        if now_unix.saturating_add(CLOCK_SKEW_SECS) < self.not_before {
            return Err(MembershipError::AdminToken("not yet valid".into()));
        }
        if now_unix > self.not_after {
            return Err(MembershipError::AdminToken("expired".into()));
        }
        Ok(())
    }
}

/// Parses and verifies an admin token against the cluster's CA.
pub fn verify_admin_token(
    ca: &CaCertificate,
    token: &str,
    now_unix: u64,
) -> Result<(), MembershipError> {
    AdminToken::parse(token)?.verify(ca, now_unix)
}

/// A node's credentials: its certificate, the CA it trusts and its Noise private key.
#[derive(Clone)]
pub struct NodeCredentials {
    /// The node's own certificate.
    pub cert: Certificate,
    /// The cluster authority's certificate (peers must chain to it).
    pub ca: CaCertificate,
    cert_bytes: Vec<u8>,
    private_key: [u8; 32],
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("name", &self.cert.name)
            .field("node_id", &self.cert.node_id_hex())
            .finish_non_exhaustive()
    }
}

impl NodeCredentials {
    /// Builds credentials, checking that `private_key` is the key the certificate names.
    pub fn new(
        cert: Certificate,
        ca: CaCertificate,
        private_key: [u8; 32],
    ) -> Result<Self, MembershipError> {
        if !x25519_key_matches(&private_key, &cert.noise_public_key) {
            return Err(MembershipError::InvalidArgument(
                "the node key is not the key its certificate names".into(),
            ));
        }
        Ok(Self::new_unchecked(cert, ca, private_key))
    }

    /// Builds credentials without the key check (refusal tests: a node whose certificate names
    /// another key than the one it handshakes with).
    pub fn new_unchecked(cert: Certificate, ca: CaCertificate, private_key: [u8; 32]) -> Self {
        let cert_bytes = cert.encode();
        NodeCredentials {
            cert,
            ca,
            cert_bytes,
            private_key,
        }
    }

    /// Loads `dir/node.crt`, `dir/node.key` and `dir/ca.crt`; refuses a key that the
    /// certificate does not name and a certificate not signed by that CA. An expired
    /// certificate loads (peers will refuse it); see [`NodeCredentials::own_cert_problem`].
    pub fn load(cert_dir: &Path) -> Result<Self, MembershipError> {
        let creds = Self::load_unchecked(cert_dir)?;
        if !x25519_key_matches(&creds.private_key, &creds.cert.noise_public_key) {
            return Err(MembershipError::InvalidArgument(format!(
                "{} is not the key that {} names",
                cert_dir.join(files::NODE_KEY).display(),
                cert_dir.join(files::NODE_CERT).display()
            )));
        }
        if creds.cert.verify_signature(&creds.ca).is_err() {
            return Err(MembershipError::InvalidArgument(format!(
                "{} is not signed by {}",
                cert_dir.join(files::NODE_CERT).display(),
                cert_dir.join(files::CA_CERT).display()
            )));
        }
        Ok(creds)
    }

    /// Loads the three files with format checks only (no key or issuer check): for refusal
    /// tests that need a node presenting bad credentials.
    pub fn load_unchecked(cert_dir: &Path) -> Result<Self, MembershipError> {
        let cert =
            Certificate::decode(&read_file(&cert_dir.join(files::NODE_CERT), MAX_CERT_LEN)?)?;
        let ca = CaCertificate::decode(&read_file(&cert_dir.join(files::CA_CERT), 1024)?)?;
        let key_path = cert_dir.join(files::NODE_KEY);
        let raw = read_file(&key_path, 64)?;
        let private_key: [u8; 32] =
            raw.as_slice()
                .try_into()
                .map_err(|_| MembershipError::Malformed {
                    what: "node key",
                    reason: format!("{}: {} bytes, expected 32", key_path.display(), raw.len()),
                })?;
        Ok(Self::new_unchecked(cert, ca, private_key))
    }

    /// Writes `dir/node.key` (0600), `dir/node.crt` and `dir/ca.crt`; refuses to overwrite an
    /// existing key.
    pub fn save(&self, dir: &Path) -> Result<(), MembershipError> {
        create_dir(dir)?;
        write_new(&dir.join(files::NODE_KEY), &self.private_key, true)?;
        write_new(&dir.join(files::NODE_CERT), &self.cert_bytes, false)?;
        write_replace(&dir.join(files::CA_CERT), &self.ca.encode())?;
        Ok(())
    }

    /// Why peers would refuse this node's own certificate at `now_unix`, if they would.
    pub fn own_cert_problem(&self, now_unix: u64) -> Option<CertRejection> {
        self.cert.verify(&self.ca, now_unix).err()
    }

    /// The encoded certificate (sent in handshakes).
    pub fn cert_bytes(&self) -> &[u8] {
        &self.cert_bytes
    }

    pub(crate) fn private_key(&self) -> &[u8; 32] {
        &self.private_key
    }

    /// Shares the credentials.
    pub fn into_arc(self) -> Arc<Self> {
        Arc::new(self)
    }
}

fn read_file(path: &Path, cap: usize) -> Result<Vec<u8>, MembershipError> {
    let file_err = |source| MembershipError::File {
        path: path.to_path_buf(),
        error: source,
    };
    let meta = fs::metadata(path).map_err(file_err)?;
    if meta.len() > cap as u64 {
        return Err(MembershipError::Malformed {
            what: "file",
            reason: format!(
                "{}: {} bytes exceeds the cap of {cap}",
                path.display(),
                meta.len()
            ),
        });
    }
    fs::read(path).map_err(file_err)
}

fn create_dir(dir: &Path) -> Result<(), MembershipError> {
    fs::create_dir_all(dir).map_err(|source| MembershipError::File {
        path: dir.to_path_buf(),
        error: source,
    })
}

fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), MembershipError> {
    let file_err = |source| MembershipError::File {
        path: path.to_path_buf(),
        error: source,
    };
    if path.exists() {
        return Err(MembershipError::InvalidArgument(format!(
            "{} already exists; refusing to overwrite it",
            path.display()
        )));
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(file_err)?;
    if secret {
        // The mode above is filtered by the umask; make sure it is exactly 0600.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(file_err)?;
    }
    f.write_all(bytes).map_err(file_err)?;
    f.sync_all().map_err(file_err)
}

fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), MembershipError> {
    fs::write(path, bytes).map_err(|source| MembershipError::File {
        path: path.to_path_buf(),
        error: source,
    })
}

/// `shoal ca init`: creates a cluster authority in `dir`: `ca.key` (0600), `ca.crt` and
/// `admin.token` (0600). Refuses to overwrite an existing `ca.key`.
pub fn ca_init(dir: &Path) -> Result<(), MembershipError> {
    let now = unix_now();
    if dir.join(files::CA_KEY).exists() {
        return Err(MembershipError::InvalidArgument(format!(
            "{} already exists; refusing to overwrite a cluster authority",
            dir.join(files::CA_KEY).display()
        )));
    }
    let ca = CertificateAuthority::generate(now)?;
    create_dir(dir)?;
    write_new(&dir.join(files::CA_KEY), &ca.pkcs8, true)?;
    write_replace(&dir.join(files::CA_CERT), &ca.cert.encode())?;
    let token = ca.admin_token(ADMIN_TOKEN_VALIDITY, now)?;
    let token_path = dir.join(files::ADMIN_TOKEN);
    let _ = fs::remove_file(&token_path);
    write_new(&token_path, format!("{token}\n").as_bytes(), true)?;
    Ok(())
}

/// `shoal cert issue`: issues credentials for node `name` from the authority in `ca_dir` and
/// writes `out/node.key` (0600), `out/node.crt` and `out/ca.crt`.
pub fn cert_issue(
    ca_dir: &Path,
    name: &str,
    labels: &BTreeMap<String, String>,
    validity: Duration,
    out: &Path,
) -> Result<Certificate, MembershipError> {
    cert_issue_with(
        ca_dir,
        name,
        labels,
        validity,
        out,
        &IssueOptions::default(),
    )
}

/// [`cert_issue`] with [`IssueOptions`]: writes expired, not-yet-valid or wrong-key
/// credentials for refusal tests.
pub fn cert_issue_with(
    ca_dir: &Path,
    name: &str,
    labels: &BTreeMap<String, String>,
    validity: Duration,
    out: &Path,
    opts: &IssueOptions,
) -> Result<Certificate, MembershipError> {
    let ca = CertificateAuthority::load(ca_dir)?;
    let creds = ca.issue_with(name, labels, validity, unix_now(), opts)?;
    creds.save(out)?;
    Ok(creds.cert)
}

/// The path of a file in a directory (for messages).
pub fn file_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels() -> BTreeMap<String, String> {
        [
            ("zone".to_string(), "a".to_string()),
            ("disk".to_string(), "ssd".to_string()),
        ]
        .into()
    }

    #[test]
    fn a_certificate_round_trips_and_verifies() {
        let ca = CertificateAuthority::generate(1_000_000).unwrap();
        let creds = ca
            .issue("node-1", &labels(), Duration::from_secs(3600), 1_000_000)
            .unwrap();
        let bytes = creds.cert.encode();
        let back = Certificate::decode(&bytes).unwrap();
        assert_eq!(back, creds.cert);
        assert_eq!(back.verify(ca.certificate(), 1_000_100), Ok(()));
        assert_eq!(back.roles, vec!["control".to_string(), "data".to_string()]);
    }

    #[test]
    fn every_flipped_byte_of_a_certificate_is_refused() {
        let ca = CertificateAuthority::generate(1_000_000).unwrap();
        let creds = ca
            .issue("node-1", &labels(), Duration::from_secs(3600), 1_000_000)
            .unwrap();
        let bytes = creds.cert.encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            if let Ok(c) = Certificate::decode(&b) {
                assert!(
                    c.verify(ca.certificate(), 1_000_100).is_err(),
                    "byte {i} flipped was accepted"
                );
            }
        }
    }

    #[test]
    fn a_certificate_outside_its_window_or_from_another_ca_is_refused() {
        let ca = CertificateAuthority::generate(1_000_000).unwrap();
        let other = CertificateAuthority::generate(1_000_000).unwrap();
        let c = ca
            .issue("n", &BTreeMap::new(), Duration::from_secs(3600), 1_000_000)
            .unwrap()
            .cert;
        assert_eq!(
            c.verify(other.certificate(), 1_000_100),
            Err(CertRejection::UnknownCa)
        );
        assert_eq!(
            c.verify(ca.certificate(), 1_000_000 + 3600 + CLOCK_SKEW_SECS + 1),
            Err(CertRejection::Expired)
        );
        assert_eq!(
            c.verify(ca.certificate(), 1_000_000 - CLOCK_SKEW_SECS - 1),
            Err(CertRejection::NotYetValid)
        );
        assert_eq!(
            c.verify(ca.certificate(), 1_000_000 + 3600 + CLOCK_SKEW_SECS),
            Ok(())
        );
        // A forged issuer field still fails on the signature.
        let mut forged = c.clone();
        forged.issuer = other.certificate().ca_id();
        assert_eq!(
            forged.verify(other.certificate(), 1_000_100),
            Err(CertRejection::UnknownCa)
        );
        // An edited field breaks the signature.
        let mut edited = c.clone();
        edited.name = "admin".into();
        assert_eq!(
            edited.verify(ca.certificate(), 1_000_100),
            Err(CertRejection::UnknownCa)
        );
    }

    #[test]
    fn the_key_binding_is_checked() {
        let ca = CertificateAuthority::generate(1_000_000).unwrap();
        let creds = ca
            .issue_with(
                "n",
                &BTreeMap::new(),
                Duration::from_secs(60),
                1_000_000,
                &IssueOptions {
                    certify_other_key: true,
                    ..Default::default()
                },
            )
            .unwrap();
        let actual = NoiseKeypair::generate().unwrap();
        assert_eq!(
            creds
                .cert
                .verify_for_key(ca.certificate(), 1_000_001, &actual.public),
            Err(CertRejection::KeyMismatch)
        );
        assert!(!x25519_key_matches(
            creds.private_key(),
            &creds.cert.noise_public_key
        ));
        let good = ca
            .issue("n", &BTreeMap::new(), Duration::from_secs(60), 1_000_000)
            .unwrap();
        assert!(x25519_key_matches(
            good.private_key(),
            &good.cert.noise_public_key
        ));
    }

    #[test]
    fn non_canonical_certificates_are_refused() {
        let ca = CertificateAuthority::generate(1_000_000).unwrap();
        let c = ca
            .issue("n", &labels(), Duration::from_secs(60), 1_000_000)
            .unwrap()
            .cert;
        let mut bytes = c.encode();
        bytes.push(0);
        assert!(
            Certificate::decode(&bytes).is_err(),
            "trailing byte accepted"
        );
        let mut bytes = c.encode();
        bytes[0] = 2;
        assert!(Certificate::decode(&bytes).is_err(), "version 2 accepted");
        assert!(Certificate::decode(&c.encode()[..40]).is_err());
    }

    #[test]
    fn ca_init_and_cert_issue_write_files_that_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        ca_init(&ca_dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join(files::CA_KEY)), 0o600);
        assert!(
            ca_init(&ca_dir).is_err(),
            "ca init overwrote an existing authority"
        );
        let out = dir.path().join("n1");
        let cert = cert_issue(
            &ca_dir,
            "n1",
            &labels(),
            Duration::from_secs(7 * 86400),
            &out,
        )
        .unwrap();
        assert_eq!(mode(&out.join(files::NODE_KEY)), 0o600);
        let creds = NodeCredentials::load(&out).unwrap();
        assert_eq!(creds.cert, cert);
        assert_eq!(creds.own_cert_problem(unix_now()), None);
        let token = fs::read_to_string(ca_dir.join(files::ADMIN_TOKEN)).unwrap();
        verify_admin_token(&creds.ca, &token, unix_now()).unwrap();
        assert!(cert_issue(&ca_dir, "n1", &labels(), Duration::from_secs(60), &out).is_err());
    }

    #[test]
    fn load_refuses_a_key_the_certificate_does_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        ca_init(&ca_dir).unwrap();
        let out = dir.path().join("bad");
        let opts = IssueOptions {
            certify_other_key: true,
            ..Default::default()
        };
        cert_issue_with(
            &ca_dir,
            "bad",
            &BTreeMap::new(),
            Duration::from_secs(60),
            &out,
            &opts,
        )
        .unwrap();
        let err = NodeCredentials::load(&out).unwrap_err().to_string();
        assert!(err.contains("node.key"), "{err}");
        assert!(NodeCredentials::load_unchecked(&out).is_ok());
    }

    #[test]
    fn admin_tokens_are_checked_for_issuer_signature_and_expiry() {
        let ca = CertificateAuthority::generate(1_000_000).unwrap();
        let other = CertificateAuthority::generate(1_000_000).unwrap();
        let token = ca.admin_token(Duration::from_secs(100), 1_000_000).unwrap();
        verify_admin_token(ca.certificate(), &token, 1_000_050).unwrap();
        assert!(verify_admin_token(ca.certificate(), &token, 1_000_101).is_err());
        assert!(verify_admin_token(other.certificate(), &token, 1_000_050).is_err());
        let mut tampered = token.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(verify_admin_token(ca.certificate(), &tampered, 1_000_050).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_certificate_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Certificate::decode(&bytes);
            let _ = CaCertificate::decode(&bytes);
        }

        #[test]
        fn random_text_never_panics_the_token_parser(text in ".{0,600}", raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = AdminToken::parse(&text);
            let _ = AdminToken::parse(&format!("{TOKEN_PREFIX}{}", hex(&raw)));
        }

        #[test]
        fn mutated_certificates_decode_strictly_or_not_at_all(pos in 0usize..400, val in any::<u8>(), cut in 0usize..400) {
            let ca = CertificateAuthority::generate(1_000_000).unwrap();
            let c = ca.issue("n", &labels(), Duration::from_secs(60), 1_000_000).unwrap().cert;
            let mut bytes = c.encode();
            let i = pos % bytes.len();
            bytes[i] = val;
            bytes.truncate(bytes.len() - cut % 8);
            if let Ok(d) = Certificate::decode(&bytes) {
                // Strictness: whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(d.encode(), bytes);
            }
        }
    }
}
