//! The store conformance suite: what every [`EventStore`], [`Outbox`], [`SnapshotStore`]
//! and [`KeyStore`] implementation must do, as one function each adapter's tests run
//! against its real backend (the local directory, an S3 server, PostgreSQL).
//!
//! ```ignore
//! tally_es::conformance::assert_store_conforms(&my_store).await;
//! ```
//!
//! Each check works on streams of its own, named from a random tag, so the event store
//! need not be empty; the outbox check lists the first 1,000 pending entries, so give
//! the suite an outbox with fewer than that of others' (a fresh bucket, database or
//! directory, as the adapters' tests do).
//!
//! A store that keeps history in segments ([`Compact`]) also runs
//! [`assert_segments_read_as_the_commits`], best with segments of a few commits.

use crate::{
    AppendError, CommitMetadata, Compact, EventStore, KeyStore, Outbox, Revision, Snapshot,
    SnapshotStore, StoreError, StoredCommit, StoredEvent, StreamId,
};
use time::OffsetDateTime;

/// Every check of this module against `store`: one writer wins each revision under 16
/// and under 64 concurrent writers, reads, the outbox, snapshots and data keys.
pub async fn assert_store_conforms<S>(store: &S)
where
    S: EventStore + Outbox + SnapshotStore + KeyStore,
{
    let tag = Tag::new();
    assert_one_writer_wins_each_revision(store, &tag.stream("race16"), 10, 16).await;
    assert_one_writer_wins_each_revision(store, &tag.stream("race64"), 5, 64).await;
    assert_reads_are_contiguous_and_start_at_the_commit_holding_the_revision(store, &tag).await;
    assert_a_gap_reads_as_corrupt(store, &tag).await;
    assert_outbox_entries_are_named_by_their_attempt(store, &tag).await;
    assert_the_newest_snapshot_wins(store, &tag).await;
    assert_a_destroyed_key_is_gone(store, &tag).await;
}

/// A key reads back as kept, is gone once destroyed (and destroying it again, or one
/// never kept, is no error), and destroying one leaves the others.
async fn assert_a_destroyed_key_is_gone<S: KeyStore>(store: &S, tag: &Tag) {
    let id = |n: u8| {
        format!(
            "k-{:0>32}",
            format!("{}{n}", &tag.0[2..])
                .chars()
                .filter(char::is_ascii_hexdigit)
                .take(30)
                .collect::<String>()
        )
    };
    let (one, two) = (id(1), id(2));
    assert_ne!(one, two);
    store.put(&one, b"wrapped one").await.expect("put");
    store.put(&two, b"wrapped two").await.expect("put");
    assert_eq!(
        store.get(&one).await.expect("get").as_deref(),
        Some(&b"wrapped one"[..])
    );
    store.destroy(&one).await.expect("destroy");
    assert_eq!(
        store.get(&one).await.expect("get"),
        None,
        "a destroyed key is gone"
    );
    store
        .destroy(&one)
        .await
        .expect("destroying twice is no error");
    store
        .destroy(&id(3))
        .await
        .expect("destroying a key never kept is no error");
    assert_eq!(
        store.get(&two).await.expect("get").as_deref(),
        Some(&b"wrapped two"[..])
    );
    store.destroy(&two).await.expect("destroy");
}

/// Stream names unique to one run of the suite.
struct Tag(String);

impl Tag {
    fn new() -> Self {
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        Tag(format!("cf{:x}", nanos as u64 ^ std::process::id() as u64))
    }

    fn stream(&self, name: &str) -> StreamId {
        StreamId::parse(&format!("{}-{name}", self.0)).expect("a valid stream id")
    }
}

/// Now, to the microsecond (every store keeps at least that).
fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

/// A commit of `events` probe events at `revision` of `stream`, by attempt `attempt`.
fn probe(stream: &StreamId, revision: u64, events: usize, attempt: &str) -> StoredCommit {
    StoredCommit {
        stream: stream.clone(),
        revision: Revision::new(revision),
        recorded_at: now(),
        events: (0..events)
            .map(|i| StoredEvent {
                event_type: "Probe".into(),
                version: 1,
                data: serde_json::json!({ "i": i, "attempt": attempt }),
            })
            .collect(),
        metadata: CommitMetadata {
            commit_id: (!attempt.is_empty()).then(|| attempt.to_owned()),
            idempotency_key: Some(format!("key-{attempt}")),
            fingerprint: Some("f".into()),
            request_id: None,
        },
    }
}

fn revisions(commits: &[StoredCommit]) -> Vec<u64> {
    commits.iter().map(|c| c.revision.get()).collect()
}

