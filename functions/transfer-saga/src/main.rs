//! `transfer-saga`: drives transfers. Follows the commit stream (consumer group
//! `TALLY_SAGA_GROUP`, default `tally-transfer-saga`) and runs each transfer's account
//! steps; at start, and every few seconds, drives on any transfer pending past
//! `TALLY_TRANSFER_DEADLINE_SECONDS` (default 10). Serves `/healthz` and `/readyz`.
//!
//! Glue only: the saga lives in `tally-app` (`transfers`), the wiring in `tally-host`.
//!
//! Under the Lambda runtime (`AWS_LAMBDA_RUNTIME_API`), each invocation is a Kafka
//! batch from the commit topic (every transfer it names is driven on; a failure fails
//! the batch, which Lambda delivers again), or any other event — a schedule — which is
//! one sweep of the transfers pending past the deadline.

#[tokio::main]
async fn main() -> Result<(), tally_runtime::BoxError> {
    tally_host::run_function("transfer-saga").await
}
