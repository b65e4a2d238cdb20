//! `transfer`: POST /transfers — records a transfer request.
//!
//! Glue only: the work lives in `tally-api` and `tally-app`, the wiring in
//! `tally-host`. Runs under the Lambda runtime or as an HTTP server (see `tally-runtime`).

#[tokio::main]
async fn main() -> Result<(), tally_runtime::BoxError> {
    tally_host::run_function("transfer").await
}
