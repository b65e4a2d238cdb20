//! `admin`: operator commands. `admin rebuild` replays the event store into an emptied
//! read model; with `--projector` it first scales that Deployment to zero and scales it
//! back afterwards (see `admin --help`).

use clap::Parser;

#[tokio::main]
async fn main() -> Result<(), tally_runtime::BoxError> {
    tally_runtime::init_tracing();
    admin::run(admin::Cli::parse()).await
}
