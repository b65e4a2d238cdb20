//! RFC 9457 problem details with stable `type` URIs.

use axum::http::{StatusCode, Uri};

/// A problem+json response body.
pub type Problem = problem_details::ProblemDetails;

/// A problem of type `/problems/{kind}`: `kind` is stable and documented in the OpenAPI
/// document; `detail` explains this occurrence.
pub fn problem(
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: impl Into<String>,
) -> Problem {
    let uri: Uri = format!("/problems/{kind}")
        .parse()
        .expect("problem kinds are URI-safe");
    problem_details::ProblemDetails::from_status_code(status)
        .with_type(uri)
        .with_title(title)
        .with_detail(detail)
}
