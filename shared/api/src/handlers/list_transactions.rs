//! `GET /accounts/{id}/transactions` — the list-transactions function.

use crate::dto::{ProblemBody, TransactionItem, TransactionsPage};
use crate::extract::{revision_param, AccountPath, QueryParams};
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use tally_auth::Scope;
use tally_domain::Revision;

const DEFAULT_LIMIT: usize = 20;
pub(crate) const MAX_LIMIT: usize = 100;

#[derive(Deserialize)]
pub(crate) struct PageParams {
    limit: Option<String>,
    cursor: Option<String>,
    min_revision: Option<String>,
}

/// Deposits and withdrawals, oldest first, a page at a time.
#[utoipa::path(
    get, path = "/accounts/{id}/transactions", tag = "queries", operation_id = "listTransactions",
    params(
        ("id" = String, Path, description = "Account id"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)."),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page."),
        ("min_revision" = Option<u64>, Query, description = "Read your writes."),
    ),
    responses(
        (status = 200, body = TransactionsPage),
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
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<TransactionsPage>, ApiError> {
    let limit = match params.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::InvalidQuery(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}, got {text:?}"
                )))
            }
        },
    };
    // The cursor is opaque to clients; today it is the revision of the last item seen.
    let after = revision_param("cursor", params.cursor.as_deref())?.unwrap_or(Revision::ZERO);
    let min = revision_param("min_revision", params.min_revision.as_deref())?;
    who.may(&state, Scope::AccountsRead, &id).await?;
    let (view, mut items) = state
        .queries
        .transactions(&id, after, limit + 1, min, &who.caller)
        .await?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|t| t.revision.to_string())
    } else {
        None
    };
    Ok(Json(TransactionsPage {
        id: id.to_string(),
        items: items
            .iter()
            .map(|t| TransactionItem::new(t, view.currency))
            .collect(),
        next_cursor,
    }))
}
