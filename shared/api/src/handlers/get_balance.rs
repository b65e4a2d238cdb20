//! `GET /accounts/{id}/balance` — the get-balance function.

use crate::dto::{BalanceResponse, ProblemBody};
use crate::extract::{revision_param, AccountPath, QueryParams};
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use tally_app::AsOf;
use tally_auth::Scope;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Deserialize)]
pub(crate) struct ReadParams {
    pub min_revision: Option<String>,
    pub as_of_revision: Option<String>,
    pub as_of: Option<String>,
}

/// The balance now (from the cache when it is fresh enough), or as it was right after a
/// revision or at a time (exactly, from the event store).
#[utoipa::path(
    get, path = "/accounts/{id}/balance", tag = "queries", operation_id = "getBalance",
    params(
        ("id" = String, Path, description = "Account id"),
        ("min_revision" = Option<u64>, Query, description = "Read your writes: answer only once the account reflects at least this revision (a command's `revision`)."),
        ("as_of_revision" = Option<u64>, Query, description = "The balance right after the event at this revision, read from the event store. Not with `as_of` or `min_revision`."),
        ("as_of" = Option<String>, Query, format = DateTime, description = "The balance at this time (RFC 3339, e.g. `2026-12-01T10:00:00Z`): after every event recorded at or before it, read from the event store; `revision` says which event answered. Not with `as_of_revision` or `min_revision`."),
    ),
    responses(
        (status = 200, body = BalanceResponse, headers(("ETag" = String))),
        (status = 400, body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such account, or it did not exist yet at `as_of` / `as_of_revision` 0", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "min_revision or as_of_revision is beyond the account's last revision (`revision-not-reached`), as_of is in the future (`as-of-in-future`), or parameters that do not go together: as_of with as_of_revision, min_revision with either (`conflicting-query`)", body = ProblemBody, content_type = "application/problem+json"),
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
    let as_of_revision = revision_param("as_of_revision", params.as_of_revision.as_deref())?;
    let as_of = params
        .as_of
        .as_deref()
        .map(|t| {
            OffsetDateTime::parse(t.trim(), &Rfc3339).map_err(|_| {
                ApiError::InvalidQuery(format!(
                    "as_of must be an RFC 3339 time such as 2026-12-01T10:00:00Z, got {t:?}"
                ))
            })
        })
        .transpose()?;
    let past =
        match (as_of_revision, as_of, min) {
            (None, None, _) => None,
            (Some(r), None, None) => Some(AsOf::Revision(r)),
            (None, Some(t), None) => Some(AsOf::Time(t)),
            (Some(_), Some(_), _) => {
                return Err(ApiError::ConflictingQuery(
                    "give as_of_revision or as_of, not both".into(),
                ))
            }
            (_, _, Some(_)) => return Err(ApiError::ConflictingQuery(
                "min_revision asks for the present; it does not go with as_of or as_of_revision"
                    .into(),
            )),
        };
    who.may(&state, Scope::AccountsRead, &id).await?;
    let (view, recorded_at) = match past {
        None => (state.queries.balance(&id, min, &who.caller).await?, None),
        Some(as_of) => {
            let past = state.queries.balance_as_of(&id, as_of, &who.caller).await?;
            (past.balance, Some(past.recorded_at))
        }
    };
    let body = BalanceResponse {
        id: id.to_string(),
        balance: view.currency.format(view.balance),
        currency: view.currency.code().to_owned(),
        revision: view.revision.get(),
        recorded_at: recorded_at.map(crate::dto::rfc3339),
    };
    Ok(([(header::ETAG, super::etag(view.revision))], Json(body)).into_response())
}
