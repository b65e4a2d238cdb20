//! Who is asking, on every route of every function: [`authenticate`] checks the bearer
//! token in-process (never trusting a gateway to have done it) and puts a [`Who`] on
//! the request; handlers take it as an extractor and require the scope their operation
//! needs ([`Who::require`], or [`Who::may`] on an account, where a caller that does not
//! reach the account is told it does not exist before anything else).

use crate::ApiError;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use tally_auth::{Scope, Scopes, Verifier};
use tally_domain::{Caller, Owner};

/// How a process authenticates requests.
#[derive(Clone)]
pub enum Auth {
    /// Off (`make dev`, unless configured): every request is [`Caller::Anyone`] with
    /// every scope.
    Off,
    /// Bearer tokens of one issuer; `legacy_owner` reaches the accounts opened before
    /// owners were recorded.
    On {
        verifier: Arc<Verifier>,
        legacy_owner: Option<Owner>,
    },
}

impl Auth {
    /// Whether tokens are checked.
    pub fn is_on(&self) -> bool {
        matches!(self, Self::On { .. })
    }

    /// Who sent a request with this `Authorization` header.
    pub async fn who(&self, authorization: Option<&str>) -> Result<Who, ApiError> {
        match self {
            Self::Off => Ok(Who {
                caller: Caller::Anyone,
                scopes: Scopes::all(),
                subject: None,
            }),
            Self::On {
                verifier,
                legacy_owner,
            } => {
                let principal = verifier
                    .verify_header(authorization)
                    .await
                    .map_err(ApiError::Unauthenticated)?;
                Ok(Who {
                    caller: principal.caller(legacy_owner.as_ref()),
                    scopes: principal.scopes,
                    subject: Some(principal.subject),
                })
            }
        }
    }
}

/// Who is asking: the caller and the scopes its token carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    pub caller: Caller,
    pub scopes: Scopes,
    /// The token's subject (an operator's too); `None` with authentication off.
    pub subject: Option<Owner>,
}

impl Who {
    /// `Ok` if the caller reaches account `id` and the token carries `scope`: 404 if it
    /// does not reach it — another subject's, or no such account: the two answer alike,
    /// whatever else the request says (`If-Match`, a key, a missing scope) — then 403
    /// without the scope.
    pub async fn may(
        &self,
        state: &crate::AppState,
        scope: Scope,
        id: &tally_domain::AccountId,
    ) -> Result<(), ApiError> {
        if !self.reaches(state, id).await? {
            return Err(ApiError::AccountNotFound);
        }
        self.require(scope)
    }

    /// Whether the caller reaches account `id` (`false`: no such account, or another
    /// subject's).
    pub async fn reaches(
        &self,
        state: &crate::AppState,
        id: &tally_domain::AccountId,
    ) -> Result<bool, ApiError> {
        Ok(state.queries.reaches(id, &self.caller).await?)
    }

    /// `Ok` if the token carries `scope`, else 403.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.has(scope) {
            Ok(())
        } else {
            Err(ApiError::InsufficientScope(scope))
        }
    }
}

/// The middleware on every route a function serves (not `/healthz`, `/readyz` or
/// `/metrics`): authenticate, or answer 401 (503 if the issuer's keys are out of
/// reach) before any handler runs.
pub async fn authenticate(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.who(authorization).await {
        Ok(who) => {
            request.extensions_mut().insert(who);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Who>()
            .cloned()
            .ok_or_else(|| ApiError::Internal("a route without the authentication layer".into()))
    }
}
