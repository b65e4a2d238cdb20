//! The OpenAPI 3.1 document, generated from the handlers and DTOs. The committed copy
//! (`openapi.json` at the repository root) is checked for drift by a test; regenerate
//! it with `make openapi`.

use crate::dto;
use crate::handlers;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally",
        description = "An event-sourced, CQRS bank-account service. Errors are RFC 9457 \
            `application/problem+json` documents whose `type` is one of `/problems/{kind}`; \
            see `ProblemBody`. Commands accept `Idempotency-Key` and `If-Match`, and answer \
            with the new `revision` (also as `ETag`); queries accept `min_revision` to read \
            your own writes.",
        license(name = "Apache-2.0"),
    ),
    paths(
        handlers::open_account::handle,
        handlers::get_account::handle,
        handlers::deposit::handle,
        handlers::withdraw::handle,
        handlers::close_account::handle,
        handlers::get_balance::handle,
        handlers::list_transactions::handle,
    ),
    components(schemas(
        dto::OpenAccountRequest,
        dto::AmountRequest,
        dto::AmountValue,
        dto::CommandResponse,
        dto::BalanceResponse,
        dto::AccountResponse,
        dto::TransactionItem,
        dto::TransactionsPage,
        dto::ProblemBody,
    )),
    tags(
        (name = "commands", description = "Change an account: each appends one commit to its event stream."),
        (name = "queries", description = "Read the projections."),
    )
)]
struct ApiDoc;

/// The document as pretty JSON, with a trailing newline.
pub fn document() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    json.push('\n');
    json
}

/// The document as a value, for checks.
pub fn value() -> serde_json::Value {
    serde_json::from_str(&document()).expect("valid JSON")
}
