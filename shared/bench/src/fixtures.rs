//! Streams to measure: account events, commits, and a seeded long stream in any store.

use futures::stream::{self, StreamExt};
use tally_domain::{Account, AccountEvent, AccountId, Currency};
use tally_es::{
    Aggregate, AppendError, Commit, CommitMetadata, EventStore, Revision, Snapshot, SnapshotStore,
    StoreError, StreamId,
};
use time::OffsetDateTime;

/// The length of the long stream the load benchmarks read.
pub const STREAM_EVENTS: u64 = 10_000;

/// `n` events of one account: opened, then deposits of 1.00 (`n - 1` of them).
pub fn account_events(n: u64) -> Vec<AccountEvent> {
    let id = AccountId::parse("bench-account").expect("valid id");
    let currency = Currency::parse("USD").expect("known currency");
    std::iter::once(AccountEvent::Opened {
        id,
        currency,
        owner: None,
        holder: None,
    })
    .chain((1..n as i64).map(|i| AccountEvent::Deposited {
        amount: 100,
        balance: 100 * i,
    }))
    .collect()
}

/// A commit of `events` at `revision` of the bench account's stream.
pub fn commit_of(revision: Revision, events: Vec<AccountEvent>) -> Commit<AccountEvent> {
    Commit::new(
        StreamId::parse("bench-account").expect("valid id"),
        revision,
        OffsetDateTime::now_utc(),
        events,
        CommitMetadata {
            idempotency_key: Some("0b6e3c1e-bench-key".into()),
            fingerprint: Some("sha256:4f1c".into()),
            commit_id: Some("c0ffee00-0000-4000-8000-000000000001".into()),
            request_id: Some("req-0001".into()),
        },
    )
}

/// Make `stream` in `store` hold `events` events, one per commit (as commands write
/// them), and a snapshot at revision `snapshot_at` in `snapshots`. Idempotent: commits
/// already there are kept, so a stream seeded by an earlier run is reused.
pub async fn seed_stream(
    store: &dyn EventStore,
    snapshots: &dyn SnapshotStore,
    stream: &StreamId,
    events: u64,
    snapshot_at: u64,
) -> Result<(), StoreError> {
    let all = account_events(events);
    if store
        .read_commit(stream, Revision::new(events))
        .await?
        .is_none()
    {
        let appends = all.iter().enumerate().map(|(i, event)| async move {
            let mut commit = commit_of(Revision::new(i as u64 + 1), vec![event.clone()]);
            commit.stream = stream.clone();
            match store.append(&commit.encode()).await {
                Ok(()) | Err(AppendError::Conflict { .. }) => Ok(()),
                Err(AppendError::Unavailable(e)) => Err(StoreError::Unavailable(e)),
            }
        });
        let results: Vec<Result<(), StoreError>> =
            stream::iter(appends).buffer_unordered(32).collect().await;
        results.into_iter().collect::<Result<(), _>>()?;
    }
    let latest = snapshots.latest(stream).await?;
    if latest.is_none_or(|s| s.revision != Revision::new(snapshot_at)) {
        let state = Account::replay(&all[..snapshot_at as usize]);
        snapshots
            .save(&Snapshot {
                stream: stream.clone(),
                revision: Revision::new(snapshot_at),
                schema: Account::SNAPSHOT_SCHEMA
                    .expect("accounts snapshot")
                    .to_owned(),
                state: state.to_snapshot().expect("accounts snapshot"),
                idempotency: Vec::new(),
                taken_at: OffsetDateTime::now_utc(),
            })
            .await?;
    }
    Ok(())
}
