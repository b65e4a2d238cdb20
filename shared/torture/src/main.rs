//! `tally-torture`: `make torture`. Runs a topology under seeded load and faults, checks
//! the history, writes `<out>/<time>-torture-<topology>.{json,md}` and exits non-zero on
//! any violation.

use clap::Parser;
use std::path::PathBuf;
use tally_torture::{dev, stack, Binaries, Plan};

#[derive(Parser)]
#[command(about = "Tally's fault harness: seeded load and faults, then a checker")]
struct Cli {
    /// The topology under test (default: `TORTURE_TOPOLOGY`, else dev).
    #[arg(long)]
    topology: Option<String>,
    /// Seed of the operations and of the fault schedule (default: `TORTURE_SEED`, else
    /// from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of load and faults (default: `TORTURE_SECONDS`, else 300).
    #[arg(long)]
    seconds: Option<u64>,
    /// TALLY_FAULT_INJECTION for the processes under test (a deliberately broken build).
    #[arg(long, default_value = "")]
    inject: String,
    /// Fault kinds to leave out, comma-separated (default: `TORTURE_LEAVE_OUT`, else
    /// none), e.g. `broker-killed`.
    #[arg(long)]
    leave_out: Option<String>,
    /// Where the reports go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Where the workspace's binaries are (default: beside this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let number = |name: &str| -> Result<Option<u64>, String> {
        env(name)
            .map(|v| v.parse().map_err(|e| format!("{name}={v:?}: {e}")))
            .transpose()
    };
    let topology = cli
        .topology
        .or_else(|| env("TORTURE_TOPOLOGY"))
        .unwrap_or_else(|| "dev".into());
    let seed = cli.seed.or(number("TORTURE_SEED")?).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let mut plan = Plan::standard(seed);
    plan.seconds = cli.seconds.or(number("TORTURE_SECONDS")?).unwrap_or(300);
    plan.inject = cli.inject;
    plan.leave_out = cli
        .leave_out
        .or_else(|| env("TORTURE_LEAVE_OUT"))
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    let binaries = match cli.bin_dir {
        Some(dir) => Binaries { dir },
        None => Binaries::beside_current_exe()?,
    };
    eprintln!(
        "torture: topology {}, seed {seed}, {} s (replay: TORTURE_SEED={seed})",
        topology, plan.seconds
    );
    let work = tempfile_dir()?;
    let report = match topology.as_str() {
        "dev" => dev::run(&plan, &binaries, &work, |line| eprintln!("{line}")).await?,
        "stack" => stack::run(&plan, &binaries, &work, |line| eprintln!("{line}")).await?,
        "stack-pg" => {
            let kind = stack::StoreKind::Postgres;
            stack::run_on(kind, &plan, &binaries, &work, |line| eprintln!("{line}")).await?
        }
        other => {
            return Err(format!("unknown topology {other:?} (known: dev, stack, stack-pg)").into())
        }
    };
    std::fs::create_dir_all(&cli.out)?;
    let stamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)?
        .replace(':', "-");
    let stamp = stamp.split('.').next().unwrap_or(&stamp).to_owned();
    let base = cli.out.join(format!("{stamp}-torture-{}", report.topology));
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(
        base.with_extension("svg"),
        tally_torture::picture::svg(&report)?,
    )?;
    let picture = base
        .with_extension("svg")
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let markdown = format!(
        "{}\n![Operations per second by outcome, latency, and every fault over the run]({picture})\n",
        report.markdown()
    );
    std::fs::write(base.with_extension("md"), &markdown)?;
    println!("{markdown}");
    eprintln!("torture: report in {}.{{json,md,svg}}", base.display());
    if report.total_violations() > 0 {
        eprintln!(
            "torture: {} violations; replay with {}",
            report.total_violations(),
            report.replay
        );
        std::process::exit(1);
    }
    if std::env::var_os("TORTURE_KEEP_LOGS").is_some() {
        eprintln!("torture: the run's data and logs are in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// A fresh working directory for the run's data and logs (kept when a run fails, or
/// with `TORTURE_KEEP_LOGS` set).
fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "tally-torture-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
