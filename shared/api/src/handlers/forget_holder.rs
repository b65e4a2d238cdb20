//! `POST /accounts/{id}/forget` — the forget-holder function.

use crate::dto::{CommandResponse, ProblemBody};
use crate::extract::{AccountPath, CommandHeaders};
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use tally_auth::Scope;
use tally_domain::AccountCommand;

/// Forget the holder's personal data (crypto-shredding), as the owner (`accounts:write`)
/// or an operator (`ops`): the key their details are sealed under is destroyed, then
/// `HolderForgotten` is appended. From then on every
/// copy of the details — in the events, snapshots, the topic, backups — reads as
/// erased; the balance and the movements stay.
#[utoipa::path(
    post, path = "/accounts/{id}/forget", tag = "commands", operation_id = "forgetHolder",
    params(
        ("id" = String, Path, description = "Account id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the command safe to retry."),
    ),
    responses(
        (status = 200, description = "Forgotten", body = CommandResponse,
            headers(("ETag" = String, description = "The revision, quoted"))),
        (status = 400, description = "Invalid id or header; `If-Match` (forgetting does not depend on a revision)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`holder-forgotten`: already forgotten", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Idempotency-Key reused", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: a backend (or the master key) is unavailable; `outcome-unknown`: retry with the same `Idempotency-Key`. Either way the details may already be erased: retry after `Retry-After`", body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn handle(
    State(state): State<AppState>,
    who: Who,
    AccountPath(id): AccountPath,
    headers: CommandHeaders,
) -> Result<Response, ApiError> {
    if headers.expected.is_some() {
        return Err(ApiError::InvalidHeader(
            "If-Match does not apply to forgetting a holder".into(),
        ));
    }
    // The owner (with `accounts:write`), or an operator with `ops` alone.
    let scope = if who.scopes.has(Scope::Ops) {
        Scope::Ops
    } else {
        Scope::AccountsWrite
    };
    who.may(&state, scope, &id).await?;
    // The key first: a crash between the two leaves the details erased already, and
    // the retry appends the event (destroying a destroyed key is nothing).
    if let Some(sealed) = state.queries.holder(&id, &who.caller).await? {
        super::vault(&state)?.destroy(&sealed.key).await?;
    }
    super::run_command(
        &state,
        &who,
        &id,
        AccountCommand::ForgetHolder,
        "forget".to_owned(),
        headers,
        StatusCode::OK,
    )
    .await
}
