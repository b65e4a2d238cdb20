//! The account id.

use serde::{Deserialize, Serialize};
use std::fmt;
use tally_es::{StreamId, StreamIdError};

/// An account id: 1 to 64 characters from `A-Z a-z 0-9 _ -`. Ids are parsed, not
/// trusted: every id that reaches a storage key went through [`AccountId::parse`]. No
/// `.`: an account's stream has no category, so no account id is ever the stream id of
/// another aggregate (`transfer.…`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct AccountId(StreamId);

impl<'de> Deserialize<'de> for AccountId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Why a text is not an account id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid account id: {0}")]
pub struct AccountIdError(#[from] pub StreamIdError);

impl AccountId {
    /// Parse an account id.
    pub fn parse(text: &str) -> Result<Self, AccountIdError> {
        if text.contains('.') {
            return Err(AccountIdError(StreamIdError::InvalidCharacter('.')));
        }
        Ok(Self(StreamId::parse(text)?))
    }

    /// The account of `stream`, unless the stream is another aggregate's (has a
    /// category).
    pub fn of_stream(stream: &StreamId) -> Option<Self> {
        stream.category().is_none().then(|| Self(stream.clone()))
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

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_id_has_no_category() {
        assert!(AccountId::parse("a.b").is_err());
        assert!(serde_json::from_str::<AccountId>(r#""transfer.x""#).is_err());
        let transfer = StreamId::parse("transfer.x").unwrap();
        assert_eq!(AccountId::of_stream(&transfer), None);
        let account = StreamId::parse("acc-1").unwrap();
        assert_eq!(
            AccountId::of_stream(&account).map(|a| a.as_str().to_owned()),
            Some("acc-1".to_owned())
        );
    }
}