/// Of `writers` concurrent appends at each revision `1..=rounds` of `stream`, exactly
/// one succeeds and the others get a conflict for that revision; the stream then reads
/// back `1..=rounds`, with no gap and no duplicate.
pub async fn assert_one_writer_wins_each_revision(
    store: &dyn EventStore,
    stream: &StreamId,
    rounds: u64,
    writers: usize,
) {
    for round in 1..=rounds {
        let commits: Vec<StoredCommit> = (0..writers)
            .map(|writer| StoredCommit {
                stream: stream.clone(),
                revision: Revision::new(round),
                recorded_at: OffsetDateTime::now_utc(),
                events: vec![StoredEvent {
                    event_type: "Probe".into(),
                    version: 1,
                    data: serde_json::json!({ "writer": writer }),
                }],
                metadata: Default::default(),
            })
            .collect();
        let results = futures::future::join_all(commits.iter().map(|c| store.append(c))).await;
        let mut wins = 0;
        for result in results {
            match result {
                Ok(()) => wins += 1,
                Err(AppendError::Conflict { revision, .. }) => {
                    assert_eq!(revision, Revision::new(round), "round {round}")
                }
                Err(e) => panic!("round {round}: unexpected error: {e}"),
            }
        }
        assert_eq!(
            wins, 1,
            "{stream} round {round}: {wins} of {writers} writers won; exactly one must"
        );
    }
    let all = store.read(stream, Revision::new(1)).await.unwrap();
    assert_eq!(
        revisions(&all),
        (1..=rounds).collect::<Vec<_>>(),
        "{stream}: no gap, no duplicate"
    );
}

/// A commit reads back whole; `read(from)` starts at the commit holding `from`;
/// `read_after` a commit boundary returns what follows it; `read_commit` finds only a
/// commit's first revision; streams are listed; a conflicting append changes nothing.
async fn assert_reads_are_contiguous_and_start_at_the_commit_holding_the_revision(
    store: &dyn EventStore,
    tag: &Tag,
) {
    let alpha = tag.stream("alpha");
    let beta = tag.stream("beta");
    // alpha: [1..2] [3] [4..6]; beta: [1].
    let written = [
        probe(&alpha, 1, 2, "a1"),
        probe(&alpha, 3, 1, "a3"),
        probe(&alpha, 4, 3, "a4"),
    ];
    for c in &written {
        store.append(c).await.unwrap();
    }
    store.append(&probe(&beta, 1, 1, "b1")).await.unwrap();

    let all = store.read(&alpha, Revision::new(1)).await.unwrap();
    assert_eq!(all, written, "{alpha}: commits read back as written");
    assert_reads_from(
        store,
        &alpha,
        &[
            (1, &[1, 3, 4]),
            (2, &[1, 3, 4]),
            (3, &[3, 4]),
            (5, &[4]),
            (6, &[4]),
            (7, &[]),
        ],
    )
    .await;
    for (after, expected) in [
        (0, vec![1, 3, 4]),
        (2, vec![3, 4]),
        (3, vec![4]),
        (6, vec![]),
    ] {
        assert_eq!(
            revisions(
                &store
                    .read_after(&alpha, Revision::new(after))
                    .await
                    .unwrap()
            ),
            expected,
            "{alpha}: read after {after}"
        );
    }
    assert_eq!(
        store.read_commit(&alpha, Revision::new(3)).await.unwrap(),
        Some(written[1].clone())
    );
    for inside_or_past in [2, 5, 7] {
        assert_eq!(
            store
                .read_commit(&alpha, Revision::new(inside_or_past))
                .await
                .unwrap(),
            None,
            "{alpha}: no commit starts at {inside_or_past}"
        );
    }
    assert!(store
        .read(&tag.stream("nobody"), Revision::new(1))
        .await
        .unwrap()
        .is_empty());

    // A longer stream followed from a boundary: more commits than a store may fetch
    // one by one before it lists the rest.
    let long = tag.stream("long");
    for r in 1..=12 {
        store
            .append(&probe(&long, r, 1, &format!("l{r}")))
            .await
            .unwrap();
    }
    // After 9: exactly three new commits and nothing after them.
    for after in [0, 1, 5, 9, 11, 12] {
        assert_eq!(
            revisions(&store.read_after(&long, Revision::new(after)).await.unwrap()),
            ((after + 1)..=12).collect::<Vec<_>>(),
            "{long}: read after {after}"
        );
    }
    for past_the_end in [13, 14, 100, 1_000] {
        assert!(
            store
                .read(&long, Revision::new(past_the_end))
                .await
                .unwrap()
                .is_empty(),
            "{long}: read from {past_the_end}"
        );
    }

    // One commit of 100 events, then one of 1: reads from deep inside the first.
    let wide = tag.stream("wide");
    store.append(&probe(&wide, 1, 100, "w1")).await.unwrap();
    store.append(&probe(&wide, 101, 1, "w101")).await.unwrap();
    assert_reads_from(
        store,
        &wide,
        &[(50, &[1, 101]), (100, &[1, 101]), (101, &[101]), (102, &[])],
    )
    .await;

    let streams = store.streams().await.unwrap();
    for s in [&alpha, &beta, &long] {
        assert!(streams.contains(s), "{s} is listed among {streams:?}");
    }
    store.ready().await.unwrap();

    // A commit already there is a conflict whatever it carries, and changes nothing.
    let err = store
        .append(&probe(&alpha, 3, 2, "other"))
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }), "{err}");
    assert_eq!(store.read(&alpha, Revision::new(1)).await.unwrap(), written);
}

