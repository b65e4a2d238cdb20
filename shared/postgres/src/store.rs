//! The event store on PostgreSQL: the store a user without S3 picks.
//!
//! One row per commit in `event_commits`, keyed by `(stream, revision)`: an append is
//! an `INSERT ... ON CONFLICT DO NOTHING`, so of any number of writers racing for a
//! revision exactly one inserts its row and the others see a conflict. The same
//! statement inserts the commit's outbox row (a data-modifying CTE): a commit never
//! exists without its note that it must be published, nor the note without the commit.
//! Appends are committed in groups: the appends of one process that arrive while
//! [`FLUSHES`] statements are in flight go together in the next one (each row decided
//! on its own by the unique key, the rows in key order so two groups never deadlock), so
//! under load many commits share one round trip and one WAL flush, and alone an append
//! is still one statement. [`Outbox::record`] is therefore a no-op here: the
//! append records (unless the store is [`PgEventStore::without_outbox`], for a process
//! on the in-process stream, where no relay would ever remove the rows). Snapshots are one row per stream, replaced only by a newer one.
//!
//! Every commit also has a global place, `(tx, position)`: [`PgEventStore::read_all_after`]
//! reads every stream's commits in that order, and only those whose transaction is
//! older than every transaction still running, so a commit whose transaction committed
//! late is never skipped by a reader that has already moved past its neighbours.

use async_trait::async_trait;
use sqlx::{PgPool, Row};
use std::sync::{Arc, Mutex};
use tally_es::{
    check_contiguous, error_chain, AppendError, EventStore, Outbox, OutboxEntry, Revision,
    Snapshot, SnapshotStore, StoreError, StoredCommit, StreamId,
};
use tokio::sync::{oneshot, Semaphore};

/// A place in the global order of commits: after the commit at `position` of
/// transaction `tx`. [`GlobalPosition::START`] is before every commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GlobalPosition {
    /// The transaction id (`xid8`) of the commit's transaction.
    pub tx: u64,
    /// The commit's row position (an identity, in insertion order).
    pub position: i64,
}

impl GlobalPosition {
    /// Before every commit.
    pub const START: GlobalPosition = GlobalPosition { tx: 0, position: 0 };
}

/// The event store, outbox and snapshot store on one PostgreSQL pool (its schema comes
/// with [`crate::migrate`]).
#[derive(Clone)]
pub struct PgEventStore {
    pool: PgPool,
    outbox: bool,
    group: Arc<GroupCommit>,
}

/// How many group statements of one store may be in flight at once.
pub const FLUSHES: usize = 4;
/// The most appends one group statement carries.
const MAX_GROUP: usize = 256;

/// Appends waiting for a statement, and the permits to send one.
struct GroupCommit {
    queue: Mutex<Vec<Pending>>,
    flushes: Arc<Semaphore>,
}

/// One append waiting in the group: its row, and where its outcome goes (`true`: its
/// row was inserted; `false`: the revision was taken).
struct Pending {
    stream: String,
    revision: i64,
    last_revision: i64,
    body: Vec<u8>,
    attempt: String,
    outcome: oneshot::Sender<Result<bool, String>>,
}

impl GroupCommit {
    fn new() -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            flushes: Arc::new(Semaphore::new(FLUSHES)),
        }
    }

    fn take(&self) -> Vec<Pending> {
        let mut queue = self.queue.lock().expect("group queue poisoned");
        let n = queue.len().min(MAX_GROUP);
        queue.drain(..n).collect()
    }

    /// Send what waits, if a flush may start: in a task of its own, so an append whose
    /// caller gave up never strands the others of its group. A flush goes on while
    /// appends keep arriving; it gives its permit back only on an empty queue, and looks
    /// once more after that — an append that found no permit was queued before, and is
    /// taken by that look.
    fn kick(self: &Arc<Self>, pool: &PgPool, outbox: bool) {
        let Ok(permit) = self.flushes.clone().try_acquire_owned() else {
            return;
        };
        let (group, pool) = (self.clone(), pool.clone());
        tokio::spawn(async move {
            let mut permit = Some(permit);
            loop {
                let batch = group.take();
                if batch.is_empty() {
                    drop(permit.take());
                    if group.queue.lock().expect("group queue poisoned").is_empty() {
                        return;
                    }
                    match group.flushes.clone().try_acquire_owned() {
                        Ok(again) => permit = Some(again),
                        Err(_) => return,
                    }
                    continue;
                }
                flush(&pool, outbox, batch).await;
            }
        });
    }
}

