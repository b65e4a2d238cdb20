//! `migrate`: the init step, run once per deploy — creates the S3 bucket (and proves it
//! enforces conditional writes), creates the Kafka topic, applies the PostgreSQL
//! migrations. Idempotent; exits when done.

#[tokio::main]
async fn main() -> Result<(), tally_runtime::BoxError> {
    tally_host::run_function("migrate").await
}
