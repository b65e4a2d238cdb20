//! The PostgreSQL event store (`TALLY_STORE=postgres`) against the real server that
//! `make test` provisions: the store conformance suite the directory and S3 stores
//! pass, what is its own (the outbox row written by the append, unreadable rows), the
//! global order that skips no late commit, and the seed walk-through on a gateway
//! wired to it.

use serde_json::json;
use tally_es::{
    CommitMetadata, EventStore, Outbox, Revision, Snapshot, SnapshotStore, StoreError,
    StoredCommit, StoredEvent, StreamId,
};
use tally_host::{Config, Host, Role};
use tally_postgres::{GlobalPosition, PgEventStore};
use tally_testkit::services::fresh_database;

/// A store on a fresh database, on a pool of a few connections (the server allows 100
/// in all, and the tests of this file run at once).
async fn store() -> PgEventStore {
    store_with(4).await
}

async fn store_with(connections: u32) -> PgEventStore {
    let url = fresh_database().await;
    PgEventStore::new(tally_postgres::connect(&url, connections).await.unwrap())
}

fn stream(id: &str) -> StreamId {
    StreamId::parse(id).unwrap()
}

fn commit(id: &str, revision: u64, events: usize, attempt: &str) -> StoredCommit {
    StoredCommit {
        stream: stream(id),
        revision: Revision::new(revision),
        recorded_at: time::OffsetDateTime::now_utc(),
        events: (0..events)
            .map(|i| StoredEvent {
                event_type: "Probe".into(),
                version: 1,
                data: json!({ "i": i }),
            })
            .collect(),
        metadata: CommitMetadata {
            commit_id: Some(attempt.into()),
            ..Default::default()
        },
    }
}

