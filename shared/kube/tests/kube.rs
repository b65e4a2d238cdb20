//! The Lease election and the projector scaling, against the in-memory API server.

use serde_json::json;
use std::time::Duration;
use tally_kube::testing::FakeApiServer;
use tally_kube::{with_projector_stopped, Elector, LeaseSettings, ProjectorScale};

const NS: &str = "tally";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/tally/leases/tally-relay";
const PROJECTOR: &str = "/apis/apps/v1/namespaces/tally/deployments/tally-projector";
const SCALED_OBJECT: &str = "/apis/keda.sh/v1alpha1/namespaces/tally/scaledobjects/tally-projector";

/// Fast timings: a 1 s lease (the API's smallest), renewed every 100 ms.
fn settings(identity: &str) -> LeaseSettings {
    LeaseSettings {
        lease_duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(600),
        retry_period: Duration::from_millis(100),
        ..LeaseSettings::new("tally-relay", NS, identity)
    }
}

fn holder(api: &FakeApiServer) -> Option<String> {
    api.get(LEASE)?["spec"]["holderIdentity"]
        .as_str()
        .map(String::from)
}

async fn eventually(what: &str, within: Duration, check: impl Fn() -> bool) {
    let start = tokio::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_first_candidate_leads_and_a_second_waits_until_the_lease_expires() {
    let api = FakeApiServer::new();
    let mut a = Elector::new(api.client(NS), settings("relay-a"));
    let mut b = Elector::new(api.client(NS), settings("relay-b"));

    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "a creates the lease"
    );
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "b sees a fresh lease held by a"
    );
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");
        assert!(
            !b.try_acquire_or_renew().await.unwrap(),
            "a renewed: b keeps waiting"
        );
    }
    assert_eq!(holder(&api).as_deref(), Some("relay-a"));

    // a stops renewing (it died): b takes over once a whole lease duration passed.
    assert!(!b.try_acquire_or_renew().await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        b.try_acquire_or_renew().await.unwrap(),
        "b takes the expired lease"
    );
    assert_eq!(holder(&api).as_deref(), Some("relay-b"));
    assert_eq!(
        api.get(LEASE).unwrap()["spec"]["leaseTransitions"],
        json!(1)
    );
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "a, back, is a follower now"
    );
}

#[tokio::test]
async fn of_many_candidates_racing_for_a_free_or_expired_lease_exactly_one_wins() {
    let api = FakeApiServer::new();
    let race = |round: usize| {
        let api = api.clone();
        async move {
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let mut elector =
                        Elector::new(api.client(NS), settings(&format!("r{round}-{i}")));
                    tokio::spawn(async move { elector.try_acquire_or_renew().await.unwrap() })
                })
                .collect();
            let mut winners = 0;
            for task in tasks {
                winners += usize::from(task.await.unwrap());
            }
            winners
        }
    };
    assert_eq!(
        race(0).await,
        1,
        "one create succeeds, seven get AlreadyExists"
    );
    // Each new candidate first sees the lease as fresh (its own clock starts now), so
    // they give up; once it has expired for all of them, they race the takeover.
    let mut electors: Vec<_> = (0..8)
        .map(|i| Elector::new(api.client(NS), settings(&format!("late-{i}"))))
        .collect();
    for e in &mut electors {
        assert!(!e.try_acquire_or_renew().await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let tasks: Vec<_> = electors
        .into_iter()
        .map(|mut e| tokio::spawn(async move { e.try_acquire_or_renew().await.unwrap() }))
        .collect();
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(
        winners, 1,
        "the resourceVersion lets exactly one takeover through"
    );
    assert!(holder(&api).unwrap().starts_with("late-"));
}

#[tokio::test]
async fn a_leader_that_shuts_down_hands_over_without_waiting_for_expiry() {
    let api = FakeApiServer::new();
    let a = Elector::new(api.client(NS), settings("relay-a")).spawn();
    let leading_a = a.watch();
    eventually("a leads", Duration::from_secs(2), || *leading_a.borrow()).await;
    let b = Elector::new(api.client(NS), settings("relay-b")).spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_leader(), "one leader at a time");

    let released = tokio::time::Instant::now();
    a.release().await;
    assert!(!*leading_a.borrow(), "a no longer says it leads");
    eventually("b leads", Duration::from_secs(2), || b.is_leader()).await;
    assert!(
        released.elapsed() < Duration::from_millis(900),
        "a released lease is taken at the next round, not after the 1 s lease: {:?}",
        released.elapsed()
    );
    assert_eq!(holder(&api).as_deref(), Some("relay-b"));
    b.release().await;
    assert_eq!(holder(&api), None, "released on shutdown");
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_steps_down_before_anyone_could_take_over() {
    let api = FakeApiServer::new();
    let a = Elector::new(api.client(NS), settings("relay-a")).spawn();
    eventually("a leads", Duration::from_secs(2), || a.is_leader()).await;
    api.set_down(true);
    let cut = tokio::time::Instant::now();
    eventually("a steps down", Duration::from_secs(2), || !a.is_leader()).await;
    let stepped_down = cut.elapsed();
    assert!(
        stepped_down < Duration::from_secs(1),
        "within the renew deadline plus a round, before the 1 s lease could expire for a follower: {stepped_down:?}"
    );
    api.set_down(false);
    eventually("a leads again", Duration::from_secs(2), || a.is_leader()).await;
    a.release().await;
}

#[tokio::test]
async fn a_rebuild_runs_with_no_projector_pod_and_restores_the_replica_count_after() {
    let api = FakeApiServer::new().with_settle_after(2);
    api.add_deployment(NS, "tally-projector", 3);
    let mut scale = ProjectorScale::new(api.client(NS), NS, "tally-projector", None);
    scale.poll = Duration::from_millis(10);

    let seen = api.clone();
    let during = with_projector_stopped(&scale, async move {
        let d = seen.get(PROJECTOR).unwrap();
        Ok::<_, String>((
            d["spec"]["replicas"].clone(),
            d["status"]["replicas"].clone(),
            d["metadata"]["annotations"].clone(),
        ))
    })
    .await
    .unwrap();
    assert_eq!(during.0, json!(0), "scaled to zero during the replay");
    assert_eq!(during.1, json!(0), "and no pod was left when it started");
    assert_eq!(during.2, json!({"tally.dev/replicas-before-rebuild": "3"}));

    let after = api.get(PROJECTOR).unwrap();
    assert_eq!(after["spec"]["replicas"], json!(3));
    assert_eq!(
        after["status"]["readyReplicas"],
        json!(3),
        "waited until ready"
    );
    assert!(after["metadata"]
        .get("annotations")
        .is_none_or(|a| a.get("tally.dev/replicas-before-rebuild").is_none()));
}

#[tokio::test]
async fn a_failed_replay_still_scales_the_projector_back() {
    let api = FakeApiServer::new();
    api.add_deployment(NS, "tally-projector", 2);
    let scale = ProjectorScale::new(api.client(NS), NS, "tally-projector", None);
    let err = with_projector_stopped(&scale, async { Err::<(), _>("the store is unreachable") })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("the store is unreachable"),
        "{err}"
    );
    assert_eq!(api.get(PROJECTOR).unwrap()["spec"]["replicas"], json!(2));
}