/// One statement for `batch`: each row inserted unless its revision is taken, with its
/// outbox row (`outbox`), in `(stream, revision)` order. A second append of one revision
/// in the same batch is not sent: it loses to the first, whatever becomes of that.
async fn flush(pool: &PgPool, outbox: bool, mut batch: Vec<Pending>) {
    batch.sort_by(|a, b| key(a).cmp(&key(b)));
    let (mut sent, mut doubles) = (Vec::with_capacity(batch.len()), Vec::new());
    for pending in batch {
        match sent.last() {
            Some(last) if key(last) == key(&pending) => doubles.push(pending),
            _ => sent.push(pending),
        }
    }
    let inserted = sqlx::query(
        "WITH input AS ( \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[], $5::text[]) \
                 WITH ORDINALITY AS t(stream, revision, last_revision, body, attempt, n)), \
         c AS ( \
             INSERT INTO event_commits (stream, revision, last_revision, body) \
             SELECT stream, revision, last_revision, body FROM input ORDER BY n \
             ON CONFLICT DO NOTHING RETURNING stream, revision), \
         o AS ( \
             INSERT INTO event_outbox (stream, revision, attempt) \
             SELECT c.stream, c.revision, input.attempt FROM c JOIN input USING (stream, revision) \
             WHERE $6 ON CONFLICT DO NOTHING) \
         SELECT stream, revision FROM c",
    )
    .bind(sent.iter().map(|p| p.stream.clone()).collect::<Vec<_>>())
    .bind(sent.iter().map(|p| p.revision).collect::<Vec<_>>())
    .bind(sent.iter().map(|p| p.last_revision).collect::<Vec<_>>())
    .bind(
        sent.iter_mut()
            .map(|p| std::mem::take(&mut p.body))
            .collect::<Vec<_>>(),
    )
    .bind(sent.iter().map(|p| p.attempt.clone()).collect::<Vec<_>>())
    .bind(outbox)
    .fetch_all(pool)
    .await
    .map(|rows| {
        rows.iter()
            .map(|row| {
                (
                    row.get::<String, _>("stream"),
                    row.get::<i64, _>("revision"),
                )
            })
            .collect::<std::collections::HashSet<_>>()
    })
    .map_err(|e| error_chain(&e));
    for Pending {
        stream,
        revision,
        outcome,
        ..
    } in sent
    {
        let inserted = inserted
            .as_ref()
            .map(|rows| rows.contains(&(stream, revision)))
            .map_err(Clone::clone);
        let _ = outcome.send(inserted);
    }
    for pending in doubles {
        let outcome = inserted.as_ref().map(|_| false).map_err(Clone::clone);
        let _ = pending.outcome.send(outcome);
    }
}

fn key(pending: &Pending) -> (&str, i64) {
    (&pending.stream, pending.revision)
}

impl PgEventStore {
    /// A store whose appends record an outbox row for a relay to publish.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            outbox: true,
            group: Arc::new(GroupCommit::new()),
        }
    }

    /// A store whose appends record no outbox row: for a process that publishes on an
    /// in-process stream, where nothing would ever relay (or remove) one.
    pub fn without_outbox(mut self) -> Self {
        self.outbox = false;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Up to `limit` commits of every stream after `after`, in global order, each with
    /// its position (pass the last one back to go on). Only commits whose transaction is
    /// older than every transaction still running are read: what is read is final, and
    /// nothing can later appear before it.
    pub async fn read_all_after(
        &self,
        after: GlobalPosition,
        limit: u32,
    ) -> Result<Vec<(GlobalPosition, StoredCommit)>, StoreError> {
        let rows = sqlx::query(
            "SELECT tx::text::bigint AS tx, position, body FROM event_commits \
             WHERE (tx, position) > ($1::text::xid8, $2) \
               AND tx < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY tx, position LIMIT $3",
        )
        .bind(after.tx.to_string())
        .bind(after.position)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let tx: i64 = row.get("tx");
                let place = GlobalPosition {
                    tx: tx as u64,
                    position: row.get("position"),
                };
                Ok((place, decode(row.get("body"))?))
            })
            .collect()
    }
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(error_chain(&e))
}

fn decode(body: &[u8]) -> Result<StoredCommit, StoreError> {
    StoredCommit::from_bytes(body)
        .map_err(|e| StoreError::Corrupt(format!("a commit row is not a commit: {e}")))
}

/// A revision as PostgreSQL's `bigint` holds it.
fn bigint(revision: Revision) -> i64 {
    i64::try_from(revision.get()).unwrap_or(i64::MAX)
}

