//! Events as a schema boundary: type name, schema version, upcasting.

use crate::Upcasters;
use serde_json::Value;

/// Why a stored event could not be turned back into a domain event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The type name is not one this code knows.
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    /// The schema version is newer than this code, or was never written.
    #[error("unsupported schema version {version} of event type `{event_type}`")]
    UnsupportedVersion { event_type: String, version: u32 },
    /// The payload does not match the schema it claims.
    #[error("malformed payload of event type `{event_type}` v{version}: {reason}")]
    Malformed {
        event_type: String,
        version: u32,
        reason: String,
    },
}

impl DecodeError {
    /// Read `data` as the payload struct `T` of `event_type` v`version`; a mismatch is
    /// [`DecodeError::Malformed`]. What every [`DomainEvent::decode`] does per version.
    pub fn payload<T: serde::de::DeserializeOwned>(
        event_type: &str,
        version: u32,
        data: Value,
    ) -> Result<T, Self> {
        serde_json::from_value(data).map_err(|e| Self::Malformed {
            event_type: event_type.to_owned(),
            version,
            reason: e.to_string(),
        })
    }
}

/// An event type that can be stored and read back across schema versions.
///
/// [`encode`](DomainEvent::encode) always writes the current version. Old versions
/// climb the family's [`Upcasters`] chain first (see [`crate::decode_event`], the one
/// function every read path goes through), so [`decode`](DomainEvent::decode) reads
/// current payloads only. Keep a stored fixture of every old version in the tests,
/// forever.
pub trait DomainEvent: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// Stable type name, e.g. `"Deposited"`.
    fn event_type(&self) -> &'static str;
    /// Current schema version of this event type.
    fn schema_version(&self) -> u32;
    /// The payload, at the current schema version.
    fn encode(&self) -> Value;
    /// Read a payload at its type's current version (the chain has upcast older ones;
    /// a type the chain does not declare arrives at its stored version).
    fn decode(event_type: &str, version: u32, data: Value) -> Result<Self, DecodeError>;
    /// The family's upcaster chain, built and checked once. Default: no chain.
    fn upcasters() -> &'static Upcasters {
        Upcasters::none()
    }
}
