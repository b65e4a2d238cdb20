//! Who owns an account, and who is asking.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The subject (`sub` of a bearer token) that opened an account and owns it: 1 to 255
/// characters, none of them a control character. Opaque otherwise — it is the identity
/// provider's name for a client or a person, never shown to another subject.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Owner(String);

/// Why a text is not a subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject: {0}")]
pub struct OwnerError(&'static str);

/// The longest subject kept (OpenID Connect allows 255 ASCII characters).
pub const OWNER_MAX_LEN: usize = 255;

impl Owner {
    /// Parse a subject.
    pub fn parse(text: &str) -> Result<Self, OwnerError> {
        if text.is_empty() {
            return Err(OwnerError("empty"));
        }
        if text.chars().count() > OWNER_MAX_LEN {
            return Err(OwnerError("longer than 255 characters"));
        }
        if text.chars().any(char::is_control) {
            return Err(OwnerError("a control character"));
        }
        Ok(Self(text.to_owned()))
    }

    /// The subject as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who asks for a command or a query, as the edge established it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off (`make dev`): anyone may do anything.
    Anyone,
    /// Tally itself: a transfer's saga moving money it was asked to move. The default:
    /// code that does not say who asks runs inside Tally, never at an HTTP edge (which
    /// always names the caller).
    #[default]
    Service,
    /// A holder of the `ops` scope: reaches every account.
    Operator,
    /// An authenticated subject: reaches the accounts it opened — and, if it is the
    /// configured legacy owner, the accounts opened before owners were recorded.
    Subject { owner: Owner, legacy: bool },
}

impl Caller {
    /// A subject that is not the legacy owner.
    pub fn subject(owner: Owner) -> Self {
        Self::Subject {
            owner,
            legacy: false,
        }
    }

    /// Whether this caller reaches an account owned by `owner` (`None`: opened before
    /// owners were recorded).
    pub fn reaches(&self, owner: Option<&Owner>) -> bool {
        match self {
            Self::Anyone | Self::Service | Self::Operator => true,
            Self::Subject { owner: me, legacy } => match owner {
                Some(owner) => owner == me,
                None => *legacy,
            },
        }
    }

    /// The owner a new account opened by this caller gets.
    pub fn owner(&self) -> Option<&Owner> {
        match self {
            Self::Subject { owner, .. } => Some(owner),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_is_parsed() {
        assert!(Owner::parse("client-1").is_ok());
        assert!(Owner::parse("").is_err());
        assert!(Owner::parse("a\nb").is_err());
        assert!(Owner::parse(&"x".repeat(256)).is_err());
        assert!(serde_json::from_str::<Owner>("\"\"").is_err());
    }

    #[test]
    fn a_subject_reaches_its_own_accounts_and_the_legacy_owner_the_ownerless_ones() {
        let a = Owner::parse("a").unwrap();
        let b = Owner::parse("b").unwrap();
        assert!(Caller::subject(a.clone()).reaches(Some(&a)));
        assert!(!Caller::subject(a.clone()).reaches(Some(&b)));
        assert!(!Caller::subject(a.clone()).reaches(None));
        let legacy = Caller::Subject {
            owner: a.clone(),
            legacy: true,
        };
        assert!(legacy.reaches(None));
        assert!(!legacy.reaches(Some(&b)));
        for anyone in [Caller::Anyone, Caller::Service, Caller::Operator] {
            assert!(anyone.reaches(Some(&a)) && anyone.reaches(None));
        }
    }
}
