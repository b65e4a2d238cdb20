//! `POST /transfers` — the transfer function: records the request; the transfer saga
//! moves the money.

use crate::dto::{ProblemBody, TransferRequestBody, TransferResponse};
use crate::extract::{CommandHeaders, JsonBody};
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tally_app::TransferRequest;
use tally_auth::Scope;
use tally_domain::transfer::REFERENCE_MAX_CHARS;
use tally_domain::{AccountId, Reference};

/// Move money from one account to another. Answers at once with the transfer as
/// requested (`pending`); `GET /transfers/{id}` follows it to `completed`, `failed` or
/// `reversed`. A retry with the same `Idempotency-Key` answers with the same transfer
/// and never moves the money twice.
#[utoipa::path(
    post, path = "/transfers", tag = "commands", operation_id = "requestTransfer",
    request_body = TransferRequestBody,
    params(
        ("Idempotency-Key" = String, Header, description = "Required: names the transfer. A retry with the same key answers with the same transfer (as it is now) and moves nothing again; the same key with another request is a 422."),
    ),
    responses(
        (status = 202, description = "Requested (or, on a retry, the transfer as it is now)", body = TransferResponse,
            headers(("Location" = String, description = "/transfers/{id}"))),
        (status = 400, description = "Malformed JSON, `idempotency-key-required`, or an invalid header", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid account id or amount, `same-account`, `invalid-reference` (longer than 140 characters), missing fields, Idempotency-Key reused", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`account-not-found`: the caller does not reach `from` (another subject's, or, with a reference, no such account)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "With a reference: `holder-forgotten` (the holder of `from` was forgotten: no more free text) or `no-holder-key` (`from` was opened before keys were made)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable` (nothing was written) or `outcome-unknown` (retry with the same `Idempotency-Key`)", body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn handle(
    State(state): State<AppState>,
    who: Who,
    headers: CommandHeaders,
    JsonBody(body): JsonBody<TransferRequestBody>,
) -> Result<Response, ApiError> {
    let key = headers
        .idempotency_key
        .ok_or(ApiError::IdempotencyKeyRequired)?;
    if headers.expected.is_some() {
        return Err(ApiError::InvalidHeader(
            "If-Match does not apply to a transfer".into(),
        ));
    }
    let account = |name: &str, text: &str| {
        AccountId::parse(text).map_err(|e| ApiError::InvalidRequest(format!("{name}: {e}")))
    };
    let from = account("from", &body.from)?;
    // Only the debited account's owner (or an operator) moves its money; anyone else
    // is told it does not exist.
    if !who.reaches(&state, &from).await? {
        return Err(ApiError::AccountNotFound);
    }
    who.require(Scope::TransfersWrite)?;
    // Free text is sealed under the key of the debited account's holder, so that
    // forgetting them erases it too.
    let reference = match body.reference.as_str() {
        "" => None,
        text => {
            let length = text.chars().count();
            if length > REFERENCE_MAX_CHARS {
                return Err(ApiError::InvalidReference(format!(
                    "the reference is {length} characters long; at most {REFERENCE_MAX_CHARS} are allowed"
                )));
            }
            let vault = super::vault(&state)?;
            // No such account: the transfer would fail; say so now (404).
            state
                .queries
                .account(&from, None, &tally_domain::Caller::Service)
                .await?;
            let holder = state
                .queries
                .holder(&from, &tally_domain::Caller::Service)
                .await?
                .ok_or(ApiError::NoHolderKey)?;
            let key = vault
                .key(&holder.key)
                .await?
                .ok_or(ApiError::HolderForgotten)?;
            Some(Reference::Sealed(vault.seal(
                &key,
                super::REFERENCE,
                text.as_bytes(),
            )))
        }
    };
    let request = TransferRequest {
        from,
        to: account("to", &body.to)?,
        amount: super::amount(&state, &body.amount())?,
        reference,
    };
    // In a task of its own, as a command is: a client that hangs up does not cut the
    // request off between its append and its publish.
    let work = {
        let state = state.clone();
        let request_id = headers.request_id;
        async move {
            // Transfer ids are derived from the key within the subject's namespace.
            let namespace = who.subject.as_ref().map_or("", |s| s.as_str());
            state
                .saga
                .request(namespace, key.as_str(), request, request_id)
                .await
        }
    };
    let (view, replayed) = tokio::spawn(work)
        .await
        .map_err(|e| ApiError::Internal(format!("the request's task failed: {e}")))??;
    let reference = super::reference_text(&state, &view).await?;
    let mut response = (
        StatusCode::ACCEPTED,
        Json(TransferResponse::new(&view, reference)),
    )
        .into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&format!("/transfers/{}", view.id)) {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}
