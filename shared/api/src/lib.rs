//! `tally-api`: the HTTP edge of Tally.
//!
//! * [`routes::ROUTES`] — the one route table: every public method + path and the
//!   function that serves it. The gateway, each function binary, the OpenAPI document
//!   (and later the Helm chart and the cargo-lambda router) are checked against it.
//! * `extract` — requests become domain types at the edge (`AccountId`, `Amount`,
//!   `IdempotencyKey`, `Revision`) or a problem+json answer; nothing invalid gets
//!   further.
//! * `handlers` — one file per function: parse → domain → ports.
//! * [`openapi`] — the OpenAPI 3.1 document, generated from the handlers and DTOs.
//! * [`auth`] — who is asking: the bearer token checked on every route ([`Auth`]),
//!   the scope each operation needs ([`Who`]).

pub mod auth;
mod dto;
mod error;
mod extract;
mod handlers;
pub mod openapi;
pub mod routes;
mod state;

pub use auth::{Auth, Who};
pub use error::{ApiError, PROBLEM_KINDS};
pub use extract::MAX_BODY_BYTES;
pub use routes::{protect, router, Route, ROUTES};
pub use state::AppState;
