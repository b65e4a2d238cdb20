//! Integrity of the stream: every message a Tally producer puts on the commit topic
//! carries `tally-mac`, an HMAC-SHA256 of its value under a key the functions share
//! (`TALLY_STREAM_KEY`, from the Kubernetes Secret), and every consumer — the projector,
//! the saga, under Lambda or not — checks it before the commit goes further. A message
//! the store did not produce (a forged one, from anyone who can produce to the topic)
//! has no valid MAC and is passed over: nothing it says reaches a read model, a cache or
//! a saga. Nothing true is lost by passing one: the projections read the store for
//! anything they did not get from the stream (gap repair, catch-up).

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;

/// The header that carries the MAC.
pub const MAC_HEADER: &str = "tally-mac";

/// The shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// The shared key. Cheap to clone.
#[derive(Clone)]
pub struct StreamKey(Arc<[u8]>);

impl std::fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamKey(…)")
    }
}

/// Why a message was passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forged {
    /// No `tally-mac` header.
    Unsigned,
    /// A MAC that is not this value's under this key.
    BadMac,
}

impl std::fmt::Display for Forged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unsigned => "no tally-mac header",
            Self::BadMac => "a tally-mac that does not verify",
        })
    }
}

impl StreamKey {
    /// A key from its base64 text (standard or URL-safe alphabet), at least
    /// [`MIN_KEY_BYTES`] long.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
            .map_err(|_| "TALLY_STREAM_KEY: not base64".to_owned())?;
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "TALLY_STREAM_KEY: {} bytes; at least {MIN_KEY_BYTES} (e.g. `openssl rand -base64 32`)",
                bytes.len()
            ));
        }
        Ok(Self(bytes.into()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        // Domain separation: this key signs commit messages and nothing else.
        mac.update(b"tally commit message\0");
        mac
    }

    /// The MAC of a message value, as the header carries it (base64).
    pub fn sign(&self, value: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(value);
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    /// `Ok` if `header` (the `tally-mac` value, if any) is `value`'s MAC; compared in
    /// constant time.
    pub fn verify(&self, value: &[u8], header: Option<&[u8]>) -> Result<(), Forged> {
        let header = header.ok_or(Forged::Unsigned)?;
        let tag = base64::engine::general_purpose::STANDARD
            .decode(header)
            .map_err(|_| Forged::BadMac)?;
        let mut mac = self.mac();
        mac.update(value);
        mac.verify_slice(&tag).map_err(|_| Forged::BadMac)
    }
}

/// Count and log a message passed over.
pub(crate) fn passed_over(why: Forged, topic: &str, partition: i64, offset: i64) {
    metrics::counter!("tally_stream_forged_total").increment(1);
    tracing::error!(%topic, partition, offset, reason = %why,
        "a message on the commit topic that Tally did not produce; passed over");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> StreamKey {
        StreamKey::parse(&base64::engine::general_purpose::STANDARD.encode([byte; 32])).unwrap()
    }

    #[test]
    fn a_message_verifies_only_under_its_key_and_unchanged() {
        let value = br#"{"stream":"a","revision":1}"#;
        let mac = key(1).sign(value);
        assert_eq!(key(1).verify(value, Some(mac.as_bytes())), Ok(()));
        assert_eq!(
            key(2).verify(value, Some(mac.as_bytes())),
            Err(Forged::BadMac)
        );
        assert_eq!(
            key(1).verify(br#"{"stream":"a","revision":2}"#, Some(mac.as_bytes())),
            Err(Forged::BadMac)
        );
        assert_eq!(key(1).verify(value, None), Err(Forged::Unsigned));
        assert_eq!(
            key(1).verify(value, Some(b"not base64!")),
            Err(Forged::BadMac)
        );
    }

    #[test]
    fn a_short_or_garbled_key_is_refused() {
        assert!(StreamKey::parse("c2hvcnQ=").is_err());
        assert!(StreamKey::parse("%%%").is_err());
        assert!(StreamKey::parse(&"A".repeat(44)).is_ok());
    }
}
