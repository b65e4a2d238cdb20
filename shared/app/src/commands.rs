//! Command handling: load, decide, append at the expected revision.

use crate::faults::{Fault, Faults};
use crate::locks::StreamLocks;
use backon::{ExponentialBuilder, Retryable};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tally_domain::{
    Account, AccountCommand, AccountError, Caller, Transfer, TransferCommand, TransferError,
};
use tally_es::{
    Aggregate, AppendError, Commit, CommitMetadata, DecodeError, EventPublisher, EventStore,
    Outbox, RecentCommits, RememberedKey, Revision, Snapshot, SnapshotStore, StoreError,
    StoredCommit, StreamId, StreamTurns, TurnsWithRecent,
};
use time::OffsetDateTime;
use tracing::Instrument;

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
    /// A revision of the stream at or before which the idempotency key cannot have
    /// been used: the key names something that came into being after the stream was
    /// seen at this revision (a transfer's steps, after its request read the account).
    /// With it the key lookup is exact however old the key is: one missed by the
    /// remembered window is looked up in the store's commits after this revision.
    /// Without it, a key older than the stream's newest [`REMEMBERED_KEYS`] keyed
    /// commands is decided again (the window clients' retries get).
    pub key_unused_through: Option<Revision>,
    /// Who asks: checked against the loaded state ([`Guard::admits`]) before anything
    /// else is decided.
    pub caller: Caller,
}

/// Who may command an aggregate. The check runs on the freshly loaded state before the
/// command, its idempotency key or its `If-Match` is looked at, so a caller that may not
/// reach a stream learns nothing of it.
pub trait Guard: Aggregate {
    /// `Ok` if `caller` may send `command` to this state; otherwise the refusal.
    fn admits(&self, caller: &Caller, command: &Self::Command) -> Result<(), Self::Error>;
}

impl Guard for Account {
    fn admits(&self, caller: &Caller, command: &AccountCommand) -> Result<(), AccountError> {
        Account::admits(self, caller, command)
    }
}

impl Guard for Transfer {
    /// A transfer's commands come from its request (checked against the debited
    /// account when it is made) and its saga: whoever reaches the function may send
    /// them.
    fn admits(&self, _: &Caller, _: &TransferCommand) -> Result<(), TransferError> {
        Ok(())
    }
}

/// A command that took effect, now or on an earlier request with the same key.
#[derive(Clone, Debug)]
pub struct Executed<A: Aggregate> {
    /// The commit that holds the command's events.
    pub commit: Commit<A::Event>,
    /// `true` if this is the stored answer to an earlier request with the same key.
    pub replayed: bool,
    /// `true` if newer commits followed this one before it was answered (an earlier
    /// attempt's commit, found after all once others had written): its balance is
    /// history, not the account's, and must not be written through to a cache.
    pub superseded: bool,
}

/// Why a command did not take effect. Nothing was written in any of these cases but
/// [`CommandError::OutcomeUnknown`].
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
    /// An append was sent but its outcome could not be learned (the store stopped
    /// answering): the command may have taken effect, or may still. Handling rule: 503
    /// with Retry-After, telling the client to retry with the same `Idempotency-Key`
    /// (which answers with the commit if it landed) or to read before retrying.
    #[error("the store stopped answering during the append: the command may or may not have taken effect ({0})")]
    OutcomeUnknown(String),
    /// A stored event could not be read. Handling rule: 500, alert.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// How many idempotency keys of a stream a snapshot remembers: a retry with a key
/// older than the newest this many keyed commands of the account is decided again.
pub const REMEMBERED_KEYS: usize = 1000;

enum Attempt<E: std::error::Error> {
    /// Another writer won this revision, or the append failed in a way that leaves its
    /// outcome unknown: reload and look again.
    Conflict,
    Failed(CommandError<E>),
}

