//! The gateway as a reverse proxy: each public route goes to the process of the
//! function that serves it (the Kubernetes topology without a cluster: `make stack`).

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use std::collections::HashMap;
use tally_runtime::BoxError;

#[derive(Clone)]
struct Upstream {
    base: String,
    client: reqwest::Client,
}

/// A router sending every route of the table to `upstreams` (`function=url,...`).
pub fn router(upstreams: &str) -> Result<Router, BoxError> {
    let mut map = HashMap::new();
    for pair in upstreams.split(',').filter(|p| !p.trim().is_empty()) {
        let (function, url) = pair
            .split_once('=')
            .ok_or_else(|| format!("TALLY_UPSTREAMS: {pair:?} is not function=url"))?;
        map.insert(
            function.trim().to_owned(),
            url.trim().trim_end_matches('/').to_owned(),
        );
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let mut router = Router::new();
    for route in tally_api::ROUTES {
        let base = map
            .get(route.function)
            .ok_or_else(|| format!("TALLY_UPSTREAMS has no url for {}", route.function))?
            .clone();
        let filter = match route.method {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            other => return Err(format!("unsupported method {other}").into()),
        };
        let upstream = Upstream {
            base,
            client: client.clone(),
        };
        router = router.route(route.path, on(filter, forward).with_state(upstream));
    }
    Ok(router)
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

async fn forward(
    State(upstream): State<Upstream>,
    params: Result<Path<HashMap<String, String>>, PathRejection>,
    request: Request,
) -> Response {
    let params = match params {
        Ok(Path(params)) => params,
        Err(e) => return tally_api::ApiError::InvalidAccountId(e.body_text()).into_response(),
    };
    // Ids are parsed at the edge too: an id like `..` must be refused here, since a URL
    // library would resolve it (`/accounts/../deposit` → `/deposit`) on the way on.
    if let Some(id) = params.get("id") {
        if let Err(e) = tally_domain::AccountId::parse(id) {
            return tally_api::ApiError::InvalidAccountId(e.to_string()).into_response();
        }
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let Ok(body) = axum::body::to_bytes(body, tally_api::MAX_BODY_BYTES + 1).await else {
        return tally_runtime::problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            "the body is too large",
        )
        .into_response();
    };
    let mut outgoing = upstream
        .client
        .request(
            parts.method.clone(),
            format!("{}{path}{query}", upstream.base),
        )
        .body(body);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            outgoing = outgoing.header(name, value);
        }
    }
    // A command whose upstream stopped answering after it was sent may have taken
    // effect: the client is told so (and to retry with its Idempotency-Key), not that
    // nothing happened. A query may simply be retried.
    let command = parts.method != axum::http::Method::GET;
    let lost = |what: &str, e: &reqwest::Error| {
        let detail = format!("{what}: {}", tally_es::error_chain(e));
        if command {
            tally_api::ApiError::OutcomeUnknown(detail).into_response()
        } else {
            tally_api::ApiError::Unavailable(detail).into_response()
        }
    };
    match outgoing.send().await {
        Ok(response) => {
            let mut builder = Response::builder().status(response.status());
            for (name, value) in response.headers() {
                if !HOP_BY_HOP.contains(&name.as_str()) {
                    builder = builder.header(HeaderName::from(name), value);
                }
            }
            match response.bytes().await {
                Ok(bytes) => builder
                    .body(Body::from(bytes))
                    .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()),
                Err(e) => lost("the function's answer was cut off", &e),
            }
        }
        // Nothing was sent: nothing can have happened.
        Err(e) if e.is_connect() => tally_api::ApiError::Unavailable(format!(
            "the function behind this route is unreachable: {}",
            tally_es::error_chain(&e)
        ))
        .into_response(),
        Err(e) => lost("the function behind this route stopped answering", &e),
    }
}
