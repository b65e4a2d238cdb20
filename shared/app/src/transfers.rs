//! Transfers: the request, the view, and the saga that moves the money.
//!
//! A transfer is its own stream (`transfer.{id}`, [`tally_domain::Transfer`]). The saga
//! drives it step by step: each step is an ordinary account command (a debit on `from`,
//! a credit on `to`, or the refund of the debit) whose idempotency key is derived from
//! the transfer and the step, and whose outcome is then appended to the transfer's
//! stream at the revision the saga read. So:
//!
//! * a step retried after a crash, or run twice by two workers, applies once: the
//!   second run of an account command finds its key and answers with the first commit —
//!   however many commands the account took since, because the request recorded the
//!   revisions the accounts had reached and the key is looked up exactly after them
//!   ([`CommandContext::key_unused_through`]), not only in the remembered window;
//! * two workers never both record a step: the second append loses the race, reloads,
//!   and finds the step done;
//! * no lock is ever held across accounts: transfers in both directions between two
//!   accounts, or many on one hot account, are ordinary commands on each.
//!
//! The saga is started by the transfer's commits on the stream ([`Saga::run`]), and a
//! sweep ([`Saga::sweep`]) drives any transfer left pending past a deadline (a commit
//! that never reached the stream, a step that kept failing while a backend was down).

use crate::commands::{CommandContext, CommandError, CommandHandler};
use crate::faults::{Fault, Faults};
use crate::ports::CachedBalance;
use crate::queries::Queries;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_domain::{
    Account, AccountCommand, AccountId, Amount, Caller, Currency, Reference, Transfer,
    TransferCommand, TransferError, TransferEvent, TransferFailure, TransferId, TransferStatus,
};
use tally_es::{
    Aggregate, Commit, Delivery, EventStore, Revision, StoreError, StoredCommit, Subscription,
};
use time::OffsetDateTime;

/// How many transfers one saga process drives at once from its stream (or a Lambda
/// batch). Distinct transfers share nothing but their accounts, whose commands take
/// turns per account.
pub const DRIVEN_AT_ONCE: usize = 32;

/// How many ended transfers a saga process remembers, so that its sweeps skip them: a
/// bound on its memory (about 100 bytes each), not on correctness.
const REMEMBERED_ENDS: usize = 100_000;

/// How many transfer streams a process keeps in memory, decoded (a few commits each),
/// so that reading one again — a client polling `GET /transfers/{id}`, each pass of
/// the saga — asks the store only for what came after.
const REMEMBERED_TRANSFERS: usize = 4_096;

/// A transfer stream's commits, as far as this process has read them.
type KnownCommits = Arc<Vec<Commit<TransferEvent>>>;

/// How long a request waits for the accounts' revisions before recording zero.
const SEEN_WITHIN: Duration = Duration::from_secs(2);

/// One step of a transfer as it was recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferStep {
    /// `requested`, `debited`, `failed`, `credited`, `credit-refused` or `reversed`.
    pub name: &'static str,
    /// The account the step touched, and the revision it produced there.
    pub account: Option<(AccountId, Revision)>,
    pub at: OffsetDateTime,
}

/// A transfer as its stream tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferView {
    pub id: TransferId,
    pub state: Transfer,
    /// The transfer stream's revision.
    pub revision: Revision,
    pub steps: Vec<TransferStep>,
}

impl TransferView {
    /// The transfer folded from its stream's commits; `None` for an empty stream.
    pub fn fold(id: TransferId, commits: &[Commit<TransferEvent>]) -> Option<Self> {
        let mut state = Transfer::default();
        let mut steps = Vec::new();
        let mut revision = Revision::ZERO;
        for commit in commits {
            for (r, event) in commit.numbered() {
                state.apply(event);
                revision = r;
                let (name, account) = match event {
                    TransferEvent::Requested { .. } => ("requested", None),
                    TransferEvent::Debited { revision } => {
                        ("debited", state.from.clone().map(|a| (a, *revision)))
                    }
                    TransferEvent::Failed { .. } => ("failed", None),
                    TransferEvent::Credited { revision } => {
                        ("credited", state.to.clone().map(|a| (a, *revision)))
                    }
                    TransferEvent::CreditRefused { .. } => ("credit-refused", None),
                    TransferEvent::Reversed { revision } => {
                        ("reversed", state.from.clone().map(|a| (a, *revision)))
                    }
                };
                steps.push(TransferStep {
                    name,
                    account,
                    at: commit.recorded_at,
                });
            }
        }
        (revision > Revision::ZERO).then_some(Self {
            id,
            state,
            revision,
            steps,
        })
    }