/// A command's turn on its stream among processes (see
/// [`CommandHandler::with_stream_turns`]).
struct SharedTurn {
    /// What to give it back with.
    token: String,
    /// With [`TurnsWithRecent`]: the warm state's revision and what the recent commits
    /// held after it as the turn was taken; the first load takes it.
    read: Mutex<Option<(Revision, Option<Vec<StoredCommit>>)>>,
    /// With [`TurnsWithRecent`]: the commit appended during the turn, remembered as the
    /// turn is given back.
    handed: Mutex<Option<StoredCommit>>,
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

/// The name of the outbox entry of an append attempt: its commit id.
fn attempt_of(metadata: &CommitMetadata) -> &str {
    metadata.commit_id.as_deref().unwrap_or_default()
}

/// How many attempts of one command may decide on a warm state caught up through the
/// [`RecentCommits`] rather than read from the store: the first, and the retries after
/// losing a race (the winner's commit is usually in the record by then). Past these,
/// and after an append whose outcome is unknown, an attempt reads the store.
const RECENT_ATTEMPTS: usize = 3;
/// After a lost race, how many times (and how long apart) the [`RecentCommits`] are
/// asked again for the winner's commit before the store is read.
const RECENT_WAITS: usize = 4;
const RECENT_WAIT: Duration = Duration::from_millis(5);

/// How long a command waits for its stream's turn among processes (see
/// [`CommandHandler::with_stream_turns`]) before it goes ahead without.
const TURN_PATIENCE: Duration = Duration::from_secs(3);

/// How many streams a handler keeps warm (their state after the last command).
const WARM_STREAMS: usize = 4096;
/// A warm stream keeps at most this many decoded commits; older ones are folded into
/// its remembered keys, as a snapshot does.
const WARM_COMMITS: usize = 256;

/// The state of one stream as loaded from the store.
#[derive(Clone)]
struct Loaded<A: Aggregate> {
    state: A,
    revision: Revision,
    /// The commits after `commits_from` (read, or appended by this process), shared:
    /// a command clones its stream's warm state (and puts it back), which with the
    /// commits themselves cost a deep copy of up to [`WARM_COMMITS`] commits each time.
    commits: Vec<Arc<Commit<A::Event>>>,
    /// The revision before the first of `commits`: the snapshot's, or where the warm
    /// state was last folded.
    commits_from: Revision,
    /// The revision of the stored snapshot this state started from (zero without one).
    snapshot_revision: Revision,
    /// Idempotency keys of commits up to `commits_from` (shared, as `commits`).
    remembered: Arc<Vec<RememberedKey>>,
    /// Another process wrote this stream lately: ask the store what came after this
    /// state before the next command instead of trusting it (cleared once a read finds
    /// nothing new).
    shared: bool,
}

/// What a command comes to before the append.
enum Decided<A: Aggregate> {
    /// Answer without appending.
    Answer(Executed<A>),
    /// Append this commit.
    Append(Commit<A::Event>),
}

/// Where an idempotency key was found.
enum KeyHit<'a, E> {
    Commit(&'a Commit<E>),
    Remembered(&'a RememberedKey),
}

impl<A: Aggregate> Loaded<A> {
    /// Apply the stored commits that follow this state.
    fn extend(&mut self, stored: &[StoredCommit]) -> Result<(), tally_es::DecodeError> {
        for s in stored {
            let commit = Commit::<A::Event>::decode(s)?;
            self.push(commit);
        }
        Ok(())
    }

    fn push(&mut self, commit: Commit<A::Event>) {
        for e in &commit.events {
            self.state.apply(e);
        }
        self.revision = commit.last_revision();
        self.commits.push(Arc::new(commit));
    }

    /// Fold the decoded commits into remembered keys once there are many of them.
    fn fold(&mut self) {
        if self.commits.len() <= WARM_COMMITS {
            return;
        }
        let last = self.commits.pop().expect("commits");
        self.remembered = Arc::new(self.keys_after(&last, REMEMBERED_KEYS));
        self.commits.clear();
        self.commits_from = self.revision;
    }

    fn with_key(&self, key: &str) -> Option<KeyHit<'_, A::Event>> {
        if let Some(c) = self
            .commits
            .iter()
            .rev()
            .find(|c| c.metadata.idempotency_key.as_deref() == Some(key))
        {
            return Some(KeyHit::Commit(c.as_ref()));
        }
        self.remembered
            .iter()
            .rev()
            .find(|r| r.key == key)
            .map(KeyHit::Remembered)
    }

    /// Whether every idempotency key of the commits after `horizon` is in memory: in
    /// the decoded commits, or in the remembered keys (which drop the oldest first, and
    /// only once there are [`REMEMBERED_KEYS`] of them).
    fn knows_keys_after(&self, horizon: Revision) -> bool {
        horizon >= self.commits_from
            || self.remembered.len() < REMEMBERED_KEYS
            || self
                .remembered
                .first()
                .is_some_and(|oldest| oldest.revision <= horizon.next())
    }

    /// The keys to remember in a snapshot taken after `commit`: the newest `keep`.
    fn keys_after(&self, commit: &Commit<A::Event>, keep: usize) -> Vec<RememberedKey> {
        let mut keys = self.remembered.as_ref().clone();
        for c in self
            .commits
            .iter()
            .map(Arc::as_ref)
            .chain(std::iter::once(commit))
        {
            if let Some(key) = &c.metadata.idempotency_key {
                keys.push(RememberedKey {
                    key: key.clone(),
                    fingerprint: c.metadata.fingerprint.clone(),
                    revision: c.revision,
                });
            }
        }
        let excess = keys.len().saturating_sub(keep);
        keys.drain(..excess);
        keys
    }
}

/// Now, to the microsecond: commit times are recorded at the precision PostgreSQL
/// keeps, so a time index in the read model and the store agree to the last digit (an
/// as-of balance at a commit's own time finds that commit in both).
pub fn now_to_the_microsecond() -> OffsetDateTime {
    floor_to_the_microsecond(OffsetDateTime::now_utc())
}

/// `t` without its nanoseconds below the microsecond.
pub fn floor_to_the_microsecond(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

/// Runs commands of aggregate `A` against an event store.
pub struct CommandHandler<A: Aggregate> {
    store: Arc<dyn EventStore>,
    publisher: Arc<dyn EventPublisher>,
    outbox: Option<Arc<dyn Outbox>>,
    snapshots: Option<(Arc<dyn SnapshotStore>, u64)>,
    publish_mode: PublishMode,
    faults: Faults,
    locks: StreamLocks,
    /// Streams loaded recently: the next command on one reads only the commits after
    /// it (one LIST when nothing changed). An optimisation only: the conditional append
    /// still decides, and a loser reloads.
    warm: Mutex<lru::LruCache<StreamId, Loaded<A>>>,
    max_attempts: usize,
    /// Whether a first attempt may decide on a warm state without reading the store
    /// (see [`CommandHandler::with_trusted_warm_streams`]).
    trust_warm: bool,
    /// Where other processes' newest commits are found without reading the store (see
    /// [`CommandHandler::with_recent_commits`]).
    recent: Option<Arc<dyn RecentCommits>>,
    /// Turn-taking per stream with other processes (see
    /// [`CommandHandler::with_stream_turns`]).
    turns: Option<Arc<dyn StreamTurns>>,
    /// The same turns and recent commits as one, whose turns are taken and given back
    /// with the record in one round trip each (see
    /// [`CommandHandler::with_turns_and_recent`]).
    handover: Option<Arc<dyn TurnsWithRecent>>,
    clock: fn() -> OffsetDateTime,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Guard> CommandHandler<A>
where
    A::Command: Clone,
{
    /// A handler over `store` that publishes every commit to `publisher`.
    pub fn new(store: Arc<dyn EventStore>, publisher: Arc<dyn EventPublisher>) -> Self {
        Self {
            store,
            publisher,
            outbox: None,
            snapshots: None,
            publish_mode: PublishMode::Inline,
            faults: Faults::NONE,
            locks: StreamLocks::default(),
            warm: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(WARM_STREAMS).expect("non-zero"),
            )),
            max_attempts: 20,
            trust_warm: false,
            recent: None,
            turns: None,
            handover: None,
            clock: now_to_the_microsecond,
            _aggregate: PhantomData,
        }
    }

    /// Record every commit in `outbox` before appending it, and remove it once
    /// published: a relay publishes what a crash or an outage left behind.
    pub fn with_outbox(mut self, outbox: Arc<dyn Outbox>) -> Self {
        self.outbox = Some(outbox);
        self
    }

    /// Keep a snapshot in `store` every `every` revisions (if the aggregate supports
    /// snapshots), and load from the newest one. Snapshots remember the last
    /// [`REMEMBERED_KEYS`] idempotency keys of the stream.
    pub fn with_snapshots(mut self, store: Arc<dyn SnapshotStore>, every: u64) -> Self {
        if every > 0 && A::SNAPSHOT_SCHEMA.is_some() {
            self.snapshots = Some((store, every));
        }
        self
    }

    /// How commits are published after the append.
    pub fn with_publish_mode(mut self, mode: PublishMode) -> Self {
        self.publish_mode = mode;
        self
    }

    /// Let a command's first attempt decide on a warm stream without asking the store
    /// what came after it (no LIST per command), for a process that is the only writer
    /// of its streams — `make dev`'s gateway. Only an append may be decided on such a
    /// state (the conditional create checks it); a conflict marks the stream shared and
    /// it is read first until a read finds nothing new. Where other processes write the
    /// same streams (one function per command), a failed append costs more than the
    /// read it saves: leave it off there.
    pub fn with_trusted_warm_streams(mut self, trust: bool) -> Self {
        self.trust_warm = trust;
        self
    }

    /// Catch warm streams up through `recent` instead of the store, and remember every
    /// commit there: for processes that share their streams with others (one function
    /// per command), where a warm state is often a commit or two behind. An attempt
    /// decides on the warm state plus what `recent` holds after it, without reading the
    /// store, as [`CommandHandler::with_trusted_warm_streams`] does — up to
    /// [`RECENT_ATTEMPTS`] attempts, since a loser of a race usually finds the winner's
    /// commit there. Where `recent` cannot tell (no record, a hole, Redis down), the
    /// store is read as without it.
    pub fn with_recent_commits(mut self, recent: Arc<dyn RecentCommits>) -> Self {
        self.recent = Some(recent);
        self
    }

    /// Take turns per stream with the other processes that write it (`turns`), as
    /// writers in this process take turns: a command waits (up to [`TURN_PATIENCE`])
    /// for the one before it to append and put its commit in the recent commits, then
    /// decides on that instead of losing the race to it — a lost race costs a failed
    /// append and a retry. The turn is held from before the load to after the commit
    /// is remembered. A fast path only: the store's conditional create decides, and a
    /// command that cannot have its turn goes ahead without.
    pub fn with_stream_turns(mut self, turns: Arc<dyn StreamTurns>) -> Self {
        self.turns = Some(turns);
        self
    }

    /// [`CommandHandler::with_recent_commits`] and [`CommandHandler::with_stream_turns`]
    /// on one record that keeps both (Redis: `tally_redis::RecentInRedis`), which a
    /// command then reaches one round trip fewer each way: its turn comes with what the
    /// record holds after its warm state, and its commit is remembered as it gives the
    /// turn back (still before the next holder can take it).
    pub fn with_turns_and_recent<T: TurnsWithRecent>(mut self, both: Arc<T>) -> Self {
        self.recent = Some(both.clone());
        self.turns = Some(both.clone());
        self.handover = Some(both);
        self
    }

    /// Inject `faults` (tests only; see [`crate::faults`]).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
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
        let _turn = self
            .locks
            .lock(stream)
            .instrument(tracing::debug_span!("command.turn"))
            .await;
        let shared_turn = self
            .take_turn(stream)
            .instrument(tracing::debug_span!("command.shared_turn"))
            .await;
        let turn = shared_turn.as_ref();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(2))
            .with_max_delay(Duration::from_millis(100))
            .with_max_times(self.max_attempts)
            .with_jitter();
        let attempted = Mutex::new(Vec::new());
        let unknown = AtomicBool::new(false);
        let attempt = || self.attempt(stream, command.clone(), ctx, &attempted, &unknown, turn);
        let outcome = match attempt
            .retry(backoff)
            .when(|e| matches!(e, Attempt::Conflict))
            .await
        {
            Ok(executed) => Ok(executed),
            Err(Attempt::Conflict) => {
                // Out of attempts; one of them may still have landed ambiguously.
                async {
                    let (loaded, _) = self.load(stream, false, false, None).await?;
                    match self.find_ours(stream, &loaded, &attempted).await? {
                        Some(commit) => Ok(self.adopt(commit, &loaded, turn).await),
                        None => Err(CommandError::Contention),
                    }
                }
                .await
            }
            Err(Attempt::Failed(e)) => Err(e),
        };
        if let Some(turn) = shared_turn {
            self.give_turn_back(stream, turn).await;
        }
        match outcome {
            // An append whose answer never came may still land: "nothing was written"
            // would be a lie, and a retry without the key would apply it twice.
            Err(
                e @ (CommandError::Store(StoreError::Unavailable(_)) | CommandError::Contention),
            ) if unknown.load(Ordering::SeqCst) => Err(CommandError::OutcomeUnknown(e.to_string())),
            other => other,
        }
    }

    /// The stream's turn among processes, if turns are taken and it could be had within
    /// [`TURN_PATIENCE`]; with [`TurnsWithRecent`] and a warm state, together with what
    /// the recent commits hold after it.
    async fn take_turn(&self, stream: &StreamId) -> Option<SharedTurn> {
        let warm = || {
            self.warm
                .lock()
                .expect("warm streams poisoned")
                .peek(stream)
                .map(|loaded| loaded.revision)
        };
        let (token, read) = match (&self.handover, &self.turns) {
            (Some(both), _) => match warm() {
                Some(after) => {
                    let (token, found) = both.take_reading(stream, TURN_PATIENCE, after).await?;
                    (token, Some((after, found)))
                }
                None => (both.take(stream, TURN_PATIENCE).await?, None),
            },
            (None, Some(turns)) => (turns.take(stream, TURN_PATIENCE).await?, None),
            (None, None) => return None,
        };
        Some(SharedTurn {
            token,
            read: Mutex::new(read),
            handed: Mutex::new(None),
        })
    }

    /// Give `turn` back, remembering the commit it handed over first if there is one.
    async fn give_turn_back(&self, stream: &StreamId, turn: SharedTurn) {
        let handed = turn.handed.into_inner().expect("turn poisoned");
        match (&self.handover, &self.turns) {
            (Some(both), _) => {
                both.remember_giving_back(stream, &turn.token, handed.as_ref())
                    .await
            }
            (None, Some(turns)) => turns.give_back(stream, &turn.token).await,
            (None, None) => {}
        }
    }

    /// The state of `stream` read from the store now, as a command finds it with
    /// nothing warm: the newest usable snapshot and every commit after it, decoded and
    /// applied. Returns the state and its revision. For tools and benchmarks; commands
    /// load through their warm streams.
    pub async fn load_from_store(
        &self,
        stream: &StreamId,
    ) -> Result<(A, Revision), CommandError<A::Error>> {
        let loaded = self.load_cold(stream).await?;
        Ok((loaded.state, loaded.revision))
    }

    /// The commit one of our earlier attempts wrote, if one landed after all (its
    /// append timed out, or a retried request was answered "exists"). Looks in the
    /// loaded commits, and in the store for attempts a snapshot has since covered.
    async fn find_ours(
        &self,
        stream: &StreamId,
        loaded: &Loaded<A>,
        attempted: &Mutex<Vec<(String, Revision)>>,
    ) -> Result<Option<Commit<A::Event>>, CommandError<A::Error>> {
        let attempts = attempted.lock().expect("attempt list poisoned").clone();
        for (id, revision) in attempts.iter().rev() {
            let is_ours = |c: &Commit<A::Event>| c.metadata.commit_id.as_deref() == Some(id);
            if *revision > loaded.commits_from {
                if let Some(c) = loaded.commits.iter().find(|c| c.revision == *revision) {
                    if is_ours(c) {
                        return Ok(Some(c.as_ref().clone()));
                    }
                }
            } else if let Some(found) = self.store.read_commit(stream, *revision).await? {
                let commit = Commit::decode(&found)?;
                if is_ours(&commit) {
                    return Ok(Some(commit));
                }
            }
        }
        Ok(None)
    }

    /// An earlier attempt's commit that landed after all: publish it and answer with it.
    /// `loaded` is the state it was found in: commits past it make it superseded.
    async fn adopt(
        &self,
        commit: Commit<A::Event>,
        loaded: &Loaded<A>,
        turn: Option<&SharedTurn>,
    ) -> Executed<A> {
        self.after_append(commit.encode(), turn).await;
        let superseded = loaded.revision > commit.last_revision();
        Executed {
            commit,
            replayed: false,
            superseded,
        }
    }

    /// The newest usable snapshot: of this aggregate's schema, and readable.
    async fn snapshot(&self, stream: &StreamId) -> Option<(A, Revision, Vec<RememberedKey>)> {
        let (store, _) = self.snapshots.as_ref()?;
        crate::history::usable_snapshot(store.as_ref(), stream).await
    }

    /// The stream's state: the warm state plus what came after it, or a cold load.
    /// With `trust_warm`, a warm state is taken as it is, or caught up through the
    /// [`RecentCommits`], without asking the store what came after it; the second value
    /// says whether the store was read. `lost_race`: an earlier attempt lost the
    /// append on the warm state (so a record with nothing after it is stale). A decision
    /// on an unverified state may only end in an append, which the store's conditional
    /// create checks (a stale state loses the race and reloads). `turn`: the command's
    /// turn, which may come with the record's answer for the warm state (read once).
    async fn load(
        &self,
        stream: &StreamId,
        trust_warm: bool,
        lost_race: bool,
        turn: Option<&SharedTurn>,
    ) -> Result<(Loaded<A>, bool), CommandError<A::Error>> {
        let warm = self
            .warm
            .lock()
            .expect("warm streams poisoned")
            .get(stream)
            .cloned();
        if let (Some(loaded), Some(recent), true) = (&warm, &self.recent, trust_warm) {
            // After an append on this very state lost, the winner's commit is due in
            // the record: its writer puts it there right after its own append, which
            // may still be on its way. Ask again a few times before reading the store.
            let read_with_turn = turn
                .and_then(|t| t.read.lock().expect("turn poisoned").take())
                .filter(|(after, _)| *after == loaded.revision && !lost_race);
            let mut found = match read_with_turn {
                Some((_, found)) => found,
                None => recent.after(stream, loaded.revision).await,
            };
            for _ in 0..RECENT_WAITS {
                if !(lost_race && found.as_ref().is_some_and(Vec::is_empty)) {
                    break;
                }
                tokio::time::sleep(RECENT_WAIT).await;
                found = recent.after(stream, loaded.revision).await;
            }
            // Still nothing newer after a lost race: the record missed the winner's
            // commit; read the store.
            match found {
                Some(newer) if newer.is_empty() && !lost_race => {
                    return Ok((loaded.clone(), false));
                }
                Some(newer) if !newer.is_empty() => {
                    let mut caught_up = loaded.clone();
                    if caught_up.extend(&newer).is_ok() {
                        self.keep_warm(stream, caught_up.clone());
                        return Ok((caught_up, false));
                    }
                }
                _ => {}
            }
        }
        let loaded = match warm {
            Some(loaded) if trust_warm && !loaded.shared && self.recent.is_none() => {
                return Ok((loaded, false))
            }
            Some(mut loaded) => {
                let newer = self.store.read_after(stream, loaded.revision).await?;
                if newer.is_empty() && !loaded.shared {
                    // The warm copy is this very state: nothing to put back.
                    return Ok((loaded, true));
                }
                loaded.shared = !newer.is_empty();
                loaded.extend(&newer)?;
                loaded
            }
            None => self.load_cold(stream).await?,
        };
        self.keep_warm(stream, loaded.clone());
        Ok((loaded, true))
    }

    fn keep_warm(&self, stream: &StreamId, mut loaded: Loaded<A>) {
        loaded.fold();
        self.warm
            .lock()
            .expect("warm streams poisoned")
            .put(stream.clone(), loaded);
    }

    /// The newest snapshot and every commit after it.
    async fn load_cold(&self, stream: &StreamId) -> Result<Loaded<A>, CommandError<A::Error>> {
        let (mut state, mut revision, mut remembered) = self
            .snapshot(stream)
            .await
            .unwrap_or_else(|| (A::default(), Revision::ZERO, Vec::new()));
        // Without a snapshot, from the start with `read_after`: the same commits, and on
        // S3 a new stream (every open, every transfer's request) costs a GET of its first
        // key where `read` lists its keys.
        let mut stored = if revision == Revision::ZERO {
            self.store.read_after(stream, revision).await?
        } else {
            self.store.read(stream, revision.next()).await?
        };
        if stored
            .first()
            .is_some_and(|c| c.revision != revision.next())
        {
            // The snapshot does not end on a commit boundary: not ours; replay.
            tracing::warn!(%stream, %revision, "snapshot off a commit boundary; replaying the stream");
            (state, revision, remembered) = (A::default(), Revision::ZERO, Vec::new());
            stored = self.store.read(stream, Revision::new(1)).await?;
        }
        let mut loaded = Loaded {
            state,
            revision,
            commits: Vec::with_capacity(stored.len()),
            commits_from: revision,
            snapshot_revision: revision,
            remembered: Arc::new(remembered),
            shared: false,
        };
        loaded.extend(&stored)?;
        Ok(loaded)
    }

    /// After an append: keep a snapshot if the commit crossed a multiple of `every`.
    /// Returns whether it took one.
    fn maybe_snapshot(&self, loaded: &Loaded<A>, commit: &Commit<A::Event>) -> bool {
        let Some((store, every)) = &self.snapshots else {
            return false;
        };
        let last = commit.last_revision();
        if last.get() / every == loaded.revision.get() / every
            && last.get() - loaded.snapshot_revision.get() < 2 * every
        {
            return false;
        }
        let mut state = loaded.state.clone();
        for e in &commit.events {
            state.apply(e);
        }
        let (Some(schema), Some(value)) = (A::SNAPSHOT_SCHEMA, state.to_snapshot()) else {
            return false;
        };
        let snapshot = Snapshot {
            stream: commit.stream.clone(),
            revision: last,
            schema: schema.to_owned(),
            state: value,
            idempotency: loaded.keys_after(commit, REMEMBERED_KEYS),
            taken_at: (self.clock)(),
        };
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.save(&snapshot).await {
                tracing::warn!(stream = %snapshot.stream, revision = %snapshot.revision, error = %e,
                    "snapshot not saved; loads replay a little more");
            }
        });
        true
    }

    /// One attempt: load, decide, and append if the decision is to append. With
    /// trusted warm streams, the first attempt decides on a warm state without reading
    /// the store; anything but an append decided on it — a refusal, an idempotent
    /// replay, a revision mismatch — is decided again on a fresh read, since only an
    /// append is checked by the store.
    async fn attempt(
        &self,
        stream: &StreamId,
        command: A::Command,
        ctx: &CommandContext,
        attempted: &Mutex<Vec<(String, Revision)>>,
        unknown: &AtomicBool,
        turn: Option<&SharedTurn>,
    ) -> Result<Executed<A>, Attempt<A::Error>> {
        let tries = attempted.lock().expect("attempt list poisoned").len();
        let trust = if self.recent.is_some() {
            tries < RECENT_ATTEMPTS && !unknown.load(Ordering::SeqCst)
        } else {
            self.trust_warm && tries == 0
        };
        let (mut loaded, verified) = self
            .load(stream, trust, tries > 0, turn)
            .instrument(tracing::debug_span!("command.load"))
            .await
            .map_err(Attempt::Failed)?;
        let mut decided = self
            .decide(stream, &loaded, command.clone(), ctx, attempted, turn)
            .await;
        if !verified && !matches!(decided, Ok(Decided::Append(_))) {
            (loaded, _) = self
                .load(stream, false, false, None)
                .await
                .map_err(Attempt::Failed)?;
            decided = self
                .decide(stream, &loaded, command, ctx, attempted, turn)
                .await;
        }
        let commit = match decided? {
            Decided::Answer(executed) => return Ok(executed),
            Decided::Append(commit) => commit,
        };
        let stored = commit.encode();
        if let Some(outbox) = &self.outbox {
            outbox
                .record(stream, commit.revision, attempt_of(&commit.metadata))
                .instrument(tracing::debug_span!("command.outbox_record"))
                .await
                .map_err(|e| Attempt::Failed(CommandError::Store(e)))?;
        }
        match self
            .store
            .append(&stored)
            .instrument(tracing::debug_span!("command.append"))
            .await
        {
            Ok(()) => {}
            Err(AppendError::Conflict { .. }) => {
                tracing::debug!(%stream, revision = %commit.revision, "append conflict; reloading");
                if let Some(outbox) = &self.outbox {
                    // Another writer's commit holds this revision (its own entry covers
                    // it): ours never landed, and its entry has nothing to publish.
                    let forgotten = outbox
                        .done(stream, commit.revision, attempt_of(&commit.metadata))
                        .await;
                    if let Err(e) = forgotten {
                        tracing::debug!(%stream, error = %e, "the lost attempt's outbox entry stays for the relay");
                    }
                }
                if !verified {
                    // Another process writes this stream too: read before deciding
                    // until a read finds nothing new (a failed append costs more than
                    // a read).
                    if let Some(warm) = self
                        .warm
                        .lock()
                        .expect("warm streams poisoned")
                        .get_mut(stream)
                    {
                        warm.shared = true;
                    }
                }
                return Err(Attempt::Conflict);
            }
            Err(AppendError::Unavailable(e)) => {
                // The outcome is unknown: the next attempt's load tells (and fails with
                // 503 if the store is really down).
                tracing::warn!(%stream, revision = %commit.revision, error = %e,
                    "append failed; reloading to see whether it landed");
                unknown.store(true, Ordering::SeqCst);
                return Err(Attempt::Conflict);
            }
        }
        let snapshotted = self.maybe_snapshot(&loaded, &commit);
        let mut after = loaded;
        after.push(commit.clone());
        if snapshotted {
            after.snapshot_revision = after.revision;
        }
        self.keep_warm(stream, after);
        self.after_append(stored, turn).await;
        Ok(Executed {
            commit,
            replayed: false,
            superseded: false,
        })
    }

    /// What `command` comes to against `loaded`: an answer without an append (an
    /// earlier attempt of ours landed, or the idempotency key was used before), or the
    /// commit to append.
    async fn decide(
        &self,
        stream: &StreamId,
        loaded: &Loaded<A>,
        command: A::Command,
        ctx: &CommandContext,
        attempted: &Mutex<Vec<(String, Revision)>>,
        turn: Option<&SharedTurn>,
    ) -> Result<Decided<A>, Attempt<A::Error>> {
        loaded
            .state
            .admits(&ctx.caller, &command)
            .map_err(|e| Attempt::Failed(CommandError::Rejected(e)))?;
        // Did an earlier attempt of ours land after all? Then that commit is our answer.
        let ours = self
            .find_ours(stream, loaded, attempted)
            .await
            .map_err(Attempt::Failed)?;
        if let Some(commit) = ours {
            return Ok(Decided::Answer(self.adopt(commit, loaded, turn).await));
        }
        let honour_keys = !self.faults.has(Fault::ApplyRetriesTwice);
        if let Some((key, fingerprint)) = ctx.idempotency.as_ref().filter(|_| honour_keys) {
            let first = match loaded.with_key(key) {
                None => match ctx.key_unused_through {
                    Some(horizon) if !loaded.knows_keys_after(horizon) => self
                        .find_key_after(stream, horizon, key)
                        .await
                        .map_err(Attempt::Failed)?
                        .map(|c| (c.metadata.fingerprint.clone(), c)),
                    _ => None,
                },
                Some(KeyHit::Commit(c)) => Some((c.metadata.fingerprint.clone(), c.clone())),
                Some(KeyHit::Remembered(r)) => {
                    let commit = self
                        .commit_at(stream, r.revision)
                        .await
                        .map_err(Attempt::Failed)?;
                    Some((r.fingerprint.clone(), commit))
                }
            };
            if let Some((first_fingerprint, commit)) = first {
                if first_fingerprint.as_deref() != Some(fingerprint.as_str()) {
                    return Err(Attempt::Failed(CommandError::IdempotencyKeyReused));
                }
                return Ok(Decided::Answer(Executed {
                    commit,
                    replayed: true,
                    superseded: false,
                }));
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
            .push((commit_id.clone(), loaded.revision.next()));
        let metadata = CommitMetadata {
            idempotency_key: ctx.idempotency.as_ref().map(|(k, _)| k.clone()),
            fingerprint: ctx.idempotency.as_ref().map(|(_, f)| f.clone()),
            commit_id: Some(commit_id),
            request_id: ctx.request_id.clone(),
        };
        Ok(Decided::Append(Commit::new(
            stream.clone(),
            loaded.revision.next(),
            (self.clock)(),
            events,
            metadata,
        )))
    }

    /// The commit after `horizon` made with idempotency key `key`, read from the store:
    /// for a key older than the remembered window whose caller knows it was not used
    /// at or before `horizon` (rare: a transfer step retried after more keyed commands
    /// than the window holds).
    async fn find_key_after(
        &self,
        stream: &StreamId,
        horizon: Revision,
        key: &str,
    ) -> Result<Option<Commit<A::Event>>, CommandError<A::Error>> {
        let stored = self.store.read_after(stream, horizon).await?;
        tracing::info!(%stream, %horizon, commits = stored.len(),
            "idempotency key older than the remembered window: looking it up in the store");
        stored
            .iter()
            .find(|c| c.metadata.idempotency_key.as_deref() == Some(key))
            .map(Commit::decode)
            .transpose()
            .map_err(CommandError::from)
    }

    /// The commit that starts at `revision` (an answer remembered by a snapshot).
    async fn commit_at(
        &self,
        stream: &StreamId,
        revision: Revision,
    ) -> Result<Commit<A::Event>, CommandError<A::Error>> {
        let found = self
            .store
            .read_commit(stream, revision)
            .await?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("{stream}: no commit at revision {revision}"))
            })?;
        Ok(Commit::decode(&found)?)
    }

    /// The fast path to projections. A failure never fails the command: the commit is
    /// durable, its outbox entry stays, and the relay publishes it later. The commit is
    /// remembered in the recent commits now, or — with [`TurnsWithRecent`] and the
    /// stream's turn held — as the turn is given back.
    async fn after_append(&self, stored: StoredCommit, turn: Option<&SharedTurn>) {
        if self.faults.has(Fault::CrashAfterAppend) {
            tracing::error!(stream = %stored.stream, revision = %stored.revision,
                "fault injection: crashing after the append, before the publish");
            std::process::abort();
        }
        match (turn, &self.handover, &self.recent) {
            (Some(turn), Some(_), _) => {
                *turn.handed.lock().expect("turn poisoned") = Some(stored.clone());
            }
            (_, _, Some(recent)) => recent.remember(&stored).await,
            _ => {}
        }
        let publisher = self.publisher.clone();
        let outbox = self.outbox.clone();
        let attempt = attempt_of(&stored.metadata).to_owned();
        let faults = self.faults;
        let publish = async move {
            if faults.has(Fault::DelayPublish) {
                tokio::time::sleep(crate::faults::PUBLISH_DELAY).await;
            }
            if faults.has(Fault::SkipPublish) {
                tracing::error!(stream = %stored.stream, revision = %stored.revision,
                    "fault injection: this commit is not published");
                if let Some(outbox) = outbox {
                    let _ = outbox.done(&stored.stream, stored.revision, &attempt).await;
                }
                return;
            }
            let published = publisher
                .publish(&stored)
                .instrument(tracing::debug_span!("command.publish"))
                .await;
            match published {
                Ok(()) => {
                    if let Some(outbox) = outbox {
                        let done = outbox
                            .done(&stored.stream, stored.revision, &attempt)
                            .instrument(tracing::debug_span!("command.outbox_done"))
                            .await;
                        if let Err(e) = done {
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
