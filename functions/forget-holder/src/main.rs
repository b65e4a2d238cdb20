//! `forget-holder`: POST /accounts/{id}/forget.
//!
//! Glue only: the route lives in `tally-api`, the decision in `tally-domain`, the wiring
//! in `tally-host`. Runs under the Lambda runtime or as an HTTP server (see `tally-runtime`).

#[tokio::main]
async fn main() -> Result<(), tally_runtime::BoxError> {
    tally_host::run_function("forget-holder").await
}
