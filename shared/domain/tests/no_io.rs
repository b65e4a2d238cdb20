//! Architecture invariant: the domain crate does no IO. Its dependency tree holds no
//! crate that talks to the network, the file system on its own, or a runtime.

#[test]
fn the_domain_crate_depends_on_no_io_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "tally-domain",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(crates.contains(&"tally-es"), "the tree was read: {tree}");
    let forbidden = [
        "tokio",
        "mio",
        "socket2",
        "hyper",
        "http",
        "axum",
        "tower",
        "reqwest",
        "lambda_http",
        "lambda_runtime",
        "aws-sdk-s3",
        "aws-config",
        "aws-smithy-runtime",
        "rdkafka",
        "redis",
        "sqlx",
        "kube",
        "async-trait-io",
    ];
    for name in crates {
        assert!(
            !forbidden.contains(&name) && !name.starts_with("aws-"),
            "the domain crate must not depend on {name}"
        );
    }
}
