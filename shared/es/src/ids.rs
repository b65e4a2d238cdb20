//! Parsed identifiers: stream ids and revisions.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The longest accepted stream id, in bytes.
pub const STREAM_ID_MAX_LEN: usize = 64;

/// The id of an event stream, safe to use in a file name, an S3 key, a Kafka key, a
/// Redis key or SQL: 1 to 64 characters from `A-Z a-z 0-9 _ - .`, where a `.` only
/// separates two non-empty parts. The part before the first `.` is the stream's
/// category ([`StreamId::category`]): streams of different aggregates share one store
/// and one topic, and a category keeps their ids apart (an aggregate whose ids have no
/// `.` — the account — has none).
///
/// The field is private: the only way to get one is [`StreamId::parse`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct StreamId(String);

/// Why a text is not a stream id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamIdError {
    #[error("the id is empty")]
    Empty,
    #[error("the id is {0} characters long; at most {STREAM_ID_MAX_LEN} are allowed")]
    TooLong(usize),
    #[error("the id contains {0:?}; only letters, digits, '_' and '-' are allowed")]
    InvalidCharacter(char),
}

impl StreamId {
    /// Parse a stream id.
    pub fn parse(text: &str) -> Result<Self, StreamIdError> {
        if text.is_empty() {
            return Err(StreamIdError::Empty);
        }
        if let Some(bad) = text
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(StreamIdError::InvalidCharacter(bad));
        }
        if text.starts_with('.') || text.ends_with('.') || text.contains("..") {
            return Err(StreamIdError::InvalidCharacter('.'));
        }
        if text.len() > STREAM_ID_MAX_LEN {
            return Err(StreamIdError::TooLong(text.len()));
        }
        Ok(Self(text.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The category: the part before the first `.`, if there is one.
    pub fn category(&self) -> Option<&str> {
        self.0.split_once('.').map(|(category, _)| category)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The number of events in a stream, or the position of one event in it.
///
/// Events are numbered from 1; revision 0 is the empty stream. After a commit, the
/// stream's revision is the revision of the commit's last event.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Revision(u64);

/// Why a text is not a revision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a revision (a whole number from 0)")]
pub struct RevisionParseError(pub String);

impl Revision {
    /// The empty stream.
    pub const ZERO: Revision = Revision(0);

    /// A revision from its number.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The revision after this one.
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }

    /// This revision plus `n` events.
    pub const fn advance(self, n: u64) -> Self {
        Self(self.0 + n)
    }

    /// Parse decimal text, as found in `If-Match` or a query string.
    pub fn parse(text: &str) -> Result<Self, RevisionParseError> {
        let t = text.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RevisionParseError(text.to_owned()));
        }
        t.parse::<u64>()
            .map(Self)
            .map_err(|_| RevisionParseError(text.to_owned()))
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_id_is_letters_digits_underscore_and_dash_with_dots_between_parts() {
        assert!(StreamId::parse("account123").is_ok());
        assert!(StreamId::parse("a_b-C9").is_ok());
        assert_eq!(StreamId::parse(""), Err(StreamIdError::Empty));
        for bad in [
            "a/b", "..", ".", ".a", "a.", "a..b", "a\0b", "a\nb", "a b", "é", "a%2F",
        ] {
            assert!(StreamId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(StreamId::parse(&"x".repeat(64)).is_ok());
        assert_eq!(
            StreamId::parse(&"x".repeat(65)),
            Err(StreamIdError::TooLong(65))
        );
    }

    #[test]
    fn the_part_before_a_dot_is_the_category() {
        assert_eq!(StreamId::parse("account123").unwrap().category(), None);
        let transfer = StreamId::parse("transfer.0af3").unwrap();
        assert_eq!(transfer.category(), Some("transfer"));
        assert_eq!(
            StreamId::parse("a.b.c").unwrap().category(),
            Some("a"),
            "the first dot separates"
        );
    }

    #[test]
    fn a_revision_is_a_whole_number() {
        assert_eq!(Revision::parse("7"), Ok(Revision::new(7)));
        assert!(Revision::parse("-1").is_err());
        assert!(Revision::parse("1.5").is_err());
        assert!(Revision::parse("").is_err());
        assert!(Revision::parse("99999999999999999999999").is_err());
    }
}
