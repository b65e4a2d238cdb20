//! Personal data in events, sealed under a key that can be destroyed.

use serde::{Deserialize, Serialize};

/// A value sealed under one data key: `key` names the key (one per data subject, so
/// destroying it erases that subject's data everywhere the events went), `data` is the
/// ciphertext, base64. The toolkit carries sealed values through events, snapshots and
/// the stream without ever seeing inside; whoever holds the key opens them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    pub key: String,
    pub data: String,
}
