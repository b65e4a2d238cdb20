//! `GET /accounts/{id}` — the get-account function.

use super::get_balance::ReadParams;
use crate::dto::{AccountResponse, ProblemBody};
use crate::extract::{revision_param, AccountPath, QueryParams};
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tally_auth::Scope;

/// The account's details.
#[utoipa::path(
    get, path = "/accounts/{id}", tag = "queries", operation_id = "getAccount",
    params(
        ("id" = String, Path, description = "Account id"),
        ("min_revision" = Option<u64>, Query, description = "Read your writes: answer only once the account reflects at least this revision."),
    ),
    responses(
        (status = 200, body = AccountResponse, headers(("ETag" = String))),
        (status = 400, body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn handle(
    State(state): State<AppState>,
    who: Who,
    AccountPath(id): AccountPath,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Response, ApiError> {
    let min = revision_param("min_revision", params.min_revision.as_deref())?;
    who.may(&state, Scope::AccountsRead, &id).await?;
    let view = state.queries.account(&id, min, &who.caller).await?;
    let etag = super::etag(view.revision);
    let mut body = AccountResponse::from(view);
    body.holder = super::holder(&state, &who, &id).await?;
    Ok(([(header::ETAG, etag)], Json(body)).into_response())
}
