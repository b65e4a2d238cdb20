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
        handlers::forget_holder::handle,
        handlers::get_balance::handle,
        handlers::list_transactions::handle,
        handlers::get_statement::handle,
        handlers::request_transfer::handle,
        handlers::get_transfer::handle,
    ),
    components(schemas(
        dto::OpenAccountRequest,
        dto::HolderDetails,
        dto::HolderView,
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
            many decimals as the currency has, at most the configured maximum: as stated \
            here for the default configuration (`TALLY_CURRENCY=USD`, \
            `TALLY_MAX_AMOUNT=1000000.00`).",
        "oneOf": [
            {"type": "number", "minimum": 0.01, "maximum": 1_000_000, "multipleOf": 0.01},
            {"type": "string", "pattern": AMOUNT_TEXT}
        ],
        "examples": [500.00, "150.00"]
    });
    tighten_parameters(&mut doc);
    add_links(&mut doc);
    add_security(&mut doc);
    doc["components"]["schemas"]["OpenAccountRequest"]["properties"]["ID"]["pattern"] =
        ACCOUNT_ID.into();
    doc
}

/// The links a client (or a stateful test) follows: from an opened account to every
/// operation on it, and from a requested transfer to its state.
fn add_links(doc: &mut serde_json::Value) {
    use serde_json::json;
    let by_id = |operation: &str| json!({"operationId": operation, "parameters": {"id": "$response.body#/id"}});
    let mut account = serde_json::Map::new();
    for operation in [
        "getAccount",
        "getBalance",
        "deposit",
        "withdraw",
        "closeAccount",
        "forgetHolder",
        "listTransactions",
        "getStatement",
    ] {
        account.insert(operation.to_owned(), by_id(operation));
    }
    doc["paths"]["/accounts"]["post"]["responses"]["201"]["links"] = account.into();
    doc["paths"]["/transfers"]["post"]["responses"]["202"]["links"] =
        json!({"getTransfer": by_id("getTransfer")});
}

/// The scope each operation needs (`tally_auth::Scope`).
const SCOPES: &[(&str, &str)] = &[
    ("openAccount", "accounts:write"),
    ("deposit", "accounts:write"),
    ("withdraw", "accounts:write"),
    ("closeAccount", "accounts:write"),
    ("forgetHolder", "accounts:write"),
    ("getAccount", "accounts:read"),
    ("getBalance", "accounts:read"),
    ("listTransactions", "accounts:read"),
    ("getStatement", "accounts:read"),
    ("getTransfer", "accounts:read"),
    ("requestTransfer", "transfers:write"),
];

/// Bearer tokens: the scheme, the scope of each operation, and the answers without
/// one (401), without the scope (403), and to a body that does not arrive (408).
fn add_security(doc: &mut serde_json::Value) {
    use serde_json::json;
    doc["components"]["securitySchemes"]["bearer"] = json!({
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An access token of the configured OpenID Connect issuer \
            (`TALLY_AUTH_ISSUER`), for the audience `TALLY_AUTH_AUDIENCE` (default `tally`), \
            with the operation's scope in `scope`. The subject (`sub`) that opens an account \
            owns it; any other subject is answered 404 for it. `ops` reaches every account. \
            Not required where authentication is off (`make dev`)."
    });
    let problem = |description: &str| {
        json!({"description": description, "content": {"application/problem+json": {
            "schema": {"$ref": "#/components/schemas/ProblemBody"}}}})
    };
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let id = operation["operationId"].as_str().unwrap_or_default();
            let Some((_, scope)) = SCOPES.iter().find(|(op, _)| *op == id) else {
                continue;
            };
            operation["security"] = if id == "forgetHolder" {
                // The owner, or an operator with `ops` alone.
                json!([{"bearer": [scope]}, {"bearer": ["ops"]}, {}])
            } else {
                json!([{"bearer": [scope]}, {}])
            };
            let has_body = operation.get("requestBody").is_some();
            let responses = &mut operation["responses"];
            let mut unauthenticated = problem(
                "`unauthenticated`: no bearer token, or one that does not verify (expired, \
                 another issuer or audience, a key the issuer does not publish, a tampered \
                 payload). `unavailable` (503) instead if the issuer's keys are out of reach.",
            );
            unauthenticated["headers"] = json!({"WWW-Authenticate": {
                "description": "`Bearer realm=\"tally\"`, with `error=\"invalid_token\"` for a bad token",
                "schema": {"type": "string"}}});
            responses["401"] = unauthenticated;
            let mut forbidden = problem(&format!(
                "`insufficient-scope`: the token lacks `{scope}` (on an account, only when the \
                 caller owns it: another subject's account is a 404)."
            ));
            forbidden["headers"] = json!({"WWW-Authenticate": {
                "description": "`Bearer realm=\"tally\", error=\"insufficient_scope\", scope=...`",
                "schema": {"type": "string"}}});
            responses["403"] = forbidden;
            if has_body {
                responses["408"] = problem(&format!(
                    "`request-timeout`: the body did not arrive within {} seconds; the \
                     connection is closed.",
                    tally_runtime::server::BODY_TIMEOUT.as_secs()
                ));
            }
        }
    }
}

/// An account id, as `tally_domain::AccountId` accepts it.
const ACCOUNT_ID: &str = "^[A-Za-z0-9_-]{1,64}$";

/// A positive amount with at most two decimals, at most 1,000,000.00, as text.
const AMOUNT_TEXT: &str =
    "^(0\\.(0[1-9]|[1-9][0-9]?)|[1-9][0-9]{0,5}(\\.[0-9]{1,2})?|1000000(\\.00?)?)$";

/// State what the server enforces of each parameter where the generated schema is
/// looser: a schema-valid request is never refused for its form.
fn tighten_parameters(doc: &mut serde_json::Value) {
    use serde_json::json;
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let Some(parameters) = operation["parameters"].as_array_mut() else {
                continue;
            };
            for parameter in parameters {
                let schema = match (parameter["in"].as_str(), parameter["name"].as_str()) {
                    (Some("path"), Some("id")) if path.starts_with("/accounts") => {
                        json!({"type": "string", "pattern": ACCOUNT_ID})
                    }
                    // 1 to 255 visible ASCII characters (`IdempotencyKey`).
                    (Some("header"), Some("Idempotency-Key")) => {
                        json!({"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"})
                    }
                    // The ETag a response carried, or the bare revision.
                    (Some("header"), Some("If-Match")) => {
                        json!({"type": "string", "pattern": "^(\"[0-9]{1,18}\"|[0-9]{1,18})$"})
                    }
                    (Some("query"), Some("limit")) => json!({
                        "type": "integer",
                        "minimum": 1,
                        "maximum": crate::handlers::list_transactions::MAX_LIMIT,
                    }),
                    // Opaque to clients; today the revision of the last item seen.
                    (Some("query"), Some("cursor")) => {
                        json!({"type": "string", "pattern": "^[0-9]{1,18}$"})
                    }
                    (Some("query"), Some("from" | "to")) => json!({
                        "type": "string",
                        "anyOf": [{"format": "date"}, {"format": "date-time"}],
                    }),
                    _ => continue,
                };
                parameter["schema"] = schema;
            }
        }
    }
}

/// The document as pretty JSON, with a trailing newline.
pub fn document() -> String {
    let mut json = serde_json::to_string_pretty(&value()).expect("the document serializes");
    json.push('\n');
    json
}