    /// When the last step was recorded.
    pub fn updated_at(&self) -> Option<OffsetDateTime> {
        self.steps.last().map(|s| s.at)
    }
}

/// What a transfer request asks.
#[derive(Clone, Debug)]
pub struct TransferRequest {
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    /// Sealed under the debited account holder's key by the caller.
    pub reference: Option<Reference>,
}

impl TransferRequest {
    /// What describes the request for `Idempotency-Key` reuse detection. Not the
    /// reference: the fingerprint is stored in the clear, and a retry seals the
    /// reference afresh.
    fn fingerprint(&self) -> String {
        format!("transfer {} {} {}", self.from, self.to, self.amount.minor(),)
    }
}

/// Why a transfer request or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferRequestError {
    #[error(transparent)]
    Command(#[from] CommandError<TransferError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Decode(#[from] tally_es::DecodeError),
}

/// Why the saga could not drive a transfer to its end now (it stays pending; the next
/// delivery or sweep tries again).
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error("account step: {0}")]
    Account(String),
    #[error("transfer stream: {0}")]
    Transfer(String),
    #[error("{0}")]
    Read(#[from] TransferRequestError),
}

/// The transfer service: requests, reads, and the saga.
#[derive(Clone)]
pub struct Saga {
    accounts: Arc<CommandHandler<Account>>,
    transfers: Arc<CommandHandler<Transfer>>,
    store: Arc<dyn EventStore>,
    queries: Queries,
    /// The currency of the accounts' balances (for the cache).
    currency: Currency,
    /// Transfers this process is driving now: a second trigger leaves it to the first.
    driving: Arc<Mutex<HashSet<TransferId>>>,
    /// Transfers known to have ended, the newest [`REMEMBERED_ENDS`]: a sweep does not
    /// read them again (one that dropped out is read once more, and found ended).
    ended: Arc<Mutex<lru::LruCache<TransferId, ()>>>,
    /// Transfer streams read recently (see [`REMEMBERED_TRANSFERS`]).
    known: Arc<Mutex<lru::LruCache<TransferId, KnownCommits>>>,
    faults: Faults,
}

/// Whom a transfer step touches, and how.
enum Step {
    Debit,
    Credit,
    Refund,
}

