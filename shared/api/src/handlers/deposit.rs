//! `POST /accounts/{id}/deposit` — the deposit function.

use crate::dto::{AmountRequest, CommandResponse, ProblemBody};
use crate::extract::{AccountPath, CommandHeaders, JsonBody};
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use tally_auth::Scope;
use tally_domain::AccountCommand;

/// Deposit money into an open account.
#[utoipa::path(
    post, path = "/accounts/{id}/deposit", tag = "commands", operation_id = "deposit",
    request_body = AmountRequest,
    params(
        ("id" = String, Path, description = "Account id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the command safe to retry: a retry returns the first answer and writes nothing."),
        ("If-Match" = Option<String>, Header, description = "The revision (ETag) the client last saw; 412 if the account changed since."),
    ),
    responses(
        (status = 200, description = "Done", body = CommandResponse,
            headers(("ETag" = String, description = "The revision, quoted"))),
        (status = 400, description = "Malformed JSON, invalid id or header", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "The account is closed", body = ProblemBody, content_type = "application/problem+json"),
        (status = 412, description = "If-Match names another revision", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid amount, insufficient funds, missing fields, Idempotency-Key reused", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: a backend is down or the account too contended, and nothing was written; `outcome-unknown`: the event store stopped answering during the append, so the command may have taken effect — retry with the same `Idempotency-Key`. Either way, retry after `Retry-After`", body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn handle(
    State(state): State<AppState>,
    who: Who,
    AccountPath(id): AccountPath,
    headers: CommandHeaders,
    JsonBody(request): JsonBody<AmountRequest>,
) -> Result<Response, ApiError> {
    who.may(&state, Scope::AccountsWrite, &id).await?;
    let amount = super::amount(&state, &request)?;
    let fingerprint = format!("deposit {}", amount.minor());
    let command = AccountCommand::Deposit { amount };
    super::run_command(
        &state,
        &who,
        &id,
        command,
        fingerprint,
        headers,
        StatusCode::OK,
    )
    .await
}
