//! The past of a stream, answered from the event store: an aggregate's state right
//! after a given revision, folded from the newest snapshot at or below it (or from the
//! start) and the commits up to it. Generic over any [`Aggregate`].

use crate::projection::ProjectionError;
use tally_es::{Aggregate, Commit, EventStore, RememberedKey, Revision, SnapshotStore, StreamId};
use time::OffsetDateTime;

/// What the store says of a stream at a revision.
#[derive(Clone, Debug, PartialEq)]
pub enum Past<A> {
    /// The state right after the event at `revision`, recorded at `recorded_at`.
    At {
        state: A,
        revision: Revision,
        recorded_at: OffsetDateTime,
    },
    /// The stream ends before that revision, at `last` (zero: there is no stream).
    NotReached { last: Revision },
}

/// `stream`'s state right after its event at revision `at` (at least 1), read from
/// `store`, starting from the newest snapshot in `snapshots` if it is at or below `at`
/// and of `A`'s schema (a snapshot is a cache: anything else is ignored and the stream
/// is folded from its start).
pub async fn state_at<A: Aggregate>(
    store: &dyn EventStore,
    snapshots: Option<&dyn SnapshotStore>,
    stream: &StreamId,
    at: Revision,
) -> Result<Past<A>, ProjectionError> {
    let mut state = A::default();
    let mut from = Revision::ZERO;
    if let Some(snapshots) = snapshots {
        if let Some((restored, revision, _)) = usable_snapshot::<A>(snapshots, stream).await {
            if revision <= at {
                state = restored;
                from = revision;
            }
        }
    }
    let mut last = from;
    let mut recorded_at = None;
    for stored in store.read_after(stream, from).await? {
        let commit = Commit::<A::Event>::decode(&stored)?;
        for (i, event) in commit.events.iter().enumerate() {
            let revision = commit.revision.advance(i as u64);
            if revision > at {
                break;
            }
            state.apply(event);
            last = revision;
            recorded_at = Some(commit.recorded_at);
        }
        if last >= at {
            break;
        }
    }
    match recorded_at {
        Some(recorded_at) if last == at => Ok(Past::At {
            state,
            revision: at,
            recorded_at,
        }),
        // The snapshot is at `at` itself: its commit's time comes from the store.
        None if last == at && at > Revision::ZERO => {
            let time = store
                .read(stream, at)
                .await?
                .first()
                .map(|c| c.recorded_at)
                .ok_or_else(|| {
                    ProjectionError::Store(tally_es::StoreError::Corrupt(format!(
                        "stream `{stream}` has a snapshot at revision {at} but no commit there"
                    )))
                })?;
            Ok(Past::At {
                state,
                revision: at,
                recorded_at: time,
            })
        }
        _ => Ok(Past::NotReached { last }),
    }
}

/// The newest usable snapshot of `stream` in `store`: of `A`'s schema, and readable
/// (state, revision, remembered idempotency keys). Anything else — none, another
/// schema, unreadable, the store unavailable — is `None`: a snapshot is a cache, and
/// the stream is folded from its start instead.
pub(crate) async fn usable_snapshot<A: Aggregate>(
    store: &dyn SnapshotStore,
    stream: &StreamId,
) -> Option<(A, Revision, Vec<RememberedKey>)> {
    let snapshot = match store.latest(stream).await {
        Ok(snapshot) => snapshot?,
        Err(e) => {
            tracing::warn!(%stream, error = %e, "snapshot unavailable; folding the stream from its start");
            return None;
        }
    };
    if Some(snapshot.schema.as_str()) != A::SNAPSHOT_SCHEMA {
        return None;
    }
    let state = A::from_snapshot(snapshot.state)?;
    Some((state, snapshot.revision, snapshot.idempotency))
}
