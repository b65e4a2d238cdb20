//! Every way a request can fail, and its problem+json answer.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tally_app::{CommandError, QueryError};
use tally_domain::AccountError;
use tally_es::StoreError;
use tally_runtime::problem;

/// An error answer. The `type` of each problem (`/problems/{kind}`) is stable.
#[derive(Debug)]
pub enum ApiError {
    /// 400 `invalid-account-id`
    InvalidAccountId(String),
    /// 400 `malformed-json`
    MalformedJson(String),
    /// 422 `invalid-request`: well-formed JSON with missing, unknown or mistyped fields.
    InvalidRequest(String),
    /// 415 `unsupported-media-type`
    UnsupportedMediaType,
    /// 413 `payload-too-large`
    PayloadTooLarge,
    /// 408 `request-timeout`: the body did not arrive in time; the connection is closed.
    RequestTimeout,
    /// 422 `invalid-amount`
    InvalidAmount(String),
    /// 400 `invalid-header`
    InvalidHeader(String),
    /// 400 `invalid-query`
    InvalidQuery(String),
    /// 422 `conflicting-query`: query parameters each well-formed that do not go
    /// together (`as_of` with `as_of_revision`, a period that ends before it starts), a
    /// rule across parameters that OpenAPI cannot state.
    ConflictingQuery(String),
    /// 400 `idempotency-key-required`: a transfer without `Idempotency-Key`.
    IdempotencyKeyRequired,
    /// 400 `invalid-transfer-id`
    InvalidTransferId(String),
    /// 404 `transfer-not-found`
    TransferNotFound,
    /// 422 `same-account`: a transfer from an account to itself.
    SameAccount,
    /// 422 `invalid-reference`
    InvalidReference(String),
    /// 404 `account-not-found`
    AccountNotFound,
    /// 409 `account-already-exists`
    AccountExists,
    /// 409 `account-closed`
    AccountClosed,
    /// 409 `holder-forgotten`: the holder's personal data was already forgotten (or, for
    /// a reference, the debited account's holder was).
    HolderForgotten,
    /// 409 `no-holder-key`: the debited account keeps no key for free text (opened
    /// before keys were made), so a transfer from it takes no reference.
    NoHolderKey,
    /// 422 `insufficient-funds`
    InsufficientFunds(String),
    /// 409 `balance-not-zero`
    BalanceNotZero(String),
    /// 409 `rebuild-running`: `POST /projector/rebuild` while another rebuild of the
    /// read model runs (one at a time, across processes).
    RebuildRunning,
    /// 422 `currency-mismatch`
    CurrencyMismatch(String),
    /// 422 `balance-limit`
    BalanceLimit,
    /// 412 `revision-mismatch`
    RevisionMismatch(String),
    /// 422 `idempotency-key-reused`
    IdempotencyKeyReused,
    /// 422 `revision-not-reached`
    RevisionNotReached(String),
    /// 422 `as-of-in-future`: a balance as of a time that has not come yet.
    AsOfInFuture(String),
    /// 503 `unavailable`, with `Retry-After`
    Unavailable(String),
    /// 503 `outcome-unknown`, with `Retry-After`: an append was sent and its answer
    /// never came; the command may have taken effect. Retry with the same
    /// `Idempotency-Key`.
    OutcomeUnknown(String),
    /// 401 `unauthenticated`, with `WWW-Authenticate: Bearer`: no token, or one that
    /// proves nothing.
    Unauthenticated(tally_auth::AuthError),
    /// 403 `insufficient-scope`: the token lacks the scope the operation needs (and, on
    /// an account, the caller reaches it — otherwise the answer is a 404).
    InsufficientScope(tally_auth::Scope),
    /// 500 `internal`
    Internal(String),
}

/// Every problem kind with its status and title, for the OpenAPI document and tests.
pub const PROBLEM_KINDS: &[(&str, u16, &str)] = &[
    ("invalid-account-id", 400, "Invalid account id"),
    ("malformed-json", 400, "Malformed JSON"),
    ("invalid-header", 400, "Invalid header"),
    ("invalid-query", 400, "Invalid query parameter"),
    ("conflicting-query", 422, "Conflicting query parameters"),
    ("idempotency-key-required", 400, "Idempotency key required"),
    ("invalid-transfer-id", 400, "Invalid transfer id"),
    ("transfer-not-found", 404, "Transfer not found"),
    ("same-account", 422, "Same account"),
    ("invalid-reference", 422, "Invalid reference"),
    ("unauthenticated", 401, "Unauthenticated"),
    ("insufficient-scope", 403, "Insufficient scope"),
    ("not-found", 404, "Not Found"),
    ("account-not-found", 404, "Account not found"),
    ("method-not-allowed", 405, "Method Not Allowed"),
    ("account-already-exists", 409, "Account already exists"),
    ("account-closed", 409, "Account closed"),
    ("balance-not-zero", 409, "Balance not zero"),
    ("holder-forgotten", 409, "Holder forgotten"),
    ("no-holder-key", 409, "No key for free text"),
    ("rebuild-running", 409, "Rebuild running"),
    ("revision-mismatch", 412, "Revision mismatch"),
    ("request-timeout", 408, "Request timeout"),
    ("payload-too-large", 413, "Payload too large"),
    ("unsupported-media-type", 415, "Unsupported media type"),
    ("invalid-request", 422, "Invalid request"),
    ("invalid-amount", 422, "Invalid amount"),
    ("insufficient-funds", 422, "Insufficient funds"),
    ("currency-mismatch", 422, "Currency mismatch"),
    ("balance-limit", 422, "Balance limit"),
    ("idempotency-key-reused", 422, "Idempotency key reused"),
    ("revision-not-reached", 422, "Revision not reached"),
    ("as-of-in-future", 422, "Time in the future"),
    ("internal", 500, "Internal Server Error"),
    ("unavailable", 503, "Service unavailable"),
    ("outcome-unknown", 503, "Outcome unknown"),
    ("not-ready", 503, "Not Ready"),
];