#[async_trait]
impl EventStore for PgEventStore {
    async fn append(&self, commit: &StoredCommit) -> Result<(), AppendError> {
        let (outcome, answer) = oneshot::channel();
        self.group
            .queue
            .lock()
            .expect("group queue poisoned")
            .push(Pending {
                stream: commit.stream.as_str().to_owned(),
                revision: bigint(commit.revision),
                last_revision: bigint(commit.last_revision()),
                body: commit.to_bytes(),
                attempt: commit.metadata.commit_id.clone().unwrap_or_default(),
                outcome,
            });
        self.group.kick(&self.pool, self.outbox);
        match answer.await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(AppendError::Conflict {
                stream: commit.stream.clone(),
                revision: commit.revision,
            }),
            Ok(Err(e)) => Err(AppendError::Unavailable(e)),
            Err(_) => Err(AppendError::Unavailable(
                "the group statement carrying this append ended without an answer".into(),
            )),
        }
    }

    async fn read(
        &self,
        stream: &StreamId,
        from: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        let rows: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT body FROM event_commits WHERE stream = $1 AND last_revision >= $2 \
             ORDER BY revision",
        )
        .bind(stream.as_str())
        .bind(bigint(from))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let commits = rows
            .iter()
            .map(|body| decode(body))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(first) = commits.first() {
            check_contiguous(stream, first.revision, &commits)?;
            if first.revision > from.max(Revision::new(1)) {
                return Err(StoreError::Corrupt(format!(
                    "stream `{stream}`: expected the commit holding revision {from}, \
                     found one starting at {}",
                    first.revision
                )));
            }
        }
        Ok(commits)
    }

    async fn read_commit(
        &self,
        stream: &StreamId,
        revision: Revision,
    ) -> Result<Option<StoredCommit>, StoreError> {
        let body: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT body FROM event_commits WHERE stream = $1 AND revision = $2",
        )
        .bind(stream.as_str())
        .bind(bigint(revision))
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        let Some(body) = body else { return Ok(None) };
        let commit = decode(&body)?;
        check_contiguous(stream, revision, std::slice::from_ref(&commit))?;
        Ok(Some(commit))
    }

    async fn streams(&self) -> Result<Vec<StreamId>, StoreError> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT stream FROM event_commits WHERE revision = 1 ORDER BY stream",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        names
            .iter()
            .map(|name| {
                StreamId::parse(name)
                    .map_err(|e| StoreError::Corrupt(format!("stream {name:?}: {e}")))
            })
            .collect()
    }

    async fn ready(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM event_commits LIMIT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "the event store tables are not readable (run the init step: migrate): {}",
                    error_chain(&e)
                ))
            })
    }
}

/// The outbox rows [`PgEventStore::append`] inserts with each commit.
#[async_trait]
impl Outbox for PgEventStore {
    /// Nothing to do: the append inserts the outbox row in the statement that inserts
    /// the commit, named by the commit's id (the attempt the caller passes here).
    async fn record(
        &self,
        _stream: &StreamId,
        _revision: Revision,
        attempt: &str,
    ) -> Result<(), StoreError> {
        tally_es::outbox_name(Revision::new(1), attempt).map(|_| ())
    }

    async fn done(
        &self,
        stream: &StreamId,
        revision: Revision,
        attempt: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM event_outbox WHERE stream = $1 AND revision = $2 AND attempt = $3")
            .bind(stream.as_str())
            .bind(bigint(revision))
            .bind(attempt)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT stream, revision, attempt, recorded_at FROM event_outbox \
             ORDER BY recorded_at LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let name: String = row.get("stream");
                let revision: i64 = row.get("revision");
                Ok(OutboxEntry {
                    stream: StreamId::parse(&name)
                        .map_err(|e| StoreError::Corrupt(format!("outbox stream {name:?}: {e}")))?,
                    revision: Revision::new(revision.max(0) as u64),
                    attempt: row.get("attempt"),
                    recorded_at: row.get("recorded_at"),
                })
            })
            .collect()
    }
}

#[async_trait]
impl SnapshotStore for PgEventStore {
    async fn latest(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let body: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT body FROM event_snapshots WHERE stream = $1")
                .bind(stream.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        // An unreadable snapshot reads as none: the stream is replayed.
        Ok(body.and_then(|b| Snapshot::from_bytes(&b).ok()))
    }

    async fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO event_snapshots (stream, revision, body) VALUES ($1, $2, $3) \
             ON CONFLICT (stream) DO UPDATE SET revision = EXCLUDED.revision, body = EXCLUDED.body \
             WHERE event_snapshots.revision < EXCLUDED.revision",
        )
        .bind(snapshot.stream.as_str())
        .bind(bigint(snapshot.revision))
        .bind(snapshot.to_bytes())
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(unavailable)
    }
}

/// Data keys in `holder_keys`; destroying one deletes its row (and a VACUUM reclaims
/// the page in time; see `tally_vault::KeyWrap` for keeping the master key elsewhere).
#[async_trait]
impl tally_es::KeyStore for PgEventStore {
    async fn put(&self, id: &str, wrapped: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO holder_keys (id, wrapped) VALUES ($1, $2)")
            .bind(id)
            .bind(wrapped)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        sqlx::query_scalar("SELECT wrapped FROM holder_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn destroy(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM holder_keys WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}
