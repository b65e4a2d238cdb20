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
    // Every account gets the holder's own key where there is a master key: their
    // details, if given, are sealed under it, and so is any free text they write later
    // (a transfer's reference), so forgetting them erases all of it. The key is kept
    // before the opening is appended (one whose opening lost a race is never used).
    if let Some(details) = &request.holder {
        details.check().map_err(ApiError::InvalidRequest)?;
    }
    let holder = if state.vault.is_none() && request.holder.is_none() {
        None
    } else {
        let vault = super::vault(&state)?;
        let key = vault.new_key().await?;
        let plain = serde_json::to_vec(&request.holder).expect("holder details serialize");
        Some(vault.seal(&key, super::HOLDER, &plain))
    };
    // The owner is part of the request: another subject's retry with the same key is
    // another request (refused as a reused key), never handed this one's answer.
    let fingerprint = match &owner {
        Some(owner) => format!("open {currency} for {owner}"),
        None => format!("open {currency}"),
    };
    // (The holder's details stay out of the fingerprint: it is stored in the clear,
    // and a retry seals them afresh. A retry with other details gets the first answer.)
    let made = holder.as_ref().map(|h| h.key.clone());
    let command = AccountCommand::Open {
        id: id.clone(),
        currency,
        owner,
        holder,
    };
    let answer = super::run_command(
        &state,
        &who,
        &id,
        command,
        fingerprint,
        headers,
        StatusCode::CREATED,
    )
    .await;
    // A key whose opening did not happen — refused (the id is taken, the key reused),
    // or answered by an earlier opening with the same `Idempotency-Key` — is nobody's:
    // destroyed, so a refused request leaves nothing behind. Kept only when the append
    // may have landed (its outcome unknown).
    let unused = match &answer {
        Ok(response) => response.headers().contains_key("idempotent-replayed"),
        Err(ApiError::OutcomeUnknown(_)) => false,
        Err(_) => true,
    };
    if let (true, Some(key), Some(vault)) = (unused, made, &state.vault) {
        if let Err(e) = vault.destroy(&key).await {
            tracing::warn!(error = %e, "an unused data key stays (it seals nothing stored)");
        }
    }
    answer
}