impl ApiError {
    /// The problem kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidAccountId(_) => "invalid-account-id",
            Self::MalformedJson(_) => "malformed-json",
            Self::InvalidRequest(_) => "invalid-request",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::PayloadTooLarge => "payload-too-large",
            Self::RequestTimeout => "request-timeout",
            Self::InvalidAmount(_) => "invalid-amount",
            Self::InvalidHeader(_) => "invalid-header",
            Self::InvalidQuery(_) => "invalid-query",
            Self::ConflictingQuery(_) => "conflicting-query",
            Self::IdempotencyKeyRequired => "idempotency-key-required",
            Self::InvalidTransferId(_) => "invalid-transfer-id",
            Self::TransferNotFound => "transfer-not-found",
            Self::SameAccount => "same-account",
            Self::InvalidReference(_) => "invalid-reference",
            Self::AccountNotFound => "account-not-found",
            Self::AccountExists => "account-already-exists",
            Self::AccountClosed => "account-closed",
            Self::HolderForgotten => "holder-forgotten",
            Self::NoHolderKey => "no-holder-key",
            Self::RebuildRunning => "rebuild-running",
            Self::InsufficientFunds(_) => "insufficient-funds",
            Self::BalanceNotZero(_) => "balance-not-zero",
            Self::CurrencyMismatch(_) => "currency-mismatch",
            Self::BalanceLimit => "balance-limit",
            Self::RevisionMismatch(_) => "revision-mismatch",
            Self::IdempotencyKeyReused => "idempotency-key-reused",
            Self::RevisionNotReached(_) => "revision-not-reached",
            Self::AsOfInFuture(_) => "as-of-in-future",
            Self::Unavailable(_) => "unavailable",
            Self::OutcomeUnknown(_) => "outcome-unknown",
            Self::Unauthenticated(tally_auth::AuthError::Unavailable(_)) => "unavailable",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::InsufficientScope(_) => "insufficient-scope",
            Self::Internal(_) => "internal",
        }
    }

    fn detail(&self) -> String {
        match self {
            Self::InvalidAccountId(d)
            | Self::MalformedJson(d)
            | Self::InvalidRequest(d)
            | Self::InvalidAmount(d)
            | Self::InvalidHeader(d)
            | Self::InvalidQuery(d)
            | Self::ConflictingQuery(d)
            | Self::InvalidTransferId(d)
            | Self::InvalidReference(d)
            | Self::InsufficientFunds(d)
            | Self::BalanceNotZero(d)
            | Self::CurrencyMismatch(d)
            | Self::RevisionMismatch(d)
            | Self::RevisionNotReached(d)
            | Self::AsOfInFuture(d) => d.clone(),
            Self::UnsupportedMediaType => {
                "send the body as application/json (Content-Type: application/json)".into()
            }
            Self::PayloadTooLarge => format!(
                "the body is larger than {} bytes",
                crate::extract::MAX_BODY_BYTES
            ),
            Self::RequestTimeout => format!(
                "the request body did not arrive within {} seconds",
                tally_runtime::server::BODY_TIMEOUT.as_secs()
            ),
            Self::AccountNotFound => "no account has this id".into(),
            Self::IdempotencyKeyRequired => "a transfer needs an Idempotency-Key header, so \
                that a retry never moves the money twice"
                .into(),
            Self::TransferNotFound => "no transfer has this id".into(),
            Self::SameAccount => "a transfer needs two different accounts".into(),
            Self::AccountExists => "an account with this id already exists".into(),
            Self::AccountClosed => "the account is closed".into(),
            Self::HolderForgotten => {
                "the holder's personal data was forgotten: it takes no more free text".into()
            }
            Self::NoHolderKey => "the account `from` keeps no key for free text (it was opened \
                before keys were made): a transfer from it takes no reference"
                .into(),
            Self::BalanceLimit => "the balance would exceed what an account can hold".into(),
            Self::RebuildRunning => "another rebuild of the read model is running (one at a \
                time): wait for it to end"
                .into(),
            Self::IdempotencyKeyReused => {
                "this Idempotency-Key was already used with a different request".into()
            }
            Self::Unavailable(_) => "a backend is unavailable; retry shortly".into(),
            Self::OutcomeUnknown(_) => {
                "the event store stopped answering while the command was being written: \
                 it may or may not have taken effect. Retry with the same Idempotency-Key \
                 (the retry answers with the first outcome and never applies it twice), \
                 or read the account before sending it again without one"
                    .into()
            }
            Self::Unauthenticated(tally_auth::AuthError::Unavailable(_)) => {
                "the identity provider's signing keys are out of reach; retry shortly".into()
            }
            Self::Unauthenticated(e) => e.to_string(),
            Self::InsufficientScope(scope) => {
                format!("this operation needs the `{scope}` scope, which the token lacks")
            }
            Self::Internal(_) => "the request failed unexpectedly".into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.kind();
        let (_, status, title) = PROBLEM_KINDS
            .iter()
            .find(|(k, _, _)| *k == kind)
            .copied()
            .unwrap_or(("internal", 500, "Internal Server Error"));
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match &self {
            Self::Unavailable(e) | Self::OutcomeUnknown(e) => {
                tracing::warn!(kind, error = %e, "backend unavailable")
            }
            Self::Unauthenticated(tally_auth::AuthError::Unavailable(e)) => {
                tracing::warn!(kind, error = %e, "identity provider unavailable")
            }
            Self::Internal(e) => tracing::error!(error = %e, "internal error"),
            _ => tracing::debug!(kind, "request refused"),
        }
        let mut response = problem(status, kind, title, self.detail()).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Unavailable(_)
            | Self::OutcomeUnknown(_)
            | Self::Unauthenticated(tally_auth::AuthError::Unavailable(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // RFC 6750 §3: no error code when the request had no token.
            Self::Unauthenticated(tally_auth::AuthError::Missing) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="tally""#),
                );
            }
            Self::Unauthenticated(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="tally", error="invalid_token""#),
                );
            }
            Self::RequestTimeout => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::InsufficientScope(scope) => {
                let value =
                    format!(r#"Bearer realm="tally", error="insufficient_scope", scope="{scope}""#);
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            _ => {}
        }
        response
    }
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::AlreadyOpen => Self::AccountExists,
            AccountError::NotFound => Self::AccountNotFound,
            AccountError::Closed => Self::AccountClosed,
            AccountError::InsufficientFunds { .. } => Self::InsufficientFunds(e.to_string()),
            AccountError::BalanceNotZero { .. } => Self::BalanceNotZero(e.to_string()),
            AccountError::CurrencyMismatch { .. } => Self::CurrencyMismatch(e.to_string()),
            AccountError::BalanceOverflow => Self::BalanceLimit,
            AccountError::AlreadyForgotten => Self::HolderForgotten,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(e) => Self::Unavailable(e),
            StoreError::Corrupt(e) => Self::Internal(e),
        }
    }
}

