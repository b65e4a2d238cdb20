//! The upcaster chain: how an event stored at an old schema version becomes the current
//! one.
//!
//! An [`Upcaster`] is a pure function from one version of an event type's payload to a
//! later one (usually the next). An event family registers its steps and the current
//! version of each of its types in an [`Upcasters`] chain, which is checked when it is
//! built: every version a type ever had reaches the current one by exactly one path (no
//! gap), and every step goes forward (no cycle). [`decode_event`] — what
//! [`crate::Commit::decode`] calls for every event, on every read path — runs a stored
//! event up the chain, then hands the current version to [`DomainEvent::decode`], which
//! therefore only ever reads current payloads.
//!
//! ```
//! use serde_json::{json, Value};
//! use tally_es::{ChainError, Upcaster, Upcasters};
//!
//! fn add_owner(mut v: Value) -> Result<Value, String> {
//!     v["owner"] = Value::Null;
//!     Ok(v)
//! }
//! let chain = Upcasters::new(
//!     &[("Opened", 1, 2)],
//!     &[Upcaster { event_type: "Opened", from: 1, to: 2, upcast: add_owner }],
//! )
//! .unwrap();
//! assert_eq!(chain.upcast("Opened", 1, json!({"id": "a"})).unwrap(), json!({"id": "a", "owner": null}));
//! // A chain with a hole in it is refused when it is built, not when an old event shows up.
//! assert!(matches!(
//!     Upcasters::new(&[("Opened", 1, 3)], &[Upcaster { event_type: "Opened", from: 1, to: 2, upcast: add_owner }]),
//!     Err(ChainError::Gap { .. })
//! ));
//! ```

use crate::{DecodeError, DomainEvent, StoredEvent};
use serde_json::Value;
use std::collections::BTreeMap;

/// One step of the chain: `event_type`'s payload at version `from`, rewritten as
/// version `to`. Pure: no clock, no IO, no configuration — the same stored event reads
/// the same everywhere, forever. An `Err` says why the payload does not fit `from`.
#[derive(Clone, Copy, Debug)]
pub struct Upcaster {
    pub event_type: &'static str,
    pub from: u32,
    pub to: u32,
    pub upcast: fn(Value) -> Result<Value, String>,
}

/// Why a chain was refused when it was built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A step of a type that the chain does not declare.
    #[error("an upcaster of `{event_type}`, a type the chain does not declare")]
    UnknownType { event_type: String },
    /// A step that does not go forward, or goes past the current version.
    #[error("the upcaster of `{event_type}` from v{from} to v{to} does not go forward to at most v{current}")]
    Backwards {
        event_type: String,
        from: u32,
        to: u32,
        current: u32,
    },
    /// Two steps from the same version: which one applies would be a guess.
    #[error("two upcasters of `{event_type}` from v{from}")]
    Ambiguous { event_type: String, from: u32 },
    /// A version between the first and the current that no step leaves.
    #[error("`{event_type}` v{version} has no upcaster towards v{current}")]
    Gap {
        event_type: String,
        version: u32,
        current: u32,
    },
    /// A type declared twice, or with a first version after its current one.
    #[error("`{event_type}` is declared twice or with its first version after its current")]
    Declaration { event_type: String },
}

#[derive(Debug)]
struct Family {
    first: u32,
    current: u32,
    /// The step that leaves each version below `current`.
    steps: BTreeMap<u32, Upcaster>,
}

/// A checked chain of upcasters for one family of event types.
#[derive(Debug, Default)]
pub struct Upcasters {
    families: BTreeMap<&'static str, Family>,
}

static NONE: Upcasters = Upcasters {
    families: BTreeMap::new(),
};

