//! The SDK's HTTP client: `reqwest`, the client the gateway's proxy already links, in
//! place of the SDK's own hyper stack (a second HTTP/1 and HTTP/2 client and TLS
//! connector in every binary).
//!
//! The SDK hands over a signed request and takes back the whole answer; retries,
//! attempt and operation timeouts stay with the SDK. The connect timeout is reqwest's.
//! Bodies are small and whole (commits, snapshots, listings), so a request body is sent
//! from memory and an answer is read completely before it is handed back.

use aws_sdk_s3::config::http::{HttpRequest, HttpResponse};
use aws_sdk_s3::config::SharedHttpClient;
use aws_smithy_runtime_api::client::http::{
    http_client_fn, HttpConnector, HttpConnectorFuture, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_types::body::SdkBody;
use http_body_util::BodyExt;
use std::time::Duration;
use tally_es::error_chain;

/// An HTTP client for the SDK that sends every request through one pooled `reqwest`
/// client (HTTP/1.1 keep-alive; HTTPS through rustls on ring with the system's roots).
pub(crate) fn client(connect_timeout: Duration) -> Result<SharedHttpClient, String> {
    let http = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("S3 HTTP client: {}", error_chain(&e)))?;
    let connector = SharedHttpConnector::new(Reqwest(http));
    Ok(http_client_fn(move |_, _| connector.clone()))
}

#[derive(Clone, Debug)]
struct Reqwest(reqwest::Client);

impl HttpConnector for Reqwest {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let http = self.0.clone();
        HttpConnectorFuture::new(async move {
            let request = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(e.into()))?;
            let (parts, body) = request.into_parts();
            let body = match body.bytes() {
                Some(bytes) => bytes::Bytes::copy_from_slice(bytes),
                // A streamed body (none of Tally's calls makes one): gathered first.
                None => body
                    .collect()
                    .await
                    .map_err(ConnectorError::user)?
                    .to_bytes(),
            };
            let request = http::Request::from_parts(parts, body);
            let request =
                reqwest::Request::try_from(request).map_err(|e| ConnectorError::user(e.into()))?;
            let response = http.execute(request).await.map_err(transport)?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(transport)?;
            let mut answer = http::Response::new(SdkBody::from(body));
            *answer.status_mut() = status;
            *answer.headers_mut() = headers;
            HttpResponse::try_from(answer).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// A request that got no (whole) answer: a timeout or an I/O failure, both of which the
/// SDK retries.
fn transport(e: reqwest::Error) -> ConnectorError {
    if e.is_timeout() {
        ConnectorError::timeout(e.into())
    } else {
        ConnectorError::io(e.into())
    }
}
