//! The transfer id: derived from the request's `Idempotency-Key`, so a retry of a
//! request names the same transfer stream, whose first commit decides between them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use tally_es::StreamId;

/// The category of transfer streams: `transfer.{id}`.
pub const CATEGORY: &str = "transfer";

/// A transfer id: 32 lowercase hexadecimal digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TransferId(String);

/// Why a text is not a transfer id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid transfer id: 32 lowercase hexadecimal digits expected")]
pub struct TransferIdError;

impl TransferId {
    const LEN: usize = 32;

    /// Parse a transfer id.
    pub fn parse(text: &str) -> Result<Self, TransferIdError> {
        let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if text.len() == Self::LEN && text.chars().all(hex) {
            Ok(Self(text.to_owned()))
        } else {
            Err(TransferIdError)
        }
    }

    /// The id of the transfer requested with `key` by `owner` (the client's identity;
    /// empty while requests are anonymous): the first 128 bits of a SHA-256 of both, so
    /// one client's keys never name another's transfers.
    pub fn from_key(owner: &str, key: &str) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"tally transfer\0");
        hash.update(owner.as_bytes());
        hash.update(b"\0");
        hash.update(key.as_bytes());
        let digest = hash.finalize();
        let mut text = String::with_capacity(Self::LEN);
        for byte in &digest[..Self::LEN / 2] {
            text.push_str(&format!("{byte:02x}"));
        }
        Self(text)
    }

    /// The id of the transfer whose stream is `stream`, if it is one.
    pub fn of_stream(stream: &StreamId) -> Option<Self> {
        let (category, id) = stream.as_str().split_once('.')?;
        (category == CATEGORY).then(|| Self::parse(id).ok())?
    }

    /// The transfer's event stream.
    pub fn stream_id(&self) -> StreamId {
        StreamId::parse(&format!("{CATEGORY}.{}", self.0)).expect("a valid stream id")
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for TransferId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_one_transfer_per_owner() {
        let a = TransferId::from_key("", "k1");
        assert_eq!(a, TransferId::from_key("", "k1"));
        assert_ne!(a, TransferId::from_key("", "k2"));
        assert_ne!(a, TransferId::from_key("alice", "k1"));
        assert_eq!(TransferId::parse(a.as_str()), Ok(a.clone()));
        assert_eq!(TransferId::of_stream(&a.stream_id()), Some(a));
    }

    #[test]
    fn only_32_lowercase_hex_digits_are_an_id() {
        for bad in ["", "abc", &"A".repeat(32), &"g".repeat(32), &"a".repeat(33)] {
            assert!(TransferId::parse(bad).is_err(), "{bad:?}");
        }
        let account = StreamId::parse("abc").unwrap();
        assert_eq!(TransferId::of_stream(&account), None);
    }
}