impl Upcasters {
    /// The empty chain: every payload is read at the version it was stored with.
    pub fn none() -> &'static Self {
        &NONE
    }

    /// Build and check a chain. `types` names each event type with the first version
    /// ever stored and the current one; `steps` are the upcasters. Every version from
    /// the first to the one before the current must be left by exactly one step that
    /// goes forward, so every stored version reaches the current one.
    pub fn new(types: &[(&'static str, u32, u32)], steps: &[Upcaster]) -> Result<Self, ChainError> {
        let mut families = BTreeMap::new();
        for &(event_type, first, current) in types {
            let fresh = families
                .insert(
                    event_type,
                    Family {
                        first,
                        current,
                        steps: BTreeMap::new(),
                    },
                )
                .is_none();
            if !fresh || first == 0 || first > current {
                return Err(ChainError::Declaration {
                    event_type: event_type.to_owned(),
                });
            }
        }
        for step in steps {
            let Some(family) = families.get_mut(step.event_type) else {
                return Err(ChainError::UnknownType {
                    event_type: step.event_type.to_owned(),
                });
            };
            if step.to <= step.from || step.to > family.current || step.from < family.first {
                return Err(ChainError::Backwards {
                    event_type: step.event_type.to_owned(),
                    from: step.from,
                    to: step.to,
                    current: family.current,
                });
            }
            if family.steps.insert(step.from, *step).is_some() {
                return Err(ChainError::Ambiguous {
                    event_type: step.event_type.to_owned(),
                    from: step.from,
                });
            }
        }
        for (event_type, family) in &families {
            // Walk from the first version: every version on the way is left by a step,
            // and the walk ends on the current one (steps only go forward, so it ends).
            let mut version = family.first;
            while version < family.current {
                match family.steps.get(&version) {
                    Some(step) => version = step.to,
                    None => {
                        return Err(ChainError::Gap {
                            event_type: (*event_type).to_owned(),
                            version,
                            current: family.current,
                        })
                    }
                }
            }
        }
        Ok(Self { families })
    }

    /// The current version of `event_type`, if the chain declares it.
    pub fn current(&self, event_type: &str) -> Option<u32> {
        self.families.get(event_type).map(|f| f.current)
    }

    /// `data`, stored as `event_type` v`version`, at the current version. A type the
    /// chain does not declare passes as it is (its decoder decides); a version before
    /// the first, after the current, or skipped by the chain is refused.
    pub fn upcast(
        &self,
        event_type: &str,
        version: u32,
        data: Value,
    ) -> Result<Value, DecodeError> {
        let Some(family) = self.families.get(event_type) else {
            return Ok(data);
        };
        let unsupported = || DecodeError::UnsupportedVersion {
            event_type: event_type.to_owned(),
            version,
        };
        if version < family.first || version > family.current {
            return Err(unsupported());
        }
        let (mut version, mut data) = (version, data);
        while version < family.current {
            let step = family.steps.get(&version).ok_or_else(unsupported)?;
            data = (step.upcast)(data).map_err(|reason| DecodeError::Malformed {
                event_type: event_type.to_owned(),
                version,
                reason,
            })?;
            version = step.to;
        }
        Ok(data)
    }
}

/// The one way a stored event becomes a domain event, on every read path: up the
/// family's chain to the current version, then [`DomainEvent::decode`].
pub fn decode_event<E: DomainEvent>(stored: &StoredEvent) -> Result<E, DecodeError> {
    let chain = E::upcasters();
    let current = chain.current(&stored.event_type).unwrap_or(stored.version);
    let data = chain.upcast(&stored.event_type, stored.version, stored.data.clone())?;
    E::decode(&stored.event_type, current, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rename(mut v: Value) -> Result<Value, String> {
        let amount = v
            .as_object_mut()
            .and_then(|o| o.remove("amt"))
            .ok_or("no `amt`")?;
        v["amount"] = amount;
        Ok(v)
    }

    fn add_note(mut v: Value) -> Result<Value, String> {
        v["note"] = json!("");
        Ok(v)
    }

    fn step(from: u32, to: u32, upcast: fn(Value) -> Result<Value, String>) -> Upcaster {
        Upcaster {
            event_type: "Paid",
            from,
            to,
            upcast,
        }
    }

    #[test]
    fn an_old_payload_climbs_every_step_to_the_current_version() {
        let chain = Upcasters::new(
            &[("Paid", 1, 3)],
            &[step(1, 2, rename), step(2, 3, add_note)],
        )
        .unwrap();
        assert_eq!(
            chain.upcast("Paid", 1, json!({"amt": 5})).unwrap(),
            json!({"amount": 5, "note": ""})
        );
        assert_eq!(
            chain.upcast("Paid", 2, json!({"amount": 5})).unwrap(),
            json!({"amount": 5, "note": ""})
        );
        let current = json!({"amount": 5, "note": "x"});
        assert_eq!(chain.upcast("Paid", 3, current.clone()).unwrap(), current);
        // Not this family's: passed on untouched for the decoder to judge.
        assert_eq!(chain.upcast("Other", 7, json!(1)).unwrap(), json!(1));
    }

    #[test]
    fn versions_outside_the_chain_and_payloads_that_do_not_fit_are_refused() {
        let chain = Upcasters::new(
            &[("Paid", 1, 3)],
            &[step(1, 2, rename), step(2, 3, add_note)],
        )
        .unwrap();
        for version in [0, 4, 99] {
            assert!(matches!(
                chain.upcast("Paid", version, json!({})),
                Err(DecodeError::UnsupportedVersion { .. })
            ));
        }
        assert!(matches!(
            chain.upcast("Paid", 1, json!({"amount": 5})),
            Err(DecodeError::Malformed { version: 1, .. })
        ));
    }

    #[test]
    fn a_chain_with_a_gap_a_cycle_or_a_doubt_is_refused_when_built() {
        let types = &[("Paid", 1, 3)];
        assert_eq!(
            Upcasters::new(types, &[step(1, 2, rename)]).unwrap_err(),
            ChainError::Gap {
                event_type: "Paid".into(),
                version: 2,
                current: 3
            }
        );
        assert!(matches!(
            Upcasters::new(types, &[step(2, 1, rename), step(1, 3, add_note)]),
            Err(ChainError::Backwards { .. })
        ));
        assert!(matches!(
            Upcasters::new(types, &[step(2, 2, rename)]),
            Err(ChainError::Backwards { .. })
        ));
        assert!(matches!(
            Upcasters::new(types, &[step(1, 4, rename)]),
            Err(ChainError::Backwards { .. })
        ));
        assert!(matches!(
            Upcasters::new(types, &[step(1, 2, rename), step(1, 3, add_note)]),
            Err(ChainError::Ambiguous { .. })
        ));
        assert!(matches!(
            Upcasters::new(&[("Paid", 1, 3), ("Paid", 1, 2)], &[]),
            Err(ChainError::Declaration { .. })
        ));
        assert!(matches!(
            Upcasters::new(&[("Paid", 3, 2)], &[]),
            Err(ChainError::Declaration { .. })
        ));
        let stray = Upcaster {
            event_type: "Refunded",
            ..step(1, 2, rename)
        };
        assert!(matches!(
            Upcasters::new(types, &[step(1, 2, rename), step(2, 3, add_note), stray]),
            Err(ChainError::UnknownType { .. })
        ));
        // A step may skip versions no payload was ever stored at.
        let chain = Upcasters::new(types, &[step(1, 3, add_note)]).unwrap();
        assert!(chain.upcast("Paid", 2, json!({})).is_err());
        assert_eq!(
            chain.upcast("Paid", 1, json!({})).unwrap(),
            json!({"note": ""})
        );
    }
}