/// `read(stream, from)` returns the commits starting at `expected`, for each case.
async fn assert_reads_from(store: &dyn EventStore, stream: &StreamId, cases: &[(u64, &[u64])]) {
    for &(from, expected) in cases {
        assert_eq!(
            revisions(&store.read(stream, Revision::new(from)).await.unwrap()),
            expected,
            "{stream}: read from {from}"
        );
    }
}

/// A stream with a revision missing (written around the store, as only a bug or
/// tampering could) reads as corrupt, never as a shorter stream.
async fn assert_a_gap_reads_as_corrupt(store: &dyn EventStore, tag: &Tag) {
    let gappy = tag.stream("gappy");
    store.append(&probe(&gappy, 1, 1, "g1")).await.unwrap();
    store.append(&probe(&gappy, 3, 1, "g3")).await.unwrap();
    for from in [1, 2] {
        match store.read(&gappy, Revision::new(from)).await {
            Err(StoreError::Corrupt(_)) => {}
            other => panic!("{gappy}: read from {from} with a gap: {other:?}"),
        }
    }
}

/// An entry is recorded before its append and lists as pending once the append
/// landed; it is removed only by its own attempt; removing one that is not there is no
/// error; an attempt that cannot name an entry is refused; `pending` honours its limit.
async fn assert_outbox_entries_are_named_by_their_attempt<S>(store: &S, tag: &Tag)
where
    S: EventStore + Outbox,
{
    let s = tag.stream("outbox");
    let pending_here = || async {
        let mut here: Vec<(u64, String)> = store
            .pending(1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.stream == s)
            .map(|e| (e.revision.get(), e.attempt))
            .collect();
        here.sort();
        here
    };
    // Two writers at revision 1: both record, one append lands.
    store.record(&s, Revision::new(1), "winner").await.unwrap();
    store.record(&s, Revision::new(1), "loser").await.unwrap();
    store.append(&probe(&s, 1, 1, "winner")).await.unwrap();
    assert!(matches!(
        store.append(&probe(&s, 1, 1, "loser")).await,
        Err(AppendError::Conflict { .. })
    ));
    assert!(
        pending_here().await.contains(&(1, "winner".into())),
        "the landed commit's entry is pending: {:?}",
        pending_here().await
    );
    // The loser forgets its own entry, never the winner's.
    store.done(&s, Revision::new(1), "loser").await.unwrap();
    assert_eq!(pending_here().await, [(1, "winner".to_owned())]);
    store.record(&s, Revision::new(2), "second").await.unwrap();
    store.append(&probe(&s, 2, 1, "second")).await.unwrap();
    store.done(&s, Revision::new(1), "winner").await.unwrap();
    assert_eq!(pending_here().await, [(2, "second".to_owned())]);
    // Again, and one never recorded: not errors.
    store.done(&s, Revision::new(1), "winner").await.unwrap();
    store.done(&s, Revision::new(9), "never").await.unwrap();
    assert_eq!(pending_here().await, [(2, "second".to_owned())]);
    store.done(&s, Revision::new(2), "second").await.unwrap();
    assert!(pending_here().await.is_empty());

    for bad in ["a/b", "../x", "with space", &"x".repeat(65)] {
        assert!(
            store.record(&s, Revision::new(3), bad).await.is_err(),
            "attempt {bad:?} is refused"
        );
    }
    // Three entries, listed at most two at a time.
    for r in 3..=5 {
        let attempt = format!("lim{r}");
        store.record(&s, Revision::new(r), &attempt).await.unwrap();
        store.append(&probe(&s, r, 1, &attempt)).await.unwrap();
    }
    let page = store.pending(2).await.unwrap();
    assert!(
        (1..=2).contains(&page.len()),
        "pending(2) lists one or two of at least three entries: {page:?}"
    );
    for r in 3..=5 {
        store
            .done(&s, Revision::new(r), &format!("lim{r}"))
            .await
            .unwrap();
    }
    assert!(pending_here().await.is_empty());
}

