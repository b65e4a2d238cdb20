//! Requests become domain types here, or a problem+json answer.

use crate::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::{header, request::Parts, HeaderMap};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tally_domain::{AccountId, IdempotencyKey, Revision};

/// The largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The `{id}` path segment, parsed.
pub struct AccountPath(pub AccountId);

impl<S: Send + Sync> FromRequestParts<S> for AccountPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidAccountId(e.body_text()))?;
        AccountId::parse(&raw)
            .map(AccountPath)
            .map_err(|e| ApiError::InvalidAccountId(e.to_string()))
    }
}

/// A JSON body: `Content-Type: application/json`, at most [`MAX_BODY_BYTES`], well-formed
/// (400 otherwise), and of the expected shape (422 otherwise).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let declared_too_large = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n > MAX_BODY_BYTES);
        if declared_too_large {
            return Err(ApiError::PayloadTooLarge);
        }
        // A body that does not arrive in time is a client holding a connection: 408.
        let read = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES);
        let bytes: Bytes = tokio::time::timeout(tally_runtime::server::BODY_TIMEOUT, read)
            .await
            .map_err(|_| ApiError::RequestTimeout)?
            .map_err(|_| ApiError::PayloadTooLarge)?;
        // Syntax first (400), then shape (422): a request body is always an object
        // (serde would otherwise accept `[1]` for a one-field struct).
        let raw: &RawValue =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        if !raw.get().starts_with('{') {
            return Err(ApiError::InvalidRequest(
                "the body must be a JSON object".into(),
            ));
        }
        serde_json::from_str(raw.get())
            .map(JsonBody)
            .map_err(|e| ApiError::InvalidRequest(e.to_string()))
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The headers every command may carry: `Idempotency-Key` and `If-Match`.
pub struct CommandHeaders {
    pub idempotency_key: Option<IdempotencyKey>,
    pub expected: Option<Revision>,
    pub request_id: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for CommandHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let headers = &parts.headers;
        let idempotency_key = single(headers, "idempotency-key")?
            .map(|v| IdempotencyKey::parse(v).map_err(|e| ApiError::InvalidHeader(e.to_string())))
            .transpose()?;
        let expected = single(headers, "if-match")?
            .map(parse_if_match)
            .transpose()?;
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Self {
            idempotency_key,
            expected,
            request_id,
        })
    }
}

fn single<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidHeader(format!(
            "{name} may be sent only once"
        )));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| ApiError::InvalidHeader(format!("{name} must be visible ASCII")))
}

/// `If-Match: "3"` (the ETag a response carried) or `If-Match: 3`.
fn parse_if_match(value: &str) -> Result<Revision, ApiError> {
    let v = value.trim();
    let inner = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v);
    Revision::parse(inner).map_err(|_| {
        ApiError::InvalidHeader(format!(
            "If-Match must be the revision ETag a response returned, like \"3\"; got {value:?}"
        ))
    })
}

/// Query parameters, parsed with a 400 on anything unexpected.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| QueryParams(q.0))
            .map_err(|e| ApiError::InvalidQuery(e.body_text()))
    }
}

/// Parse an optional revision from a query parameter.
pub fn revision_param(name: &str, value: Option<&str>) -> Result<Option<Revision>, ApiError> {
    value
        .map(|v| {
            Revision::parse(v).map_err(|_| {
                ApiError::InvalidQuery(format!("{name} must be a whole number, got {v:?}"))
            })
        })
        .transpose()
}