impl From<CommandError<AccountError>> for ApiError {
    fn from(e: CommandError<AccountError>) -> Self {
        match e {
            CommandError::Rejected(e) => e.into(),
            CommandError::RevisionMismatch { .. } => Self::RevisionMismatch(e.to_string()),
            CommandError::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            CommandError::Contention => Self::Unavailable(e.to_string()),
            CommandError::Store(e) => e.into(),
            CommandError::OutcomeUnknown(e) => Self::OutcomeUnknown(e),
            CommandError::Decode(e) => Self::Internal(e.to_string()),
        }
    }
}

impl From<tally_app::TransferRequestError> for ApiError {
    fn from(e: tally_app::TransferRequestError) -> Self {
        use tally_app::TransferRequestError as E;
        use tally_domain::TransferError as T;
        match e {
            E::Command(CommandError::Rejected(T::SameAccount)) => Self::SameAccount,
            E::Command(CommandError::Rejected(e @ T::ReferenceTooLong(_))) => {
                Self::InvalidReference(e.to_string())
            }
            E::Command(CommandError::Rejected(e)) => Self::Internal(e.to_string()),
            E::Command(CommandError::IdempotencyKeyReused) => Self::IdempotencyKeyReused,
            E::Command(e @ CommandError::RevisionMismatch { .. }) => Self::Internal(e.to_string()),
            E::Command(e @ CommandError::Contention) => Self::Unavailable(e.to_string()),
            E::Command(CommandError::Store(e)) | E::Store(e) => e.into(),
            E::Command(CommandError::OutcomeUnknown(e)) => Self::OutcomeUnknown(e),
            E::Command(CommandError::Decode(e)) | E::Decode(e) => Self::Internal(e.to_string()),
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::NotFound => Self::AccountNotFound,
            QueryError::RevisionNotReached { .. } => Self::RevisionNotReached(e.to_string()),
            QueryError::FutureTime { .. } => Self::AsOfInFuture(e.to_string()),
            QueryError::ReadModel(e) => Self::Unavailable(e.to_string()),
            QueryError::Projection(tally_app::ProjectionError::Store(e)) => e.into(),
            QueryError::Projection(tally_app::ProjectionError::Decode(e)) => {
                Self::Internal(e.to_string())
            }
            QueryError::Projection(e) => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<tally_vault::VaultError> for ApiError {
    fn from(e: tally_vault::VaultError) -> Self {
        match e {
            tally_vault::VaultError::Store(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}
