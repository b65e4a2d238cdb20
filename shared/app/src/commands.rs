//! Command handling: load, decide, append at the expected revision.

use crate::locks::StreamLocks;
use backon::{ExponentialBuilder, Retryable};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tally_es::{
    Aggregate, AppendError, Commit, CommitMetadata, DecodeError, EventPublisher, EventStore,
    Outbox, Revision, StoreError, StoredCommit, StreamId,
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
    /// Another writer won this revision, or the append failed in a way that leaves its
    /// outcome unknown: reload and look again.
    Conflict,
    Failed(CommandError<E>),
}

/// How a commit reaches the stream after the append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishMode {
    /// Await the publisher before answering (an in-process stream).
    Inline,
    /// Answer at once and publish in the background (a broker: a slow or absent broker
    /// never slows a command down; the outbox covers what does not get through).
    Background,
}

/// A deliberate crash, for the fault tests of the no-lost-event guarantee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Abort the process right after a successful append, before publishing.
    CrashAfterAppend,
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
    outbox: Option<Arc<dyn Outbox>>,
    publish_mode: PublishMode,
    fault: Option<Fault>,
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
            outbox: None,
            publish_mode: PublishMode::Inline,
            fault: None,
            locks: StreamLocks::default(),
            max_attempts: 20,
            clock: OffsetDateTime::now_utc,
            _aggregate: PhantomData,
        }
    }

    /// Record every commit in `outbox` before appending it, and remove it once
    /// published: a relay publishes what a crash or an outage left behind.
    pub fn with_outbox(mut self, outbox: Arc<dyn Outbox>) -> Self {
        self.outbox = Some(outbox);
        self
    }

    /// How commits are published after the append.
    pub fn with_publish_mode(mut self, mode: PublishMode) -> Self {
        self.publish_mode = mode;
        self
    }

    /// Inject `fault` (tests only).
    pub fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault;
        self
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
        let attempted = Mutex::new(Vec::new());
        let attempt = || self.attempt(stream, command.clone(), ctx, &attempted);
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
        attempted: &Mutex<Vec<String>>,
    ) -> Result<Executed<A>, Attempt<A::Error>> {
        let loaded = self.load(stream).await.map_err(Attempt::Failed)?;
        // Did an earlier attempt of ours land after all (a timeout, or a retried
        // request answered "exists")? Then that commit is our answer.
        let ours = {
            let attempted = attempted.lock().expect("attempt list poisoned");
            loaded
                .commits
                .iter()
                .rev()
                .find(|c| {
                    c.metadata
                        .commit_id
                        .as_ref()
                        .is_some_and(|id| attempted.contains(id))
                })
                .cloned()
        };
        if let Some(commit) = ours {
            self.after_append(commit.encode()).await;
            return Ok(Executed {
                commit,
                replayed: false,
            });
        }
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
        let commit_id = format!("{:032x}", fastrand::u128(..));
        attempted
            .lock()
            .expect("attempt list poisoned")
            .push(commit_id.clone());
        let metadata = CommitMetadata {
            idempotency_key: ctx.idempotency.as_ref().map(|(k, _)| k.clone()),
            fingerprint: ctx.idempotency.as_ref().map(|(_, f)| f.clone()),
            commit_id: Some(commit_id),
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
        if let Some(outbox) = &self.outbox {
            outbox
                .record(stream, commit.revision)
                .await
                .map_err(|e| Attempt::Failed(CommandError::Store(e)))?;
        }
        match self.store.append(&stored).await {
            Ok(()) => {}
            Err(AppendError::Conflict { .. }) => {
                tracing::debug!(%stream, revision = %commit.revision, "append conflict; reloading");
                return Err(Attempt::Conflict);
            }
            Err(AppendError::Unavailable(e)) => {
                // The outcome is unknown: the next attempt's load tells (and fails with
                // 503 if the store is really down).
                tracing::warn!(%stream, revision = %commit.revision, error = %e,
                    "append failed; reloading to see whether it landed");
                return Err(Attempt::Conflict);
            }
        }
        self.after_append(stored).await;
        Ok(Executed {
            commit,
            replayed: false,
        })
    }

    /// The fast path to projections. A failure never fails the command: the commit is
    /// durable, its outbox entry stays, and the relay publishes it later.
    async fn after_append(&self, stored: StoredCommit) {
        if self.fault == Some(Fault::CrashAfterAppend) {
            tracing::error!(stream = %stored.stream, revision = %stored.revision,
                "fault injection: crashing after the append, before the publish");
            std::process::abort();
        }
        let publisher = self.publisher.clone();
        let outbox = self.outbox.clone();
        let publish = async move {
            match publisher.publish(&stored).await {
                Ok(()) => {
                    if let Some(outbox) = outbox {
                        if let Err(e) = outbox.done(&stored.stream, stored.revision).await {
                            tracing::warn!(stream = %stored.stream, error = %e,
                                "outbox entry not removed; the relay will publish the commit again");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(stream = %stored.stream, revision = %stored.revision, error = %e,
                    "publish failed; the relay will publish the commit")
                }
            }
        };
        match self.publish_mode {
            PublishMode::Inline => publish.await,
            PublishMode::Background => {
                tokio::spawn(publish);
            }
        }
    }
}
