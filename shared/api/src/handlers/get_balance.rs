//! `GET /accounts/{id}/balance` — the get-balance function.

use crate::dto::{BalanceResponse, ProblemBody};
use crate::extract::{revision_param, AccountPath, QueryParams};
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

#[derive(Deserialize)]
pub(crate) struct ReadParams {
    pub min_revision: Option<String>,
}

/// The balance, from the cache when it is fresh enough.
#[utoipa::path(
    get, path = "/accounts/{id}/balance", tag = "queries", operation_id = "getBalance",
    params(
        ("id" = String, Path, description = "Account id"),
        ("min_revision" = Option<u64>, Query, description = "Read your writes: answer only once the account reflects at least this revision (a command's `revision`)."),
    ),
    responses(
        (status = 200, body = BalanceResponse, headers(("ETag" = String))),
        (status = 400, body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "min_revision is beyond the account's last revision", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn handle(
    State(state): State<AppState>,
    AccountPath(id): AccountPath,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Response, ApiError> {
    let min = revision_param("min_revision", params.min_revision.as_deref())?;
    let view = state.queries.balance(&id, min).await?;
    let body = BalanceResponse {
        id: id.to_string(),
        balance: view.currency.format(view.balance),
        currency: view.currency.code().to_owned(),
        revision: view.revision.get(),
    };
    Ok(([(header::ETAG, super::etag(view.revision))], Json(body)).into_response())
}
