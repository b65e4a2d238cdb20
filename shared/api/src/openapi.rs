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
        handlers::get_statement::handle,
        handlers::request_transfer::handle,
        handlers::get_transfer::handle,
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
        dto::StatementResponse,
        dto::TransferRequestBody,
        dto::TransferResponse,
        dto::TransferStepItem,
        dto::TransferFailureItem,
        dto::ProblemBody,
    )),
    tags(
        (name = "commands", description = "Change an account: each appends one commit to its event stream."),
        (name = "queries", description = "Read the projections."),
    )
)]
struct ApiDoc;

/// The document as a value, with every problem `type` listed.
pub fn value() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
    let kinds: Vec<String> = crate::error::PROBLEM_KINDS
        .iter()
        .map(|(kind, _, _)| format!("/problems/{kind}"))
        .collect();
    doc["components"]["schemas"]["ProblemBody"]["properties"]["type"]["enum"] = kinds.into();
    // An amount is decimal text, as a JSON number or a string; it is read exactly,
    // never through floating point (so no `format: double`).
    doc["components"]["schemas"]["AmountValue"] = serde_json::json!({
        "description": "A decimal amount, as a JSON number (500.00) or a string (\"500.00\"). \
            Read exactly, never through floating point. Greater than zero, at most as \
            many decimals as the currency has, at most the configured maximum.",
        "oneOf": [
            {"type": "number", "exclusiveMinimum": 0},
            {"type": "string", "pattern": "^(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?$"}
        ],
        "examples": [500.00, "150.00"]
    });
    doc
}

/// The document as pretty JSON, with a trailing newline.
pub fn document() -> String {
    let mut json = serde_json::to_string_pretty(&value()).expect("the document serializes");
    json.push('\n');
    json
}
