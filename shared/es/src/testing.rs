//! A given/when/then harness for any [`Aggregate`].
//!
//! ```
//! # use tally_es::{Aggregate, DomainEvent, DecodeError};
//! # #[derive(Default, Clone)] struct Counter(u32);
//! # #[derive(Clone, Debug, PartialEq)] struct Incremented;
//! # #[derive(Debug, PartialEq, thiserror::Error)] #[error("full")] struct Full;
//! # impl DomainEvent for Incremented {
//! #   fn event_type(&self) -> &'static str { "Incremented" }
//! #   fn schema_version(&self) -> u32 { 1 }
//! #   fn encode(&self) -> serde_json::Value { serde_json::json!({}) }
//! #   fn decode(_: &str, _: u32, _: serde_json::Value) -> Result<Self, DecodeError> { Ok(Incremented) }
//! # }
//! # impl Aggregate for Counter {
//! #   type Command = (); type Event = Incremented; type Error = Full;
//! #   fn handle(&self, _: ()) -> Result<Vec<Incremented>, Full> {
//! #     if self.0 >= 2 { Err(Full) } else { Ok(vec![Incremented]) } }
//! #   fn apply(&mut self, _: &Incremented) { self.0 += 1 }
//! # }
//! use tally_es::testing::AggregateTest;
//! AggregateTest::<Counter>::given(vec![Incremented])
//!     .when(())
//!     .then_expect_events(vec![Incremented]);
//! AggregateTest::<Counter>::given(vec![Incremented, Incremented])
//!     .when(())
//!     .then_expect_error(Full);
//! ```

use crate::Aggregate;

/// The `given` part: the events already in the stream.
pub struct AggregateTest<A: Aggregate> {
    state: A,
}

/// The `then` part: what the command decided.
pub struct Outcome<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> AggregateTest<A> {
    /// A stream holding `events`.
    pub fn given(events: Vec<A::Event>) -> Self {
        Self {
            state: A::replay(&events),
        }
    }

    /// An empty stream.
    pub fn given_no_previous_events() -> Self {
        Self::given(Vec::new())
    }

    /// Handle `command` against the given state.
    pub fn when(self, command: A::Command) -> Outcome<A> {
        let result = self.state.handle(command);
        Outcome {
            state: self.state,
            result,
        }
    }
}

impl<A: Aggregate> Outcome<A>
where
    A::Event: PartialEq,
{
    /// Assert the command produced exactly `expected`. Returns the state after them.
    #[track_caller]
    pub fn then_expect_events(self, expected: Vec<A::Event>) -> A {
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "the command produced other events");
                let mut state = self.state;
                for e in &events {
                    state.apply(e);
                }
                state
            }
            Err(e) => panic!("expected events {expected:?}, the command was refused: {e}"),
        }
    }

    /// Assert the command was refused with `expected`.
    #[track_caller]
    pub fn then_expect_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Ok(events) => panic!("expected error `{expected}`, the command produced {events:?}"),
            Err(e) => assert_eq!(e, expected, "the command was refused for another reason"),
        }
    }
}
