//! `tally-bench`: the measurements behind `make bench`.
//!
//! * `tally-bench load --target dev=http://127.0.0.1:8080 [--quick] [--ceiling]` — the
//!   seeded HTTP workload against each target; with `--ceiling`, the bare backends
//!   first (from `TALLY_S3_*`, `TALLY_KAFKA_BROKERS`, `TALLY_DATABASE_URL`); with
//!   `--s3-log FILE --s3-bucket B`, each level's S3 requests by kind.
//! * `tally-bench serverless --bin-dir target/perf` — cold start, binary size and
//!   resident memory per function.
//! * `tally-bench picture --load dev=FILE --rebuild dev=FILE --name STAMP-bench` — the
//!   run's charts (SVG) from the JSON files it wrote.
//!
//! Each prints a Markdown summary and writes JSON + Markdown under `--out`.

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tally_bench::{ceiling, markdown, run, serverless, Plan};

#[derive(Debug, Parser)]
#[command(name = "tally-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Where the results go.
    #[arg(long, global = true, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The seeded HTTP workload against running Tallies.
    Load(Load),
    /// Cold start, binary size and resident memory of every function binary.
    Serverless {
        /// The directory holding the function binaries.
        #[arg(long)]
        bin_dir: PathBuf,
        /// The cargo profile they were built with (for the report).
        #[arg(long, default_value = "perf")]
        profile: String,
        /// Cold starts per function (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Requests before reading the resident memory.
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// Run the relay (which needs S3 and Kafka) on the backends named by the
        /// environment (`TALLY_S3_*`, `AWS_*`, `TALLY_KAFKA_*`); without this flag it is
        /// reported by size only.
        #[arg(long)]
        with_backends: bool,
    },
    /// The charts of a run (SVG), from the JSON files it wrote.
    Picture {
        /// TOPOLOGY=FILE of a load report (repeatable, in the order to draw).
        #[arg(long = "load")]
        loads: Vec<String>,
        /// TOPOLOGY=FILE of a rebuild summary (repeatable).
        #[arg(long = "rebuild")]
        rebuilds: Vec<String>,
        /// The file name, without `.svg`, under `--out`.
        #[arg(long)]
        name: String,
    },
}

/// `NAME=FILE` pairs, each file read as JSON.
fn named_json(
    pairs: &[String],
) -> Result<Vec<(String, serde_json::Value)>, Box<dyn std::error::Error>> {
    pairs
        .iter()
        .map(|pair| {
            let (name, file) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair}: expected NAME=FILE"))?;
            let bytes = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            let value = serde_json::from_slice(&bytes).map_err(|e| format!("{file}: {e}"))?;
            Ok((name.to_owned(), value))
        })
        .collect()
}

#[derive(Debug, Args)]
struct Load {
    /// NAME=URL of a running Tally (repeatable), e.g. dev=http://127.0.0.1:8080.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Only check the harness works: a handful of accounts and operations.
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    accounts: Option<usize>,
    /// Operations per concurrency level.
    #[arg(long)]
    ops: Option<usize>,
    /// Transfers per concurrency level (0: none).
    #[arg(long)]
    transfers: Option<usize>,
    /// Concurrency levels, comma separated.
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    #[arg(long)]
    seed: Option<u64>,
    /// Also measure the bare backends (S3, broker, PostgreSQL from the environment) at
    /// the same concurrency levels, and report commands/s as a fraction of the slowest.
    #[arg(long)]
    ceiling: bool,
    /// Calls per backend per level for `--ceiling`.
    #[arg(long, default_value_t = 1000)]
    ceiling_ops: usize,
    /// The S3 server's access log (moto's, in UTC: `$TALLY_CACHE/run/moto.log`): count
    /// each level's S3 requests to `--s3-bucket`, by kind.
    #[arg(long, requires = "s3_bucket")]
    s3_log: Option<PathBuf>,
    /// The bucket the target stores its events in (with `--s3-log`).
    #[arg(long)]
    s3_bucket: Option<String>,
}

