//! `tally-bench --target dev=http://127.0.0.1:8080 [--quick]`: run the workload against
//! each target, print a Markdown summary, and write JSON + Markdown under `--out`.

use clap::Parser;
use std::path::PathBuf;
use tally_bench::{markdown, run, Plan};

#[derive(Debug, Parser)]
#[command(name = "tally-bench", version, about)]
struct Cli {
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
    /// Concurrency levels, comma separated.
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    #[arg(long)]
    seed: Option<u64>,
    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let mut plan = if cli.quick {
        Plan::quick()
    } else {
        Plan::standard()
    };
    plan.accounts = cli.accounts.unwrap_or(plan.accounts);
    plan.ops = cli.ops.unwrap_or(plan.ops);
    plan.concurrency = cli.concurrency.unwrap_or(plan.concurrency);
    plan.seed = cli.seed.unwrap_or(plan.seed);
    std::fs::create_dir_all(&cli.out)?;
    let mut errors = 0;
    for target in &cli.targets {
        let (name, url) = target
            .split_once('=')
            .ok_or_else(|| format!("--target {target}: expected NAME=URL"))?;
        let report = run(name, url, &plan, |line| eprintln!("{line}")).await;
        // 2026-11-26T14:15:45.206Z → 2026-11-26T14-15-45Z (no ':' or '.' in file names).
        let stamp = report.started_at.replace(':', "-");
        let stamp = match stamp.split_once('.') {
            Some((seconds, _)) => format!("{seconds}Z"),
            None => stamp,
        };
        let base = cli.out.join(format!("{stamp}-{name}"));
        let file = |ext: &str| PathBuf::from(format!("{}.{ext}", base.display()));
        std::fs::write(file("json"), serde_json::to_vec_pretty(&report)?)?;
        let md = markdown(&report);
        std::fs::write(file("md"), &md)?;
        println!("{md}");
        eprintln!("{name}: results in {}.{{json,md}}", base.display());
        errors += report.errors();
    }
    if errors > 0 {
        return Err(format!("{errors} requests failed (see the errors column)").into());
    }
    Ok(())
}
