//! The canonical encoding of state records and sync messages: bincode 2 (serde, varints),
//! with an allocation limit so a hostile length prefix cannot make a decoder allocate more than
//! [`MAX_MESSAGE_BYTES`], and trailing bytes refused.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::MembershipError;

/// The largest encoded message (a sync frame, a stored record): 8 MiB.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

type Cfg = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_MESSAGE_BYTES>,
>;

fn cfg() -> Cfg {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Encodes a value.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, MembershipError> {
    bincode::serde::encode_to_vec(value, cfg())
        .map_err(|e| MembershipError::Encode(format!("state: {e}")))
}

/// Decodes exactly one value from `bytes` (no trailing bytes, bounded allocations).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MembershipError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(MembershipError::FrameTooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(bytes, cfg())
        .map_err(|e| MembershipError::Decode(format!("state: {e}")))?;
    if used != bytes.len() {
        return Err(MembershipError::Decode(format!(
            "state: {} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}
