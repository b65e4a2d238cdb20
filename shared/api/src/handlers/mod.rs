//! One file per function: parse → domain → ports. Shared response shaping here.

pub mod close_account;
pub mod deposit;
pub mod get_account;
pub mod get_balance;
pub mod list_transactions;
pub mod open_account;
pub mod withdraw;

use crate::dto::CommandResponse;
use crate::extract::CommandHeaders;
use crate::{ApiError, AppState};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tally_app::{CachedBalance, CommandContext, Executed};
use tally_domain::{Account, AccountCommand, AccountEvent, AccountId, Revision};

/// Run `command` on account `id`; `fingerprint` describes the request for
/// `Idempotency-Key` reuse detection.
pub(crate) async fn run_command(
    state: &AppState,
    id: &AccountId,
    command: AccountCommand,
    fingerprint: String,
    headers: CommandHeaders,
    success: StatusCode,
) -> Result<Response, ApiError> {
    let ctx = CommandContext {
        idempotency: headers
            .idempotency_key
            .map(|k| (k.as_str().to_owned(), fingerprint)),
        expected: headers.expected,
        request_id: headers.request_id,
    };
    let executed = state
        .commands
        .execute(id.stream_id(), command, &ctx)
        .await?;
    let response = respond(state, id, &executed, success);
    // A replayed answer is history: caching its balance could put an old one back.
    if !executed.replayed {
        if let Some(balance) = balance_after(state, &executed) {
            state.queries.note_write(id, balance).await;
        }
    }
    Ok(response)
}

/// The balance the commit left, for the cache.
fn balance_after(state: &AppState, executed: &Executed<Account>) -> Option<CachedBalance> {
    let mut balance = None;
    for event in &executed.commit.events {
        match event {
            AccountEvent::Opened { .. } | AccountEvent::Closed => balance = balance.or(Some(0)),
            AccountEvent::Deposited { balance: b, .. }
            | AccountEvent::Withdrawn { balance: b, .. } => balance = Some(*b),
        }
    }
    Some(CachedBalance {
        balance: balance?,
        currency: state.policy.currency,
        revision: executed.commit.last_revision(),
    })
}

fn respond(
    state: &AppState,
    id: &AccountId,
    executed: &Executed<Account>,
    success: StatusCode,
) -> Response {
    let commit = &executed.commit;
    let (mut closed, mut balance, mut amount) = (false, 0, None);
    for event in &commit.events {
        match event {
            AccountEvent::Opened { .. } => {}
            AccountEvent::Deposited {
                amount: a,
                balance: b,
            }
            | AccountEvent::Withdrawn {
                amount: a,
                balance: b,
            } => {
                balance = *b;
                amount = Some(*a);
            }
            AccountEvent::Closed => closed = true,
        }
    }
    let revision = commit.last_revision();
    let body = CommandResponse::new(
        id.as_str(),
        revision.get(),
        closed,
        balance,
        state.policy.currency,
        amount,
        commit.recorded_at,
    );
    let mut response = (success, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(revision));
    if success == StatusCode::CREATED {
        if let Ok(location) = HeaderValue::from_str(&format!("/accounts/{id}")) {
            headers.insert(header::LOCATION, location);
        }
    }
    if executed.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// The amount of a deposit or withdrawal, parsed under the deployment's policy.
pub(crate) fn amount(
    state: &AppState,
    request: &crate::dto::AmountRequest,
) -> Result<tally_domain::Amount, ApiError> {
    let text = request.text().map_err(ApiError::InvalidAmount)?;
    state
        .policy
        .parse(&text)
        .map_err(|e| ApiError::InvalidAmount(e.to_string()))
}

/// A revision as a strong ETag: `"3"`.
pub(crate) fn etag(revision: Revision) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).expect("digits are a valid header")
}
