//! `relay`: publishes the commits the outbox still holds — those a crash between the
//! append and the publish, or a broker outage, kept from the stream. Sweeps every
//! 500 ms (`POST /relay/sweep` sweeps now); under Lambda, one sweep per invocation.
//!
//! With `TALLY_LEASE_NAME` set (the Helm chart sets it), several replicas run and only
//! the holder of that Kubernetes Lease sweeps; the others stand by. On SIGTERM the
//! leader gives the lease up, so a follower takes over at once.

#[tokio::main]
async fn main() -> Result<(), tally_runtime::BoxError> {
    tally_runtime::init_tracing();
    let leadership = tally_kube::leadership_from_env().await?;
    let result =
        tally_host::run_function_with("relay", leadership.as_ref().map(|l| l.watch())).await;
    if let Some(leadership) = leadership {
        leadership.release().await;
    }
    result
}