impl Saga {
    pub fn new(
        accounts: Arc<CommandHandler<Account>>,
        transfers: Arc<CommandHandler<Transfer>>,
        store: Arc<dyn EventStore>,
        queries: Queries,
        currency: Currency,
    ) -> Self {
        Self {
            accounts,
            transfers,
            store,
            queries,
            currency,
            driving: Arc::default(),
            ended: Arc::new(Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(REMEMBERED_ENDS).expect("non-zero"),
            ))),
            known: Arc::new(Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(REMEMBERED_TRANSFERS).expect("non-zero"),
            ))),
            faults: Faults::NONE,
        }
    }

    /// Inject `faults` (tests only; see [`crate::faults`]).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Request a transfer under `key` (the client's `Idempotency-Key`) of `owner`. A
    /// retry with the same key and request answers with the same transfer, as it is
    /// now; the same key with another request is refused. Returns the transfer and
    /// whether this was a retry.
    pub async fn request(
        &self,
        owner: &str,
        key: &str,
        request: TransferRequest,
        request_id: Option<String>,
    ) -> Result<(TransferView, bool), TransferRequestError> {
        let id = TransferId::from_key(owner, key);
        let ctx = CommandContext {
            idempotency: Some((key.to_owned(), request.fingerprint())),
            request_id,
            ..CommandContext::default()
        };
        let (from_at_request, to_at_request) =
            tokio::join!(self.seen(&request.from), self.seen(&request.to));
        let command = TransferCommand::Request {
            id: id.clone(),
            from: request.from,
            to: request.to,
            amount: request.amount,
            reference: request.reference,
            from_at_request,
            to_at_request,
        };
        let executed = self
            .transfers
            .execute(&id.stream_id(), command, &ctx)
            .await?;
        if executed.commit.revision == Revision::new(1) {
            // The stream's first commit, for good: what the read below goes on from.
            self.remember(&id, Arc::new(vec![executed.commit.clone()]));
        }
        let view = match self.get(&id).await? {
            Some(view) => view,
            // Just appended: the store has it. Answer with what was appended.
            None => TransferView::fold(id, std::slice::from_ref(&executed.commit))
                .expect("a request commit"),
        };
        Ok((view, executed.replayed))
    }

    /// A revision `account` has reached, as the cache or the read model knows it (zero
    /// if neither answers soon, or it does not exist yet): the request records it, and
    /// the steps' idempotency keys are looked up exactly from it on. Any revision read
    /// before the request is appended will do, since no step runs before that.
    async fn seen(&self, account: &AccountId) -> Revision {
        match tokio::time::timeout(
            SEEN_WITHIN,
            self.queries.balance(account, None, &Caller::Service),
        )
        .await
        {
            Ok(Ok(balance)) => balance.revision,
            _ => Revision::ZERO,
        }
    }

    /// The transfer `id`, read from its stream.
    pub async fn get(&self, id: &TransferId) -> Result<Option<TransferView>, TransferRequestError> {
        let commits = self.commits(id).await?;
        Ok(TransferView::fold(id.clone(), &commits))
    }

    /// Every commit of transfer `id`'s stream, read from the store now: what this
    /// process read before (a transfer stream only grows) and what the store has after
    /// it — on S3 one GET when nothing new came, where a whole read is a listing and a
    /// GET per commit.
    async fn commits(&self, id: &TransferId) -> Result<KnownCommits, TransferRequestError> {
        let stream = id.stream_id();
        let known = self.known.lock().expect("poisoned").get(id).cloned();
        let after = known
            .as_ref()
            .and_then(|k| k.last())
            .map_or(Revision::ZERO, Commit::last_revision);
        let stored = self.store.read_after(&stream, after).await?;
        if stored.is_empty() {
            if let Some(known) = known {
                return Ok(known);
            }
        }
        let mut commits = known.map_or_else(Vec::new, |k| k.as_ref().clone());
        for commit in &stored {
            commits.push(Commit::<TransferEvent>::decode(commit)?);
        }
        let commits = Arc::new(commits);
        if !commits.is_empty() {
            self.remember(id, commits.clone());
        }
        Ok(commits)
    }

    /// Keep `commits` as what is known of transfer `id`, unless more is known already.
    fn remember(&self, id: &TransferId, commits: KnownCommits) {
        let mut known = self.known.lock().expect("poisoned");
        if known.peek(id).is_none_or(|k| k.len() < commits.len()) {
            known.put(id.clone(), commits);
        }
    }

    /// Drive transfer `id` as far as it goes now: to its end, or until a step cannot be
    /// run (a backend down). Returns its status then. A transfer this process is already
    /// driving is left to that run.
    pub async fn drive(&self, id: &TransferId) -> Result<TransferStatus, SagaError> {
        if !self.driving.lock().expect("poisoned").insert(id.clone()) {
            return Ok(TransferStatus::Requested);
        }
        let outcome = self.drive_now(id).await;
        self.driving.lock().expect("poisoned").remove(id);
        if let Ok(status) = &outcome {
            if status.is_final() {
                self.ended.lock().expect("poisoned").put(id.clone(), ());
            }
        }
        outcome
    }

    async fn drive_now(&self, id: &TransferId) -> Result<TransferStatus, SagaError> {
        let stream = id.stream_id();
        // Each pass runs one step; a lost race only costs a pass. Bounded, in case a
        // store answers inconsistently: the sweep comes back.
        for _ in 0..32 {
            let commits = self
                .commits(id)
                .await
                .map_err(|e| SagaError::Transfer(e.to_string()))?;
            let state = Transfer::replay(commits.iter().flat_map(|c| c.events.iter()));
            let revision = commits.last().map_or(Revision::ZERO, Commit::last_revision);
            let next = match state.status {
                TransferStatus::NotRequested => return Ok(state.status),
                s if s.is_final() => return Ok(s),
                TransferStatus::Requested => match self.step(id, &state, Step::Debit).await? {
                    Ok(_) if self.faults.has(Fault::StallAfterDebit) => {
                        return Err(SagaError::Transfer(
                            "fault injection: stalled after the debit, before recording it".into(),
                        ));
                    }
                    Ok(revision) => TransferCommand::RecordDebit { revision },
                    Err(failure) => TransferCommand::RefuseDebit { failure },
                },
                TransferStatus::Debited => match self.step(id, &state, Step::Credit).await? {
                    Ok(revision) => TransferCommand::RecordCredit { revision },
                    Err(failure) => TransferCommand::RefuseCredit { failure },
                },
                _ => match self.step(id, &state, Step::Refund).await? {
                    Ok(revision) => TransferCommand::RecordRefund { revision },
                    Err(failure) => {
                        // The money left `from` and cannot go back now (an overflow):
                        // it stays in flight, and the sweep tries again.
                        return Err(SagaError::Account(format!(
                            "the refund was refused: {}",
                            failure.detail
                        )));
                    }
                },
            };
            let ctx = CommandContext {
                expected: Some(revision),
                ..CommandContext::default()
            };
            match self.transfers.execute(&stream, next, &ctx).await {
                Ok(_)
                | Err(CommandError::RevisionMismatch { .. })
                | Err(CommandError::Rejected(TransferError::OutOfStep { .. })) => continue,
                Err(e) => return Err(SagaError::Transfer(e.to_string())),
            }
        }
        Err(SagaError::Transfer(
            "the transfer did not settle in 32 passes".into(),
        ))
    }

    /// Run one account step of the transfer: `Ok(Ok(revision))` if it took effect (now
    /// or before), `Ok(Err(reason))` if the account refused it, `Err` if it could not
    /// be run now.
    async fn step(
        &self,
        id: &TransferId,
        state: &Transfer,
        step: Step,
    ) -> Result<Result<Revision, TransferFailure>, SagaError> {
        let (Some(from), Some(to), Some(amount)) =
            (state.from.clone(), state.to.clone(), state.amount())
        else {
            return Err(SagaError::Transfer("a transfer without its request".into()));
        };
        if matches!(step, Step::Credit) && self.faults.has(Fault::SkipCredit) {
            tracing::error!(transfer = %id, "fault injection: the credit is recorded, not made");
            return Ok(Ok(Revision::ZERO));
        }
        let horizon = match step {
            Step::Debit | Step::Refund => state.from_at_request,
            Step::Credit => state.to_at_request,
        };
        let (account, command, name) = match step {
            Step::Debit => (
                from,
                AccountCommand::TransferOut {
                    transfer: id.clone(),
                    to,
                    amount,
                },
                "debit",
            ),
            Step::Credit => (
                to,
                AccountCommand::TransferIn {
                    transfer: id.clone(),
                    from,
                    amount,
                },
                "credit",
            ),
            Step::Refund => (
                from,
                AccountCommand::Refund {
                    transfer: id.clone(),
                    to,
                    amount,
                },
                "refund",
            ),
        };
        // A space: no client key (visible ASCII only) is ever one of these.
        let key = format!("transfer {id} {name}");
        let ctx = CommandContext {
            idempotency: Some((key.clone(), key)),
            key_unused_through: Some(horizon),
            ..CommandContext::default()
        };
        match self
            .accounts
            .execute(account.stream_id(), command, &ctx)
            .await
        {
            Ok(executed) => {
                let revision = executed.commit.last_revision();
                if !executed.replayed && !executed.superseded {
                    if let Some((_, balance)) =
                        executed.commit.events.last().and_then(|e| e.movement())
                    {
                        let balance = CachedBalance {
                            balance,
                            currency: self.currency,
                            revision,
                        };
                        self.queries.note_write(&account, balance).await;
                    }
                }
                Ok(Ok(revision))
            }
            Err(CommandError::Rejected(e)) => Ok(Err(TransferFailure::of(&account, &e))),
            Err(e) => Err(SagaError::Account(format!("{name} of {account}: {e}"))),
        }
    }

    /// Drive the transfer of a delivered commit, if it is a transfer's and not yet
    /// ended.
    pub async fn handle(&self, commit: &StoredCommit) {
        if let Err(e) = self.try_handle(commit).await {
            tracing::warn!(stream = %commit.stream, error = %e, "transfer left pending; the sweep will drive it on");
        }
    }

    /// [`Saga::handle`], saying what became of the transfer: `None` for a commit of no
    /// transfer (or of one already known to have ended), the transfer's status after
    /// driving it otherwise, or why it could not be driven (a backend down: a Lambda
    /// batch fails and is delivered again).
    pub async fn try_handle(
        &self,
        commit: &StoredCommit,
    ) -> Result<Option<TransferStatus>, SagaError> {
        let Some(id) = TransferId::of_stream(&commit.stream) else {
            return Ok(None);
        };
        if self.ended.lock().expect("poisoned").contains(&id) {
            return Ok(None);
        }
        self.drive(&id).await.map(Some)
    }

    /// [`Saga::try_handle`] for a batch of commits (a Lambda invocation's), driving the
    /// distinct transfers they name [`DRIVEN_AT_ONCE`] at a time. Fails if any of them
    /// could not be driven (the batch is delivered again; every step is idempotent).
    /// Returns, per distinct transfer, its status (`None`: ended before, or no transfer's).
    pub async fn try_handle_batch(
        &self,
        commits: &[StoredCommit],
    ) -> Result<Vec<Option<TransferStatus>>, SagaError> {
        use futures::{StreamExt, TryStreamExt};
        let mut seen = HashSet::new();
        let distinct: Vec<&StoredCommit> = commits
            .iter()
            .filter(|c| seen.insert(c.stream.clone()))
            .collect();
        futures::stream::iter(distinct)
            .map(|commit| self.try_handle(commit))
            .buffer_unordered(DRIVEN_AT_ONCE)
            .try_collect()
            .await
    }

    /// Follow the stream: every transfer commit starts a drive of its transfer (at most
    /// [`DRIVEN_AT_ONCE`] at a time, so one slow transfer holds up no other), and is
    /// acknowledged once its drive has started. A drive cut short — a failed step, or a
    /// crash — leaves the transfer pending, and pending transfers are the sweep's: every
    /// one at start, and those idle past the deadline after that.
    pub async fn run(&self, mut subscription: Box<dyn Subscription>) {
        let permits = Arc::new(tokio::sync::Semaphore::new(DRIVEN_AT_ONCE));
        while let Some(delivery) = subscription.next().await {
            match delivery {
                Delivery::Commit(commit) => {
                    if TransferId::of_stream(&commit.stream).is_some() {
                        let permit = permits
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("the semaphore is never closed");
                        let saga = self.clone();
                        let commit = commit.clone();
                        tokio::spawn(async move {
                            saga.handle(&commit).await;
                            drop(permit);
                        });
                    }
                    if let Err(e) = subscription.ack(&commit).await {
                        tracing::warn!(stream = %commit.stream, error = %e, "ack failed; the commit may be delivered again");
                    }
                }
                Delivery::Lagged { missed } => {
                    tracing::warn!(missed, "the saga's subscription lagged; sweeping");
                    if let Err(e) = self.sweep(Duration::ZERO).await {
                        tracing::error!(error = %e, "sweep failed");
                    }
                }
            }
        }
    }

    /// Drive every transfer pending for longer than `deadline` (by its last step),
    /// [`DRIVEN_AT_ONCE`] at a time. Returns how many were driven.
    pub async fn sweep(&self, deadline: Duration) -> Result<usize, SagaError> {
        use futures::StreamExt;
        let streams = self
            .store
            .streams()
            .await
            .map_err(|e| SagaError::Transfer(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        let candidates: Vec<TransferId> = {
            let ended = self.ended.lock().expect("poisoned");
            streams
                .iter()
                .filter_map(TransferId::of_stream)
                .filter(|id| !ended.contains(id))
                .collect()
        };
        let outcomes: Vec<Result<bool, SagaError>> = futures::stream::iter(candidates)
            .map(|id| self.sweep_one(id, now, deadline))
            .buffer_unordered(DRIVEN_AT_ONCE)
            .collect()
            .await;
        let mut driven = 0;
        for outcome in outcomes {
            driven += usize::from(outcome?);
        }
        Ok(driven)
    }

    /// Drive transfer `id` if it is pending and was idle for `deadline` at `now`.
    /// Returns whether it was driven.
    async fn sweep_one(
        &self,
        id: TransferId,
        now: OffsetDateTime,
        deadline: Duration,
    ) -> Result<bool, SagaError> {
        let Some(view) = self.get(&id).await? else {
            return Ok(false);
        };
        if view.state.status.is_final() {
            self.ended.lock().expect("poisoned").put(id, ());
            return Ok(false);
        }
        let idle = view.updated_at().map_or(Duration::MAX, |at| {
            Duration::try_from(now - at).unwrap_or(Duration::ZERO)
        });
        if idle < deadline {
            return Ok(false);
        }
        if let Err(e) = self.drive(&id).await {
            tracing::warn!(transfer = %id, error = %e, "the sweep could not drive this transfer on");
        }
        Ok(true)
    }

    /// Sweep every `every`, for transfers pending past `deadline`, in the background.
    pub fn sweep_every(&self, every: Duration, deadline: Duration) -> tokio::task::JoinHandle<()> {
        let saga = self.clone();
        tokio::spawn(async move {
            loop {
                match saga.sweep(deadline).await {
                    Ok(n) if n > 0 => tracing::info!(driven = n, "transfer sweep"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "transfer sweep failed"),
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}