/// No snapshot reads as none; the newest saved is the one read, whatever order they
/// were saved in; streams keep their own.
async fn assert_the_newest_snapshot_wins(store: &dyn SnapshotStore, tag: &Tag) {
    let s = tag.stream("snap");
    let other = tag.stream("snap-other");
    let snapshot = |stream: &StreamId, revision: u64| Snapshot {
        stream: stream.clone(),
        revision: Revision::new(revision),
        schema: "probe/1".into(),
        state: serde_json::json!({ "at": revision }),
        idempotency: vec![crate::RememberedKey {
            key: format!("k{revision}"),
            fingerprint: None,
            revision: Revision::new(revision),
        }],
        taken_at: now(),
    };
    assert_eq!(store.latest(&s).await.unwrap(), None);
    let five = snapshot(&s, 5);
    store.save(&five).await.unwrap();
    assert_eq!(store.latest(&s).await.unwrap(), Some(five));
    let ten = snapshot(&s, 10);
    store.save(&ten).await.unwrap();
    store.save(&snapshot(&s, 7)).await.unwrap();
    assert_eq!(
        store.latest(&s).await.unwrap(),
        Some(ten.clone()),
        "an older snapshot saved late does not replace a newer one"
    );
    let theirs = snapshot(&other, 3);
    store.save(&theirs).await.unwrap();
    assert_eq!(store.latest(&other).await.unwrap(), Some(theirs));
    assert_eq!(store.latest(&s).await.unwrap(), Some(ten));
}

/// For a store that keeps history in segments ([`Compact`]): every read — from any
/// revision, after any commit boundary, of one commit — answers the same before a
/// compaction, after one, with commits appended after the segments, and after the next
/// compaction; compacting what is already in segments copies nothing; a compaction told
/// of a revision past the end copies what there is. Give it a store that seals segments
/// of a few commits (the stream is 24 commits, some of several events).
pub async fn assert_segments_read_as_the_commits<S>(store: &S)
where
    S: EventStore + Compact,
{
    let tag = Tag::new();
    let stream = tag.stream("segments");
    // 24 commits: every fifth holds three events.
    let mut next = 1;
    let mut append_commits = |count: usize| {
        let commits: Vec<StoredCommit> = (0..count)
            .map(|_| {
                let events = if next % 5 == 0 { 3 } else { 1 };
                let commit = probe(&stream, next, events, &format!("s{next}"));
                next += events as u64;
                commit
            })
            .collect();
        commits
    };
    let first = append_commits(16);
    for c in &first {
        store.append(c).await.unwrap();
    }
    assert_reads_agree(store, &stream, &first, "before any compaction").await;

    let done = store.compact(&stream, None).await.unwrap();
    let end = first.last().unwrap().last_revision();
    assert_eq!(
        (done.covered, done.commits),
        (end, first.len()),
        "{stream}: first compaction"
    );
    assert_reads_agree(store, &stream, &first, "after a compaction").await;
    let again = store.compact(&stream, Some(end)).await.unwrap();
    assert_eq!(
        (again.covered, again.commits),
        (end, 0),
        "{stream}: nothing new to copy"
    );

    let second = append_commits(8);
    for c in &second {
        store.append(c).await.unwrap();
    }
    let all: Vec<StoredCommit> = first.iter().chain(&second).cloned().collect();
    assert_reads_agree(store, &stream, &all, "with commits after the segments").await;

    let end = all.last().unwrap().last_revision();
    let past_the_end = end.advance(40);
    let done = store.compact(&stream, Some(past_the_end)).await.unwrap();
    assert_eq!(
        (done.covered, done.commits),
        (end, second.len()),
        "{stream}: a compaction told of a revision past the end copies what there is"
    );
    assert_reads_agree(store, &stream, &all, "after the second compaction").await;
}

/// Every read of `stream` answers as `all` (the stream's commits, in order) says.
async fn assert_reads_agree(
    store: &dyn EventStore,
    stream: &StreamId,
    all: &[StoredCommit],
    when: &str,
) {
    let end = all.last().unwrap().last_revision().get();
    for from in 1..=end + 2 {
        let expected: Vec<StoredCommit> = all
            .iter()
            .filter(|c| c.last_revision().get() >= from)
            .cloned()
            .collect();
        assert_eq!(
            store.read(stream, Revision::new(from)).await.unwrap(),
            expected,
            "{stream} {when}: read from {from}"
        );
    }
    let boundaries = std::iter::once(0).chain(all.iter().map(|c| c.last_revision().get()));
    for after in boundaries {
        let expected: Vec<StoredCommit> = all
            .iter()
            .filter(|c| c.revision.get() > after)
            .cloned()
            .collect();
        assert_eq!(
            store
                .read_after(stream, Revision::new(after))
                .await
                .unwrap(),
            expected,
            "{stream} {when}: read after {after}"
        );
    }
    for c in all {
        assert_eq!(
            store
                .read_commit(stream, c.revision)
                .await
                .unwrap()
                .as_ref(),
            Some(c),
            "{stream} {when}: the commit at {}",
            c.revision
        );
    }
}