#[tokio::test]
async fn a_rebuild_cut_short_is_resumed_with_the_remembered_replica_count() {
    let api = FakeApiServer::new();
    api.add_deployment(NS, "tally-projector", 0);
    let mut d = api.get(PROJECTOR).unwrap();
    d["metadata"]["annotations"] = json!({"tally.dev/replicas-before-rebuild": "4"});
    api.put(PROJECTOR, d);
    let scale = ProjectorScale::new(api.client(NS), NS, "tally-projector", None);
    with_projector_stopped(&scale, async { Ok::<_, String>(()) })
        .await
        .unwrap();
    assert_eq!(
        api.get(PROJECTOR).unwrap()["spec"]["replicas"],
        json!(4),
        "not the 0 it was left at"
    );
}

#[tokio::test]
async fn with_keda_the_scaled_object_is_paused_at_zero_during_the_rebuild_and_resumed_after() {
    let api = FakeApiServer::new();
    api.add_deployment(NS, "tally-projector", 1);
    api.put(SCALED_OBJECT, json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": "tally-projector", "namespace": NS}, "spec": {"scaleTargetRef": {"name": "tally-projector"}}}));
    let scale = ProjectorScale::new(
        api.client(NS),
        NS,
        "tally-projector",
        Some("tally-projector".into()),
    );
    let seen = api.clone();
    let paused = with_projector_stopped(&scale, async move {
        Ok::<_, String>(
            seen.get(SCALED_OBJECT).unwrap()["metadata"]["annotations"]
                ["autoscaling.keda.sh/paused-replicas"]
                .clone(),
        )
    })
    .await
    .unwrap();
    assert_eq!(paused, json!("0"));
    let after = api.get(SCALED_OBJECT).unwrap();
    assert!(
        after["metadata"]["annotations"]
            .get("autoscaling.keda.sh/paused-replicas")
            .is_none(),
        "{after}"
    );
}

#[tokio::test]
async fn with_the_api_server_down_a_rebuild_touches_nothing() {
    let api = FakeApiServer::new();
    api.add_deployment(NS, "tally-projector", 2);
    api.set_down(true);
    let scale = ProjectorScale::new(api.client(NS), NS, "tally-projector", None);
    let replayed = std::sync::atomic::AtomicBool::new(false);
    let err = with_projector_stopped(&scale, async {
        replayed.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, String>(())
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("503") || err.to_string().contains("down"),
        "{err}"
    );
    assert!(
        !replayed.load(std::sync::atomic::Ordering::SeqCst),
        "the replay never started"
    );
    api.set_down(false);
    assert_eq!(api.get(PROJECTOR).unwrap()["spec"]["replicas"], json!(2));
}

#[test]
fn outside_a_pod_the_relays_election_refuses_to_start_and_says_why() {
    // These tests run outside Kubernetes: no service host, no mounted service account.
    assert!(
        std::env::var_os("KUBERNETES_SERVICE_HOST").is_none(),
        "this test expects to run outside a Kubernetes pod"
    );
    let why = match tally_kube::in_cluster_client() {
        Err(tally_kube::Error::Config(why)) => why,
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("a client without a cluster"),
    };
    assert!(
        why.contains("TALLY_LEASE_NAME") && why.contains("inside a Kubernetes pod"),
        "{why}"
    );
}
