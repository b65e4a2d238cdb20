//! `POST /accounts/{id}/close` — the close-account function.

use crate::dto::{CommandResponse, ProblemBody};
use crate::extract::{AccountPath, CommandHeaders};
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use tally_auth::Scope;
use tally_domain::AccountCommand;

/// Close an account whose balance is zero. A closed account refuses every command.
#[utoipa::path(
    post, path = "/accounts/{id}/close", tag = "commands", operation_id = "closeAccount",
    params(
        ("id" = String, Path, description = "Account id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the command safe to retry."),
        ("If-Match" = Option<String>, Header, description = "The revision (ETag) the client last saw."),
    ),
    responses(
        (status = 200, description = "Closed", body = CommandResponse,
            headers(("ETag" = String, description = "The revision, quoted"))),
        (status = 400, body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Already closed, or the balance is not zero", body = ProblemBody, content_type = "application/problem+json"),
        (status = 412, body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: a backend is down or the account too contended, and nothing was written; `outcome-unknown`: the event store stopped answering during the append, so the command may have taken effect — retry with the same `Idempotency-Key`. Either way, retry after `Retry-After`", body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn handle(
    State(state): State<AppState>,
    who: Who,
    AccountPath(id): AccountPath,
    headers: CommandHeaders,
) -> Result<Response, ApiError> {
    who.may(&state, Scope::AccountsWrite, &id).await?;
    let fingerprint = "close".to_owned();
    super::run_command(
        &state,
        &who,
        &id,
        AccountCommand::Close,
        fingerprint,
        headers,
        StatusCode::OK,
    )
    .await
}
