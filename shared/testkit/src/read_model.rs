//! The read-model contract of `apply_all` (a run of commits of one stream at once) and
//! `apply_runs` (runs of several streams at once),
//! written once and checked against every read model: the in-memory one (api.rs)
//! and PostgreSQL (real_backends.rs).

use tally_app::{Applied, ReadModel, RebuildBegun, TransactionKind};
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
            owner: None,
            holder: None,
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

/// A rebuild fills a new generation while the live one serves and keeps taking the live
/// projector's commits; finishing it switches readers over at once, with every account
/// at least where the live generation had it — also accounts the rebuild never saw and
/// movements the live projector applied meanwhile. An abandoned rebuild changes nothing.
pub async fn a_rebuild_fills_a_new_generation_beside_the_live_one_and_switches_at_once(
    read_model: &dyn ReadModel,
) {
    let tag = format!("{:08x}", fastrand::u32(..));
    let old = AccountId::parse(&format!("gen-old-{tag}")).unwrap();
    let late = AccountId::parse(&format!("gen-late-{tag}")).unwrap();
    let rm = read_model;
    let o = [
        opened(&old),
        deposited(&old, 2, 500, 500),
        deposited(&old, 3, 100, 600),
    ];
    assert_eq!(rm.apply_all(&o[..2]).await.unwrap(), Applied::Applied);

    assert_eq!(rm.begin_rebuild().await.unwrap(), RebuildBegun::Started);
    // The rebuild replays what the store held when it read the stream.
    let replayed = rm.apply_runs_rebuilding(&[&o[..2]]).await.unwrap();
    assert_eq!(replayed, vec![Applied::Applied]);
    // Meanwhile the live projector goes on, and readers see the live generation whole.
    assert_eq!(rm.apply_all(&o[2..]).await.unwrap(), Applied::Applied);
    let l = [opened(&late), deposited(&late, 2, 42, 42)];
    assert_eq!(rm.apply_all(&l).await.unwrap(), Applied::Applied);
    assert_eq!(rm.position(&old).await.unwrap(), Revision::new(3));

    rm.finish_rebuild().await.unwrap();
    let view = rm.account(&old).await.unwrap().unwrap();
    assert_eq!((view.revision, view.balance), (Revision::new(3), 600));
    let rows = rm.transactions(&old, Revision::ZERO, 10).await.unwrap();
    assert_eq!(
        rows.iter().map(|t| t.revision.get()).collect::<Vec<_>>(),
        vec![2, 3],
        "the live projector's movement is in the new generation"
    );
    let view = rm.account(&late).await.unwrap().unwrap();
    assert_eq!((view.revision, view.balance), (Revision::new(2), 42));
    assert_eq!(
        rm.transactions(&late, Revision::ZERO, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // The new generation is the live one: it takes commits as before.
    assert_eq!(
        rm.apply_all(&[deposited(&old, 4, 1, 601)]).await.unwrap(),
        Applied::Applied
    );

    // An abandoned rebuild leaves the live generation as it was.
    assert_eq!(rm.begin_rebuild().await.unwrap(), RebuildBegun::Started);
    rm.abandon_rebuild().await.unwrap();
    assert_eq!(rm.position(&old).await.unwrap(), Revision::new(4));
    assert_eq!(rm.position(&late).await.unwrap(), Revision::new(2));
}

/// One rebuild at a time: while one runs, another — through `rm` or `another`, a second
/// handle on the same read model (another process's, where the read model is shared) —
/// is refused and changes nothing: the running one's new generation keeps what it
/// replayed and switches over whole. Once it has switched, or been abandoned, the next
/// may begin.
pub async fn one_rebuild_runs_at_a_time(rm: &dyn ReadModel, another: &dyn ReadModel) {
    let tag = format!("{:08x}", fastrand::u32(..));
    let id = AccountId::parse(&format!("one-at-a-time-{tag}")).unwrap();
    let c = [opened(&id), deposited(&id, 2, 500, 500)];

    assert_eq!(rm.begin_rebuild().await.unwrap(), RebuildBegun::Started);
    assert_eq!(
        rm.apply_runs_rebuilding(&[&c[..]]).await.unwrap(),
        vec![Applied::Applied]
    );
    for handle in [rm, another] {
        assert_eq!(
            handle.begin_rebuild().await.unwrap(),
            RebuildBegun::AnotherRunning,
            "a second rebuild is refused while one runs"
        );
    }
    // The refused one dropped nothing: the first switches over with what it replayed
    // (the live generation never held this account).
    rm.finish_rebuild().await.unwrap();
    let view = rm.account(&id).await.unwrap().expect("the rebuilt account");
    assert_eq!((view.revision, view.balance), (Revision::new(2), 500));

    // Switched: the next may begin, through either handle; abandoned, too.
    assert_eq!(
        another.begin_rebuild().await.unwrap(),
        RebuildBegun::Started
    );
    assert_eq!(
        rm.begin_rebuild().await.unwrap(),
        RebuildBegun::AnotherRunning
    );
    another.abandon_rebuild().await.unwrap();
    assert_eq!(rm.begin_rebuild().await.unwrap(), RebuildBegun::Started);
    rm.abandon_rebuild().await.unwrap();
    assert_eq!(rm.position(&id).await.unwrap(), Revision::new(2));
}
