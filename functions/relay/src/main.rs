//! `relay`: publishes the commits the outbox still holds — those a crash between the
//! append and the publish, or a broker outage, kept from the stream. Sweeps every
//! 500 ms (`POST /relay/sweep` sweeps now); under Lambda, one sweep per invocation.

#[tokio::main]
async fn main() -> Result<(), tally_runtime::BoxError> {
    tally_host::run_function("relay").await
}
