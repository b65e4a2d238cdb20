//! `scripts/bench-targets.py` (the table of issue 16's targets `make bench` writes at the
//! end of a run) reads what this crate writes and judges each figure against its
//! target: met, not met, and not measured when a run left a part out.

use std::path::Path;
use std::process::Command;

use serde_json::json;

/// A load report as `tally-bench load` writes it, cut to what the table reads: one
/// level per concurrency with `commands` deposits and withdrawals (one of them failed)
/// in one second, its S3 requests per command, and the ceiling's conditional PUTs/s.
fn report(levels: &[(u64, u64, f64)]) -> serde_json::Value {
    let ceiling: Vec<_> = levels
        .iter()
        .map(|&(concurrency, _, _)| {
            json!({"concurrency": concurrency, "s3_conditional_put": {"per_second": 100.0}})
        })
        .collect();
    let levels: Vec<_> = levels
        .iter()
        .map(|&(concurrency, commands, per_command)| {
            json!({
                "concurrency": concurrency,
                "seconds": 1.0,
                "commands_per_second": commands,
                "successful_commands_per_second": commands - 1,
                "ops": {
                    "deposit": {"count": commands - commands / 2, "errors": {"503": 1}},
                    "withdraw": {"count": commands / 2, "errors": {}},
                    "balance": {"count": 1000, "errors": {}},
                },
                "s3_requests": {"by_kind": {"PUT streams": commands}, "per_command": per_command},
            })
        })
        .collect();
    json!({"commit": "abc1234", "levels": levels, "ceiling": {"levels": ceiling}})
}

fn write(dir: &Path, name: &str, value: &serde_json::Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

fn targets(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench-targets.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs the script");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The table's row whose first cell starts with `start`.
fn row<'a>(table: &'a str, start: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {start}")))
        .unwrap_or_else(|| panic!("no row {start:?} in\n{table}"))
}

#[test]
fn each_target_is_judged_against_the_figure_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // c=16: 85 of the ceiling's 100 (met); c=64: 60 (not met), 1.30 S3 requests each.
    let stack = write(
        dir.path(),
        "stack.json",
        &report(&[(1, 40, 2.5), (16, 85, 1.2), (64, 60, 1.3)]),
    );
    // 4,001 sent at c=64, one failed: 4,000 successful.
    let dev_pg = write(dir.path(), "dev-pg.json", &report(&[(64, 4_001, 0.0)]));
    let rebuild_s3 = write(
        dir.path(),
        "rebuild-stack.json",
        &json!({"events_per_second": 19_999, "events": 5_000, "seconds": 0.25}),
    );
    let rebuild_dir = write(
        dir.path(),
        "rebuild-dev.json",
        &json!({"events_per_second": 100_000, "events": 13_000, "seconds": 0.13}),
    );
    let micro = dir.path().join("micro.txt");
    std::fs::write(
        &micro,
        "load/s3/10k events, no snapshot\n                        time:   [105.51 ms 109.81 ms 115.01 ms]\n\
         load/s3/10k events, snapshot\n                        time:   [19.245 ms 19.487 ms 21.748 ms]\n",
    )
    .unwrap();

    let table = targets(&[
        "--stack",
        &stack,
        "--dev-pg",
        &dev_pg,
        "--rebuild-stack",
        &rebuild_s3,
        "--rebuild-dev",
        &rebuild_dir,
        "--micro",
        micro.to_str().unwrap(),
    ]);

    assert!(table.contains("at abc1234"), "{table}");
    let c16 = row(&table, "S3 stack commands/s at c=16");
    assert!(
        c16.contains("85 of 100 = 85 %") && c16.ends_with("| met |"),
        "{c16}"
    );
    let c64 = row(&table, "S3 stack commands/s at c=64");
    assert!(
        c64.contains("60 of 100 = 60 %") && c64.ends_with("| **not met** |"),
        "{c64}"
    );
    let requests = row(&table, "S3 requests per command at c=64");
    assert!(
        requests.contains("1.30") && requests.ends_with("| **not met** |"),
        "{requests}"
    );
    let s3 = row(&table, "rebuild from the S3");
    assert!(
        s3.contains("19,999") && s3.ends_with("| **not met** |"),
        "{s3}"
    );
    let directory = row(&table, "rebuild from the directory");
    assert!(
        directory.contains("100,000 (") && directory.ends_with("| met |"),
        "{directory}"
    );
    let load = row(&table, "a 10k-event stream loaded from S3");
    assert!(
        load.contains("19.5 ms") && load.ends_with("| met |"),
        "{load}"
    );
    let pg = row(&table, "gateway alone on the PostgreSQL store");
    assert!(pg.contains("4,000") && pg.ends_with("| met |"), "{pg}");
}

#[test]
fn a_part_the_run_left_out_is_reported_as_not_measured() {
    let table = targets(&["--stack", "/nonexistent/stack.json"]);
    let rows: Vec<_> = table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| target") && !l.starts_with("| ---"))
        .collect();
    assert_eq!(rows.len(), 7, "{table}");
    for row in rows {
        assert!(
            row.contains("not measured in this run") && row.ends_with("| — |"),
            "{row}"
        );
    }
}
