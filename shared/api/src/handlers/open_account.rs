//! `POST /accounts` — the open-account function.

use crate::dto::{CommandResponse, OpenAccountRequest, ProblemBody};
use crate::extract::{CommandHeaders, JsonBody};
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use tally_auth::Scope;
use tally_domain::{AccountCommand, AccountId};

/// Open an account with a zero balance.
#[utoipa::path(
    post, path = "/accounts", tag = "commands", operation_id = "openAccount",
    request_body = OpenAccountRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the command safe to retry: a retry returns the first answer and writes nothing."),
    ),
    responses(
        (status = 201, description = "Opened", body = CommandResponse,
            headers(("ETag" = String, description = "The revision, quoted"), ("Location" = String))),
        (status = 400, description = "Malformed JSON, invalid id or header", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "The account already exists", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Missing or mistyped fields; Idempotency-Key reused", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: a backend is down or the account too contended, and nothing was written; `outcome-unknown`: the event store stopped answering during the append, so the command may have taken effect — retry with the same `Idempotency-Key`. Either way, retry after `Retry-After`", body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn handle(
    State(state): State<AppState>,
    who: Who,
    headers: CommandHeaders,
    JsonBody(request): JsonBody<OpenAccountRequest>,
) -> Result<Response, ApiError> {
    who.require(Scope::AccountsWrite)?;
    let id =
        AccountId::parse(&request.id).map_err(|e| ApiError::InvalidAccountId(e.to_string()))?;
    let currency = state.policy.currency;
    let owner = who.caller.owner().cloned();
    // The holder's details are sealed under a key of their own, kept before the
    // opening is appended (a key whose opening lost a race is never used).
    let holder = match &request.holder {
        None => None,
        Some(details) => {
            details.check().map_err(ApiError::InvalidRequest)?;
            let vault = state.vault.as_ref().ok_or_else(|| {
                ApiError::Unavailable(
                    "holder details need a master key (TALLY_MASTER_KEY), and this deployment has none"
                        .into(),
                )
            })?;
            let key = vault.new_key().await?;
            let plain = serde_json::to_vec(details).expect("holder details serialize");
            Some(vault.seal(&key, super::HOLDER, &plain))
        }
    };
    // The owner is part of the request: another subject's retry with the same key is
    // another request (refused as a reused key), never handed this one's answer.
    let fingerprint = match &owner {
        Some(owner) => format!("open {currency} for {owner}"),
        None => format!("open {currency}"),
    };
    // (The holder's details stay out of the fingerprint: it is stored in the clear,
    // and a retry seals them afresh. A retry with other details gets the first answer.)
    let command = AccountCommand::Open {
        id: id.clone(),
        currency,
        owner,
        holder,
    };
    super::run_command(
        &state,
        &who,
        &id,
        command,
        fingerprint,
        headers,
        StatusCode::CREATED,
    )
    .await
}
