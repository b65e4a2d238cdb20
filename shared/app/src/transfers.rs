//! Transfers: the request, the view, and the saga that moves the money.
//!
//! A transfer is its own stream (`transfer.{id}`, [`tally_domain::Transfer`]). The saga
//! drives it step by step: each step is an ordinary account command (a debit on `from`,
//! a credit on `to`, or the refund of the debit) whose idempotency key is derived from
//! the transfer and the step, and whose outcome is then appended to the transfer's
//! stream at the revision the saga read. So:
//!
//! * a step retried after a crash, or run twice by two workers, applies once: the
//!   second run of an account command finds its key and answers with the first commit;
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
    Account, AccountCommand, AccountId, Amount, Currency, Transfer, TransferCommand, TransferError,
    TransferEvent, TransferFailure, TransferId, TransferStatus,
};
use tally_es::{Commit, Delivery, EventStore, Revision, StoreError, StoredCommit, Subscription};
use time::OffsetDateTime;

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
        use tally_es::Aggregate;
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
    pub reference: String,
}

impl TransferRequest {
    /// What describes the request for `Idempotency-Key` reuse detection.
    fn fingerprint(&self) -> String {
        format!(
            "transfer {} {} {} {:?}",
            self.from,
            self.to,
            self.amount.minor(),
            self.reference
        )
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
    /// Transfers known to have ended: a sweep does not read them again.
    ended: Arc<Mutex<HashSet<TransferId>>>,
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
            ended: Arc::default(),
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
            expected: None,
            request_id,
        };
        let command = TransferCommand::Request {
            id: id.clone(),
            from: request.from,
            to: request.to,
            amount: request.amount,
            reference: request.reference,
        };
        let executed = self
            .transfers
            .execute(&id.stream_id(), command, &ctx)
            .await?;
        let view = match self.get(&id).await? {
            Some(view) => view,
            // Just appended: the store has it. Answer with what was appended.
            None => TransferView::fold(id, std::slice::from_ref(&executed.commit))
                .expect("a request commit"),
        };
        Ok((view, executed.replayed))
    }

    /// The transfer `id`, read from its stream.
    pub async fn get(&self, id: &TransferId) -> Result<Option<TransferView>, TransferRequestError> {
        let stored = self.store.read(&id.stream_id(), Revision::new(1)).await?;
        let commits = stored
            .iter()
            .map(Commit::<TransferEvent>::decode)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TransferView::fold(id.clone(), &commits))
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
                self.ended.lock().expect("poisoned").insert(id.clone());
            }
        }
        outcome
    }

    async fn drive_now(&self, id: &TransferId) -> Result<TransferStatus, SagaError> {
        let stream = id.stream_id();
        // Each pass runs one step; a lost race only costs a pass. Bounded, in case a
        // store answers inconsistently: the sweep comes back.
        for _ in 0..32 {
            let (state, revision) = self
                .transfers
                .load_from_store(&stream)
                .await
                .map_err(|e| SagaError::Transfer(e.to_string()))?;
            let next = match state.status {
                TransferStatus::NotRequested => return Ok(state.status),
                s if s.is_final() => return Ok(s),
                TransferStatus::Requested => match self.step(id, &state, Step::Debit).await? {
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
            expected: None,
            request_id: None,
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

    /// Follow the stream: every transfer commit drives its transfer, then is
    /// acknowledged (a transfer left pending by a failed step is the sweep's).
    pub async fn run(&self, mut subscription: Box<dyn Subscription>) {
        while let Some(delivery) = subscription.next().await {
            match delivery {
                Delivery::Commit(commit) => {
                    self.handle(&commit).await;
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

    /// Drive every transfer pending for longer than `deadline` (by its last step).
    /// Returns how many were driven.
    pub async fn sweep(&self, deadline: Duration) -> Result<usize, SagaError> {
        let streams = self
            .store
            .streams()
            .await
            .map_err(|e| SagaError::Transfer(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        let mut driven = 0;
        for stream in &streams {
            let Some(id) = TransferId::of_stream(stream) else {
                continue;
            };
            if self.ended.lock().expect("poisoned").contains(&id) {
                continue;
            }
            let Some(view) = self.get(&id).await? else {
                continue;
            };
            if view.state.status.is_final() {
                self.ended.lock().expect("poisoned").insert(id);
                continue;
            }
            let idle = view.updated_at().map_or(Duration::MAX, |at| {
                Duration::try_from(now - at).unwrap_or(Duration::ZERO)
            });
            if idle < deadline {
                continue;
            }
            driven += 1;
            if let Err(e) = self.drive(&id).await {
                tracing::warn!(transfer = %id, error = %e, "the sweep could not drive this transfer on");
            }
        }
        Ok(driven)
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