fn revisions(commits: &[StoredCommit]) -> Vec<u64> {
    commits.iter().map(|c| c.revision.get()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_winner_of_a_race_leaves_one_outbox_row_and_no_loser_any() {
    let store = store_with(8).await;
    tally_es::conformance::assert_one_writer_wins_each_revision(&store, &stream("race16"), 20, 16)
        .await;
    assert_eq!(store.pending(1000).await.unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_postgres_store_passes_the_store_conformance_suite() {
    // 64 connections: the 64 concurrent writers race in the server, not in the pool.
    tally_es::conformance::assert_store_conforms(&store_with(64).await).await;
}

/// (A gap reads as corrupt: the conformance suite.)
#[tokio::test]
async fn a_row_that_is_not_a_commit_reads_as_corrupt() {
    let store = store().await;
    store.append(&commit("gappy", 1, 1, "g1")).await.unwrap();
    sqlx::query("UPDATE event_commits SET body = 'not json' WHERE revision = 1")
        .execute(store.pool())
        .await
        .unwrap();
    assert!(matches!(
        store.read_commit(&stream("gappy"), Revision::new(1)).await,
        Err(StoreError::Corrupt(_))
    ));
}

/// The outbox row comes with the append, in its statement: a losing attempt leaves
/// none (with the other stores it leaves an entry the relay abandons).
#[tokio::test]
async fn an_append_records_its_outbox_row_and_a_losing_attempt_none() {
    let store = store().await;
    let s = stream("outboxed");
    store.record(&s, Revision::new(1), "first").await.unwrap();
    store.record(&s, Revision::new(1), "second").await.unwrap();
    assert!(
        store.pending(10).await.unwrap().is_empty(),
        "record alone writes nothing"
    );
    store
        .append(&commit("outboxed", 1, 1, "first"))
        .await
        .unwrap();
    // A losing attempt at the same revision leaves no row.
    store
        .append(&commit("outboxed", 1, 1, "second"))
        .await
        .unwrap_err();
    let pending = store.pending(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].revision, pending[0].attempt.as_str()),
        (Revision::new(1), "first")
    );
}

/// (The newest snapshot wins: the conformance suite.)
#[tokio::test]
async fn an_unreadable_snapshot_reads_as_none() {
    let store = store().await;
    let s = stream("snapped");
    store
        .save(&Snapshot {
            stream: s.clone(),
            revision: Revision::new(100),
            schema: "probe/1".into(),
            state: json!({ "at": 100 }),
            idempotency: Vec::new(),
            taken_at: time::OffsetDateTime::now_utc(),
        })
        .await
        .unwrap();
    assert!(store.latest(&s).await.unwrap().is_some());
    sqlx::query("UPDATE event_snapshots SET body = 'garbage'")
        .execute(store.pool())
        .await
        .unwrap();
    assert!(store.latest(&s).await.unwrap().is_none());
}

#[tokio::test]
async fn the_global_order_waits_for_a_transaction_that_commits_late_and_skips_nothing() {
    let store = store().await;
    store.append(&commit("early", 1, 1, "e")).await.unwrap();
    // A writer whose transaction is still open when a later one commits.
    let mut late = store.pool().begin().await.unwrap();
    let slow = commit("slow", 1, 1, "s");
    sqlx::query(
        "INSERT INTO event_commits (stream, revision, last_revision, body) VALUES ($1, 1, 1, $2)",
    )
    .bind("slow")
    .bind(slow.to_bytes())
    .execute(&mut *late)
    .await
    .unwrap();
    store.append(&commit("later", 1, 1, "l")).await.unwrap();

    // (Another test's transaction may hold the server-wide horizon before `early` for a
    // moment: read until it is final. `slow`'s stays open throughout, so `later` cannot
    // be.)
    let mut read = store
        .read_all_after(GlobalPosition::START, 100)
        .await
        .unwrap();
    for _ in 0..100 {
        if !read.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        read = store
            .read_all_after(GlobalPosition::START, 100)
            .await
            .unwrap();
    }
    let names: Vec<&str> = read.iter().map(|(_, c)| c.stream.as_str()).collect();
    assert_eq!(names, ["early"], "nothing past a transaction still running");
    let (mark, _) = read[0];

    late.commit().await.unwrap();
    // `pg_snapshot_xmin` is the whole server's: a transaction of another test running
    // at once (the tests of this file share the server) may hold the horizon back for
    // a moment after `later` committed. Read again until both are final, a few seconds
    // at most; then they must be there, in order.
    let mut read = store.read_all_after(mark, 100).await.unwrap();
    for _ in 0..100 {
        if read.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        read = store.read_all_after(mark, 100).await.unwrap();
    }
    let names: Vec<&str> = read.iter().map(|(_, c)| c.stream.as_str()).collect();
    assert_eq!(
        names,
        ["slow", "later"],
        "the late commit is read, in its place"
    );
    let (end, _) = read[1];
    assert!(end > mark);
    assert!(store.read_all_after(end, 100).await.unwrap().is_empty());
    assert_eq!(
        store
            .read_all_after(GlobalPosition::START, 2)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn a_gateway_on_the_postgres_store_walks_the_seed_flow_and_leaves_no_outbox_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    config.store = Some("postgres".into());
    config.event_store_url = Some(fresh_database().await);
    let host = Host::build(&config, Role::Gateway).await.unwrap();
    host.init().await.unwrap();
    assert_eq!(host.kinds.store, "postgres");
    let app = tally_host::gateway_app(&host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let post = |path: &str, body: &'static str| {
        client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(
        post("/accounts", r#"{"ID": "pg-walk"}"#)
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(
        post("/accounts/pg-walk/deposit", r#"{"Amount": 100}"#)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post("/accounts/pg-walk/withdraw", r#"{"Amount": 30}"#)
            .await
            .unwrap()
            .status(),
        200
    );
    let refused = post("/accounts/pg-walk/withdraw", r#"{"Amount": 500}"#)
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let balance: serde_json::Value = client
        .get(format!("{base}/accounts/pg-walk/balance"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance["balance"], json!("70.00"), "{balance}");

    let commits = host
        .store
        .read(&stream("pg-walk"), Revision::new(1))
        .await
        .unwrap();
    assert_eq!(revisions(&commits), [1, 2, 3]);
    let outbox = host.outbox.clone().unwrap();
    assert!(
        outbox.pending(10).await.unwrap().is_empty(),
        "every commit was published"
    );
    server.abort();
}

/// Issue 16 (dev-pg ≥ 4,000 commands/s): each append was a statement and a transaction
/// of its own — a round trip and a WAL flush per command. Appends that arrive together
/// now share one (`tx` is the inserting transaction's id), and within a group each row
/// is still decided alone: a revision taken before the group, or twice in it, loses;
/// every winner has its outbox row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_that_arrive_together_share_a_transaction_and_each_is_decided_alone() {
    let store = store_with(8).await;
    store
        .append(&commit("grouped-taken", 1, 1, "first"))
        .await
        .unwrap();
    let mut appends = Vec::new();
    for n in 0..64 {
        appends.push(commit(&format!("grouped-{n}"), 1, 1 + n % 3, "a"));
    }
    appends.push(commit("grouped-taken", 1, 1, "late")); // taken before the group
    appends.push(commit("grouped-0", 1, 1, "b")); // twice in the group
    let outcomes = futures::future::join_all(appends.iter().map(|c| {
        let store = store.clone();
        async move { store.append(c).await }
    }))
    .await;
    let won = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(won, 64, "{outcomes:?}");
    assert!(
        matches!(outcomes[64], Err(tally_es::AppendError::Conflict { .. })),
        "{:?}",
        outcomes[64]
    );
    assert!(
        outcomes[0].is_ok() != outcomes[65].is_ok(),
        "one of two appends of grouped-0@1 wins"
    );
    for n in 0..64 {
        let read = store
            .read(&stream(&format!("grouped-{n}")), Revision::new(1))
            .await
            .unwrap();
        assert_eq!(read.len(), 1, "grouped-{n}");
    }
    // 65 winners (the taken one's first included), one outbox row each.
    assert_eq!(store.pending(1000).await.unwrap().len(), 65);
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT tx::text) FROM event_commits WHERE stream LIKE 'grouped-%' AND stream <> 'grouped-taken'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(
        transactions < 64,
        "64 appends at once took {transactions} transactions"
    );
}
