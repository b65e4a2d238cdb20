//! `GET /transfers/{id}` — the get-transfer function: a transfer read from its stream.

use crate::dto::{ProblemBody, TransferResponse};
use crate::{ApiError, AppState, Who};
use axum::extract::{Path, State};
use axum::Json;
use tally_auth::Scope;
use tally_domain::TransferId;

/// A transfer and each of its steps, read from its own event stream (always current).
#[utoipa::path(
    get, path = "/transfers/{id}", tag = "queries", operation_id = "getTransfer",
    params(("id" = String, Path, description = "Transfer id (from the request's `Location`)", pattern = "^[0-9a-f]{32}$")),
    responses(
        (status = 200, body = TransferResponse),
        (status = 400, description = "Not a transfer id", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such transfer", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn handle(
    State(state): State<AppState>,
    who: Who,
    Path(raw): Path<String>,
) -> Result<Json<TransferResponse>, ApiError> {
    let id = TransferId::parse(&raw).map_err(|e| ApiError::InvalidTransferId(e.to_string()))?;
    let view = state
        .saga
        .get(&id)
        .await?
        .ok_or(ApiError::TransferNotFound)?;
    // A transfer is seen by the owners of its two accounts (and operators).
    let mut seen = false;
    for account in [&view.state.from, &view.state.to].into_iter().flatten() {
        if who.reaches(&state, account).await? {
            seen = true;
            break;
        }
    }
    if !seen {
        return Err(ApiError::TransferNotFound);
    }
    who.require(Scope::AccountsRead)?;
    let reference = super::reference_text(&state, &view).await?;
    Ok(Json(TransferResponse::new(&view, reference)))
}
