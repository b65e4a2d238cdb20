//! The `admin` tool's commands, as a library so the tests drive them in-process
//! against an in-memory Kubernetes API server.

use clap::{Parser, Subcommand};
use std::time::{Duration, Instant};
use tally_app::{CompactionReport, RebuildReport};
use tally_host::{Config, Host, Role};
use tally_runtime::BoxError;

/// Tally's operator tool. Backends come from the same `TALLY_*` environment as the
/// functions.
#[derive(Debug, Parser)]
#[command(name = "admin", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay every commit from the event store into a new generation of the read model,
    /// beside the live one (which the running projector keeps current and queries keep
    /// reading), then switch readers to it at once and drop the old one.
    ///
    /// With --projector, the projector Deployment is also scaled to zero first (its
    /// replica count is remembered in an annotation) and scaled back afterwards, also
    /// when the replay fails: not needed for correctness, only to give the replay the
    /// database to itself. Run it again to resume a rebuild that was cut short.
    Rebuild {
        /// A projector Deployment to stop while replaying (optional; omit outside a cluster).
        #[arg(long)]
        projector: Option<String>,
        /// Its namespace (default: the client's, i.e. the pod's own in a cluster).
        #[arg(long)]
        namespace: Option<String>,
        /// The KEDA ScaledObject that autoscales the projector, paused meanwhile.
        #[arg(long)]
        scaled_object: Option<String>,
        /// How long to wait for the projector's pods to stop or come back.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
    /// Copy every account stream's commits that no segment holds yet into segments
    /// (S3 and the directory store). The projector does this as streams grow; this is
    /// for streams written before it did, or where no projector runs in the background
    /// (under the Lambda runtime: run it on a schedule). Safe beside a running
    /// projector, and to run again.
    Compact,
}

/// Run one command with the backends from the environment.
pub async fn run(cli: Cli) -> Result<(), BoxError> {
    let host = Host::build(&Config::from_env()?, Role::Tool).await?;
    let client = match &cli.command {
        Command::Rebuild {
            projector: Some(_), ..
        } => Some(tally_kube::client().await?),
        Command::Rebuild { .. } => None,
        Command::Compact => {
            let (report, elapsed) = compact(&host).await?;
            println!("{}", compact_summary(&report, elapsed));
            return Ok(());
        }
    };
    let report = execute(cli.command, &host, client).await?;
    println!("{}", summary(&report.0, report.1));
    Ok(())
}

/// `admin compact`: every account stream of `host`'s store into segments. Fails if the
/// store keeps none, or if any stream could not be compacted (after trying them all).
pub async fn compact(host: &Host) -> Result<(CompactionReport, Duration), BoxError> {
    let Some(store) = &host.compact else {
        return Err(format!(
            "the {} event store keeps no segments (the directory and S3 stores do)",
            host.kinds.store
        )
        .into());
    };
    let start = Instant::now();
    let report = tally_app::compact_every_stream(&*host.store, &**store).await?;
    if report.failed > 0 {
        return Err(format!(
            "compact: {} streams could not be compacted (see the log)",
            report.failed
        )
        .into());
    }
    Ok((report, start.elapsed()))
}

/// The one-line JSON summary `admin compact` prints.
pub fn compact_summary(report: &CompactionReport, elapsed: Duration) -> serde_json::Value {
    serde_json::json!({
        "streams": report.streams,
        "commits": report.commits,
        "segments": report.segments,
        "seconds": elapsed.as_secs_f64(),
    })
}

/// Run `command` on `host`'s backends, with `client` for the cluster (when the command
/// names a Deployment). Returns the rebuild's totals and how long the replay took.
pub async fn execute(
    command: Command,
    host: &Host,
    client: Option<tally_kube::kube::Client>,
) -> Result<(RebuildReport, Duration), BoxError> {
    let Command::Rebuild {
        projector,
        namespace,
        scaled_object,
        timeout_secs,
    } = command
    else {
        return Err("execute runs `rebuild`; `compact` is `admin::compact`".into());
    };
    let replay = replay(host);
    match (projector, client) {
        (None, _) => Ok(replay.await?),
        (Some(deployment), Some(client)) => {
            let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
            let mut scale =
                tally_kube::ProjectorScale::new(client, &namespace, &deployment, scaled_object);
            scale.timeout = Duration::from_secs(timeout_secs);
            Ok(tally_kube::with_projector_stopped(&scale, replay).await?)
        }
        (Some(_), None) => Err("--projector needs a Kubernetes client".into()),
    }
}

async fn replay(host: &Host) -> Result<(RebuildReport, Duration), BoxError> {
    let start = Instant::now();
    let mut last_log = Instant::now();
    let report = host
        .state
        .projector
        .rebuild_reporting(|so_far| {
            if last_log.elapsed() >= Duration::from_secs(1) {
                last_log = Instant::now();
                tracing::info!(
                    streams = so_far.streams,
                    commits = so_far.commits,
                    events = so_far.events,
                    events_per_second = rate(so_far.events, start.elapsed()),
                    "rebuild progress"
                );
            }
        })
        .await?;
    if report.failed > 0 {
        return Err(format!(
            "rebuild: {} streams could not be replayed (see the log)",
            report.failed
        )
        .into());
    }
    Ok((report, start.elapsed()))
}

fn rate(events: usize, elapsed: Duration) -> u64 {
    (events as f64 / elapsed.as_secs_f64().max(1e-6)) as u64
}

/// The one-line JSON summary `admin rebuild` prints.
pub fn summary(report: &RebuildReport, elapsed: Duration) -> serde_json::Value {
    serde_json::json!({
        "streams": report.streams,
        "commits": report.commits,
        "events": report.events,
        "packed_streams": report.packed,
        "after_pack_streams": report.after_pack,
        "seconds": elapsed.as_secs_f64(),
        "events_per_second": rate(report.events, elapsed),
    })
}
