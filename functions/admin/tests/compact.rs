//! `admin compact`: every account stream of the store into segments, once.

use tally_host::Host;
use tally_testkit::{seed, Step};

#[tokio::test]
async fn compact_copies_every_account_stream_into_segments_and_again_copies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    seed(
        dir.path(),
        &[
            Step::Open("alice"),
            Step::Deposit("alice", "500.00"),
            Step::Withdraw("alice", "150.00"),
            Step::Open("bob"),
            Step::Deposit("bob", "20.00"),
        ],
    )
    .await;
    let host = Host::embedded(dir.path()).await.unwrap();
    let (report, _) = admin::compact(&host).await.unwrap();
    assert_eq!(
        (
            report.streams,
            report.commits,
            report.segments,
            report.failed
        ),
        (2, 5, 2, 0),
        "two heads, five commits"
    );
    for id in ["alice", "bob"] {
        assert!(dir.path().join(format!("segments/{id}/head.json")).exists());
    }
    let (again, _) = admin::compact(&host).await.unwrap();
    assert_eq!((again.streams, again.commits, again.segments), (2, 0, 0));
    let summary = admin::compact_summary(&again, std::time::Duration::from_millis(5));
    assert_eq!(summary["streams"], 2);
}
