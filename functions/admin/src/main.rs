//! `admin`: operator commands. `admin rebuild` replays the event store into a new
//! generation of the read model and switches readers to it; with `--projector` it also
//! scales that Deployment to zero meanwhile and back afterwards; `admin compact` copies
//! every account stream into segments (see `admin --help`).

use clap::Parser;

#[tokio::main]
async fn main() -> Result<(), tally_runtime::BoxError> {
    tally_runtime::init_tracing();
    admin::run(admin::Cli::parse()).await
}
