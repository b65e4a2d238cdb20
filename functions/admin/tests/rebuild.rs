//! `admin rebuild` on a cluster: the real replay (directory store → in-memory read
//! model) between the scale-down and the scale-up, against the in-memory API server.

use admin::{execute, Command};
use serde_json::json;
use tally_domain::AccountId;
use tally_host::Host;
use tally_kube::testing::FakeApiServer;
use tally_testkit::{seed, Step};

const PROJECTOR: &str = "/apis/apps/v1/namespaces/tally/deployments/tally-projector";

fn rebuild(projector: Option<&str>) -> Command {
    Command::Rebuild {
        projector: projector.map(String::from),
        namespace: None,
        scaled_object: None,
        timeout_secs: 5,
    }
}

async fn seeded() -> (tempfile::TempDir, Host) {
    let dir = tempfile::tempdir().unwrap();
    seed(
        dir.path(),
        &[
            Step::Open("alice"),
            Step::Deposit("alice", "500.00"),
            Step::Withdraw("alice", "150.00"),
            Step::Open("bob"),
            Step::Deposit("bob", "20.00"),
        ],
    )
    .await;
    let host = Host::embedded(dir.path()).await.unwrap();
    (dir, host)
}

/// The balance in minor units, as the read model holds it.
async fn balance(host: &Host, id: &str) -> Option<i64> {
    let view = host
        .read_model
        .account(&AccountId::parse(id).unwrap())
        .await
        .unwrap()?;
    Some(view.balance)
}

#[tokio::test]
async fn rebuild_stops_the_projector_replays_every_commit_and_scales_it_back() {
    let (_dir, host) = seeded().await;
    let api = FakeApiServer::new();
    api.add_deployment("tally", "tally-projector", 2);

    let (report, _) = execute(
        rebuild(Some("tally-projector")),
        &host,
        Some(api.client("tally")),
    )
    .await
    .unwrap();
    assert_eq!((report.streams, report.commits, report.events), (2, 5, 5));
    assert_eq!(balance(&host, "alice").await, Some(350_00));
    assert_eq!(balance(&host, "bob").await, Some(20_00));

    let patches: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH"))
        .collect();
    assert_eq!(
        patches,
        vec![
            format!(
                r#"PATCH {PROJECTOR} {{"metadata":{{"annotations":{{"tally.dev/replicas-before-rebuild":"2"}}}}}}"#
            ),
            format!(r#"PATCH {PROJECTOR}/scale {{"spec":{{"replicas":0}}}}"#),
            format!(r#"PATCH {PROJECTOR}/scale {{"spec":{{"replicas":2}}}}"#),
            format!(
                r#"PATCH {PROJECTOR} {{"metadata":{{"annotations":{{"tally.dev/replicas-before-rebuild":null}}}}}}"#
            ),
        ]
    );
    assert_eq!(api.get(PROJECTOR).unwrap()["spec"]["replicas"], json!(2));
}

#[tokio::test]
async fn with_the_api_server_down_the_read_model_is_left_as_it_was() {
    let (_dir, host) = seeded().await;
    execute(rebuild(None), &host, None).await.unwrap();
    assert_eq!(balance(&host, "alice").await, Some(350_00));

    let api = FakeApiServer::new();
    api.add_deployment("tally", "tally-projector", 2);
    api.set_down(true);
    let err = execute(
        rebuild(Some("tally-projector")),
        &host,
        Some(api.client("tally")),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("kubernetes"), "{err}");
    assert_eq!(
        balance(&host, "alice").await,
        Some(350_00),
        "nothing was cleared: the rebuild stopped before touching the read model"
    );
}

#[tokio::test]
async fn without_a_cluster_the_rebuild_only_replays() {
    let (_dir, host) = seeded().await;
    let (report, elapsed) = execute(rebuild(None), &host, None).await.unwrap();
    assert_eq!(report.events, 5);
    let summary = admin::summary(&report, elapsed);
    assert_eq!(
        (summary["streams"].clone(), summary["events"].clone()),
        (json!(2), json!(5))
    );
    assert!(summary["events_per_second"].as_u64().unwrap() > 0);
}
