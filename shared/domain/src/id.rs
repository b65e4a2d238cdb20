//! The account id.

use serde::{Deserialize, Serialize};
use std::fmt;
use tally_es::{StreamId, StreamIdError};

/// An account id: 1 to 64 characters from `A-Z a-z 0-9 _ -`. Ids are parsed, not
/// trusted: every id that reaches a storage key went through [`AccountId::parse`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountId(StreamId);

/// Why a text is not an account id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid account id: {0}")]
pub struct AccountIdError(#[from] pub StreamIdError);

impl AccountId {
    /// Parse an account id.
    pub fn parse(text: &str) -> Result<Self, AccountIdError> {
        Ok(Self(StreamId::parse(text)?))
    }

    /// The event stream that holds this account.
    pub fn stream_id(&self) -> &StreamId {
        &self.0
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl From<StreamId> for AccountId {
    fn from(id: StreamId) -> Self {
        Self(id)
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
