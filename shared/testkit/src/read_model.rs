//! The read-model contract of `apply_all` (a run of commits of one stream at once) and
//! `apply_runs` (runs of several streams at once),
//! written once and checked against every read model: the in-memory one (api.rs)
//! and PostgreSQL (real_backends.rs).

use tally_app::{Applied, ReadModel, TransactionKind};
use tally_domain::{AccountEvent, AccountId, Currency};
use tally_es::{Commit, CommitMetadata, Revision};

fn commit(id: &AccountId, revision: u64, event: AccountEvent) -> Commit<AccountEvent> {
    Commit::new(
        id.stream_id().clone(),
        Revision::new(revision),
        time::OffsetDateTime::now_utc(),
        vec![event],
        CommitMetadata::default(),
    )
}

/// A run applies what is new and skips what is there; a run that does not follow the
/// read model's position changes nothing and names the revision expected.
pub async fn a_run_of_commits_applies_what_is_new_and_refuses_a_gap(read_model: &dyn ReadModel) {
    let id = AccountId::parse(&format!("run-{:08x}", fastrand::u32(..))).unwrap();
    let c = [
        opened(&id),
        deposited(&id, 2, 500, 500),
        deposited(&id, 3, 700, 1200),
        commit(
            &id,
            4,
            AccountEvent::Withdrawn {
                amount: 200,
                balance: 1000,
            },
        ),
        commit(&id, 5, AccountEvent::Closed),
    ];
    let rm = read_model;
    assert_eq!(rm.apply_all(&[]).await.unwrap(), Applied::Duplicate);
    assert_eq!(rm.apply_all(&c[..2]).await.unwrap(), Applied::Applied);
    assert_eq!(rm.position(&id).await.unwrap(), Revision::new(2));
    assert_eq!(
        rm.apply_all(&c[..3]).await.unwrap(),
        Applied::Applied,
        "the known prefix is skipped, the new commit applied"
    );
    assert_eq!(rm.apply_all(&c[..3]).await.unwrap(), Applied::Duplicate);
    assert_eq!(
        rm.apply_all(&c[4..]).await.unwrap(),
        Applied::Gap {
            expected: Revision::new(4)
        }
    );
    let view = rm.account(&id).await.unwrap().unwrap();
    assert_eq!(
        (view.revision, view.balance, view.closed),
        (Revision::new(3), 1200, false),
        "a gap changed nothing"
    );
    assert_eq!(rm.apply_all(&c[2..]).await.unwrap(), Applied::Applied);
    let view = rm.account(&id).await.unwrap().unwrap();
    assert_eq!(
        (view.revision, view.balance, view.closed),
        (Revision::new(5), 1000, true)
    );
    let movements: Vec<_> = rm
        .transactions(&id, Revision::ZERO, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.revision.get(), t.kind, t.amount, t.balance))
        .collect();
    assert_eq!(
        movements,
        vec![
            (2, TransactionKind::Deposit, 500, 500),
            (3, TransactionKind::Deposit, 700, 1200),
            (4, TransactionKind::Withdrawal, 200, 1000),
        ],
        "every movement once, in order"
    );
}

fn opened(id: &AccountId) -> Commit<AccountEvent> {
    commit(
        id,
        1,
        AccountEvent::Opened {
            id: id.clone(),
            currency: Currency::USD,
        },
    )
}

fn deposited(id: &AccountId, revision: u64, amount: i64, balance: i64) -> Commit<AccountEvent> {
    commit(id, revision, AccountEvent::Deposited { amount, balance })
}

/// Runs of several streams applied together (`apply_runs`, the rebuild's path): each
/// run's outcome is what it would be alone — new, partly known, known, or a gap that
/// changes nothing — and a run that cannot apply at all fails the call.
pub async fn runs_of_several_streams_apply_together_each_as_alone(read_model: &dyn ReadModel) {
    let rm = read_model;
    let tag = format!("{:08x}", fastrand::u32(..));
    let id = |name: &str| AccountId::parse(&format!("{name}-{tag}")).unwrap();
    let (fresh, partly, known, gapped) = (id("fresh"), id("partly"), id("known"), id("gapped"));
    assert_eq!(
        rm.apply_all(&[opened(&partly), deposited(&partly, 2, 500, 500)])
            .await
            .unwrap(),
        Applied::Applied
    );
    assert_eq!(
        rm.apply_all(&[opened(&known)]).await.unwrap(),
        Applied::Applied
    );
    assert_eq!(
        rm.apply_all(&[opened(&gapped)]).await.unwrap(),
        Applied::Applied
    );

    let fresh_run = [opened(&fresh), deposited(&fresh, 2, 300, 300)];
    let partly_run = [
        opened(&partly),
        deposited(&partly, 2, 500, 500),
        deposited(&partly, 3, 700, 1200),
    ];
    let known_run = [opened(&known)];
    let gapped_run = [deposited(&gapped, 3, 100, 100)];
    let outcomes = rm
        .apply_runs(&[&fresh_run, &[], &partly_run, &known_run, &gapped_run])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            Applied::Applied,
            Applied::Duplicate,
            Applied::Applied,
            Applied::Duplicate,
            Applied::Gap {
                expected: Revision::new(2)
            },
        ]
    );
    let state = |id: AccountId| async move {
        let view = rm.account(&id).await.unwrap().unwrap();
        let movements: Vec<_> = rm
            .transactions(&id, Revision::ZERO, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.revision.get(), t.amount, t.balance))
            .collect();
        (view.revision.get(), view.balance, movements)
    };
    assert_eq!(state(fresh.clone()).await, (2, 300, vec![(2, 300, 300)]));
    assert_eq!(
        state(partly.clone()).await,
        (3, 1200, vec![(2, 500, 500), (3, 700, 1200)]),
        "the known prefix is skipped, not applied twice"
    );
    assert_eq!(state(known.clone()).await, (1, 0, vec![]));
    assert_eq!(
        state(gapped.clone()).await,
        (1, 0, vec![]),
        "a gap changes nothing"
    );

    // A stream the read model has never seen must start with its opening.
    let orphan = id("orphan");
    assert!(rm
        .apply_runs(&[&[deposited(&orphan, 1, 100, 100)]])
        .await
        .is_err());
    assert!(rm.account(&orphan).await.unwrap().is_none());
}