/// 2026-11-26T14:15:45.206Z → 2026-11-26T14-15-45Z (no ':' or '.' in file names).
fn stamp(started_at: &str) -> String {
    let stamp = started_at.replace(':', "-");
    match stamp.split_once('.') {
        Some((seconds, _)) => format!("{seconds}Z"),
        None => stamp,
    }
}

fn write(
    out: &Path,
    started_at: &str,
    name: &str,
    json: &impl Serialize,
    md: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(out)?;
    let base = out.join(format!("{}-{name}", stamp(started_at)));
    let file = |ext: &str| PathBuf::from(format!("{}.{ext}", base.display()));
    std::fs::write(file("json"), serde_json::to_vec_pretty(json)?)?;
    std::fs::write(file("md"), md)?;
    println!("{md}");
    eprintln!("{name}: results in {}.{{json,md}}", base.display());
    Ok(())
}

async fn load(cli: Load, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut plan = if cli.quick {
        Plan::quick()
    } else {
        Plan::standard()
    };
    plan.accounts = cli.accounts.unwrap_or(plan.accounts);
    plan.ops = cli.ops.unwrap_or(plan.ops);
    plan.transfers = cli.transfers.unwrap_or(plan.transfers);
    plan.concurrency = cli.concurrency.unwrap_or(plan.concurrency);
    plan.seed = cli.seed.unwrap_or(plan.seed);
    let ceiling = if cli.ceiling {
        let backends = ceiling::Backends::from_env()
            .map_err(|e| format!("--ceiling needs the backends' variables: {e}"))?;
        Some(
            ceiling::measure(&backends, &plan.concurrency, cli.ceiling_ops, |line| {
                eprintln!("{line}")
            })
            .await?,
        )
    } else {
        None
    };
    let mut errors = 0;
    for target in &cli.targets {
        let (name, url) = target
            .split_once('=')
            .ok_or_else(|| format!("--target {target}: expected NAME=URL"))?;
        let mut report = run(name, url, &plan, |line| eprintln!("{line}")).await;
        report.ceiling = ceiling.clone();
        if let (Some(log), Some(bucket)) = (&cli.s3_log, &cli.s3_bucket) {
            report
                .count_s3_requests(log, bucket)
                .map_err(|e| format!("--s3-log {}: {e}", log.display()))?;
        }
        write(out, &report.started_at, name, &report, &markdown(&report))?;
        errors += report.errors();
    }
    if errors > 0 {
        return Err(format!("{errors} requests failed (see the errors column)").into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Load(args) => load(args, &cli.out).await,
        Cmd::Picture {
            loads,
            rebuilds,
            name,
        } => {
            let run = tally_bench::picture::Run {
                loads: named_json(&loads)?,
                rebuilds: named_json(&rebuilds)?,
            };
            std::fs::create_dir_all(&cli.out)?;
            let file = cli.out.join(format!("{name}.svg"));
            std::fs::write(&file, tally_bench::picture::svg(&run)?)?;
            eprintln!("picture: {}", file.display());
            Ok(())
        }
        Cmd::Serverless {
            bin_dir,
            profile,
            runs,
            requests,
            with_backends,
        } => {
            let backends: Option<Vec<(String, String)>> = with_backends.then(|| {
                serverless::BACKEND_VARS
                    .iter()
                    .filter_map(|v| std::env::var(v).ok().map(|value| (v.to_string(), value)))
                    .collect()
            });
            let report = serverless::measure(
                &bin_dir,
                &profile,
                runs,
                requests,
                backends.as_deref(),
                |line| eprintln!("{line}"),
            )
            .await?;
            let failed: usize = report.functions.iter().map(|f| f.failed_requests).sum();
            write(
                &cli.out,
                &report.started_at,
                "serverless",
                &report,
                &serverless::markdown(&report),
            )?;
            if failed > 0 {
                return Err(format!("{failed} requests got no answer or a 5xx").into());
            }
            Ok(())
        }
    }
}
