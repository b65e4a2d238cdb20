//! Command handling: load, decide, append at the expected revision.

use crate::locks::StreamLocks;
use backon::{ExponentialBuilder, Retryable};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;
use tally_es::{
    Aggregate, AppendError, Commit, CommitMetadata, DecodeError, EventPublisher, EventStore,
    Revision, StoreError, StoredCommit, StreamId,
};
use time::OffsetDateTime;

/// What a command carries besides its payload.
#[derive(Clone, Debug, Default)]
pub struct CommandContext {
    /// The client's `Idempotency-Key` and a description of the request it came with.
    /// A retry with the same key and fingerprint gets the first answer; the same key
    /// with another fingerprint is refused.
    pub idempotency: Option<(String, String)>,
    /// `If-Match`: the stream revision the client expects.
    pub expected: Option<Revision>,
    /// For tracing.
    pub request_id: Option<String>,
}

/// A command that took effect, now or on an earlier request with the same key.
#[derive(Clone, Debug)]
pub struct Executed<A: Aggregate> {
    /// The commit that holds the command's events.
    pub commit: Commit<A::Event>,
    /// `true` if this is the stored answer to an earlier request with the same key.
    pub replayed: bool,
}

/// Why a command did not take effect. Nothing was written in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    /// The domain refused the command. Handling rule: a 4xx chosen per domain error.
    #[error(transparent)]
    Rejected(E),
    /// `If-Match` named another revision. Handling rule: 412; reload and ask the user.
    #[error("the stream is at revision {actual}, not {expected}")]
    RevisionMismatch {
        expected: Revision,
        actual: Revision,
    },
    /// The key was used before with another request. Handling rule: 422.
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    /// Every attempt lost the race to another writer. Handling rule: 503 + Retry-After.
    #[error("too much contention on this stream; retry")]
    Contention,
    /// The store is down. Handling rule: 503 + Retry-After.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored event could not be read. Handling rule: 500, alert.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

enum Attempt<E: std::error::Error> {
    Conflict,
    Failed(CommandError<E>),
}

/// The state of one stream as loaded from the store.
struct Loaded<A: Aggregate> {
    state: A,
    revision: Revision,
    commits: Vec<Commit<A::Event>>,
}

impl<A: Aggregate> Loaded<A> {
    fn with_key(&self, key: &str) -> Option<&Commit<A::Event>> {
        self.commits
            .iter()
            .rev()
            .find(|c| c.metadata.idempotency_key.as_deref() == Some(key))
    }
}

/// Runs commands of aggregate `A` against an event store.
pub struct CommandHandler<A: Aggregate> {
    store: Arc<dyn EventStore>,
    publisher: Arc<dyn EventPublisher>,
    locks: StreamLocks,
    max_attempts: usize,
    clock: fn() -> OffsetDateTime,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> CommandHandler<A>
where
    A::Command: Clone,
{
    /// A handler over `store` that publishes every commit to `publisher`.
    pub fn new(store: Arc<dyn EventStore>, publisher: Arc<dyn EventPublisher>) -> Self {
        Self {
            store,
            publisher,
            locks: StreamLocks::default(),
            max_attempts: 20,
            clock: OffsetDateTime::now_utc,
            _aggregate: PhantomData,
        }
    }

    /// Run `command` on `stream`.
    ///
    /// Writers in this process take turns per stream; writers elsewhere are held off by
    /// the store's create-if-absent append, and a loser reloads and decides again, a
    /// bounded number of times with jittered backoff.
    pub async fn execute(
        &self,
        stream: &StreamId,
        command: A::Command,
        ctx: &CommandContext,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        let _turn = self.locks.lock(stream).await;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(2))
            .with_max_delay(Duration::from_millis(100))
            .with_max_times(self.max_attempts)
            .with_jitter();
        let attempt = || self.attempt(stream, command.clone(), ctx);
        match attempt
            .retry(backoff)
            .when(|e| matches!(e, Attempt::Conflict))
            .await
        {
            Ok(executed) => Ok(executed),
            Err(Attempt::Conflict) => Err(CommandError::Contention),
            Err(Attempt::Failed(e)) => Err(e),
        }
    }

    async fn load(&self, stream: &StreamId) -> Result<Loaded<A>, CommandError<A::Error>> {
        let stored = self.store.read(stream, Revision::new(1)).await?;
        let mut state = A::default();
        let mut revision = Revision::ZERO;
        let mut commits = Vec::with_capacity(stored.len());
        for s in &stored {
            let commit = Commit::<A::Event>::decode(s)?;
            for e in &commit.events {
                state.apply(e);
            }
            revision = commit.last_revision();
            commits.push(commit);
        }
        Ok(Loaded {
            state,
            revision,
            commits,
        })
    }

    async fn attempt(
        &self,
        stream: &StreamId,
        command: A::Command,
        ctx: &CommandContext,
    ) -> Result<Executed<A>, Attempt<A::Error>> {
        let loaded = self.load(stream).await.map_err(Attempt::Failed)?;
        if let Some((key, fingerprint)) = &ctx.idempotency {
            if let Some(first) = loaded.with_key(key) {
                if first.metadata.fingerprint.as_deref() != Some(fingerprint.as_str()) {
                    return Err(Attempt::Failed(CommandError::IdempotencyKeyReused));
                }
                return Ok(Executed {
                    commit: first.clone(),
                    replayed: true,
                });
            }
        }
        if let Some(expected) = ctx.expected {
            if expected != loaded.revision {
                return Err(Attempt::Failed(CommandError::RevisionMismatch {
                    expected,
                    actual: loaded.revision,
                }));
            }
        }
        let events = loaded
            .state
            .handle(command)
            .map_err(|e| Attempt::Failed(CommandError::Rejected(e)))?;
        let metadata = CommitMetadata {
            idempotency_key: ctx.idempotency.as_ref().map(|(k, _)| k.clone()),
            fingerprint: ctx.idempotency.as_ref().map(|(_, f)| f.clone()),
            request_id: ctx.request_id.clone(),
        };
        let commit = Commit::new(
            stream.clone(),
            loaded.revision.next(),
            (self.clock)(),
            events,
            metadata,
        );
        let stored = commit.encode();
        match self.store.append(&stored).await {
            Ok(()) => {}
            Err(AppendError::Conflict { .. }) => {
                tracing::debug!(%stream, revision = %commit.revision, "append conflict; reloading");
                return Err(Attempt::Conflict);
            }
            Err(AppendError::Unavailable(e)) => {
                return Err(Attempt::Failed(CommandError::Store(
                    StoreError::Unavailable(e),
                )))
            }
        }
        self.publish(&stored).await;
        Ok(Executed {
            commit,
            replayed: false,
        })
    }

    /// The fast path to projections. A failure never fails the command: the commit is
    /// durable, and projections catch up from the store.
    async fn publish(&self, stored: &StoredCommit) {
        if let Err(e) = self.publisher.publish(stored).await {
            tracing::warn!(stream = %stored.stream, revision = %stored.revision, error = %e,
                "publish failed; the commit will reach projections by catch-up");
        }
    }
}
