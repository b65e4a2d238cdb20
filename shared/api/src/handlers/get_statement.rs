//! `GET /accounts/{id}/statement` — served by the list-transactions function (the
//! account's history, for a period).

use crate::dto::{ProblemBody, StatementResponse, TransactionItem};
use crate::extract::{revision_param, AccountPath, QueryParams};
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use tally_auth::Scope;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, Duration, OffsetDateTime};

#[derive(Deserialize)]
pub(crate) struct StatementParams {
    from: Option<String>,
    to: Option<String>,
    min_revision: Option<String>,
}

/// Which end of the period a parameter gives.
#[derive(Clone, Copy)]
enum End {
    From,
    To,
}

/// A period end: a date (`from`: the start of that UTC day; `to`: the end of it) or
/// an RFC 3339 time (taken as it is; `to` is exclusive).
fn period_end(name: &str, value: Option<&str>, end: End) -> Result<OffsetDateTime, ApiError> {
    let value = value.map(str::trim).ok_or_else(|| {
        ApiError::InvalidQuery(format!(
            "{name} is required: a date such as 2026-12-01, or an RFC 3339 time"
        ))
    })?;
    if let Ok(date) = Date::parse(value, format_description!("[year]-[month]-[day]")) {
        let day = date.midnight().assume_utc();
        return Ok(match end {
            End::From => day,
            End::To => day + Duration::days(1),
        });
    }
    OffsetDateTime::parse(value, &Rfc3339).map_err(|_| {
        ApiError::InvalidQuery(format!(
            "{name} must be a date such as 2026-12-01 or an RFC 3339 time such as \
             2026-12-01T10:00:00Z, got {value:?}"
        ))
    })
}

/// The statement of a period: the opening balance, every deposit and withdrawal in
/// it, the closing balance (the opening plus the movements, to the cent).
#[utoipa::path(
    get, path = "/accounts/{id}/statement", tag = "queries", operation_id = "getStatement",
    params(
        ("id" = String, Path, description = "Account id"),
        ("from" = String, Query, description = "The period's start: a date (`2026-12-01`, from the start of that UTC day) or an RFC 3339 time."),
        ("to" = String, Query, description = "The period's end: a date (`2026-12-31`, to the end of that UTC day, inclusive) or an RFC 3339 time (exclusive). After `from`."),
        ("min_revision" = Option<u64>, Query, description = "Read your writes."),
    ),
    responses(
        (status = 200, body = StatementResponse),
        (status = 400, description = "A missing or malformed `from` or `to`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "A period that does not end after it starts (`conflicting-query`), or min_revision beyond the account's last revision (`revision-not-reached`)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn handle(
    State(state): State<AppState>,
    who: Who,
    AccountPath(id): AccountPath,
    QueryParams(params): QueryParams<StatementParams>,
) -> Result<Json<StatementResponse>, ApiError> {
    let from = period_end("from", params.from.as_deref(), End::From)?;
    let to = period_end("to", params.to.as_deref(), End::To)?;
    if to <= from {
        return Err(ApiError::ConflictingQuery(format!(
            "the period must end after it starts (from {}, to {})",
            crate::dto::rfc3339(from),
            crate::dto::rfc3339(to)
        )));
    }
    let min = revision_param("min_revision", params.min_revision.as_deref())?;
    who.may(&state, Scope::AccountsRead, &id).await?;
    let statement = state
        .queries
        .statement(&id, from, to, min, &who.caller)
        .await?;
    let currency = statement.account.currency;
    Ok(Json(StatementResponse {
        id: id.to_string(),
        currency: currency.code().to_owned(),
        from: crate::dto::rfc3339(from),
        to: crate::dto::rfc3339(to),
        opening_balance: currency.format(statement.opening),
        money_in: currency.format(statement.money_in()),
        money_out: currency.format(statement.money_out()),
        closing_balance: currency.format(statement.closing()),
        revision: statement.account.revision.get(),
        movements: statement
            .movements
            .iter()
            .map(|t| TransactionItem::new(t, currency))
            .collect(),
    }))
}
