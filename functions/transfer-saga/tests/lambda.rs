//! The transfer saga under the Lambda runtime: a Kafka batch of transfer commits drives
//! each transfer to its end, a batch delivered again moves no money twice, an event
//! that is no batch is a sweep of the transfers left pending, and a batch it cannot
//! read fails the invocation (so Lambda delivers it again) and changes nothing.

use base64::Engine as _;
use tally_app::transfers::TransferRequest;
use tally_app::CommandContext;
use tally_domain::{AccountCommand, AccountId, TransferId, TransferStatus};
use tally_es::{Revision, StoredCommit};
use tally_host::Host;
use tally_testkit::Function;

const BIN: &str = env!("CARGO_BIN_EXE_transfer-saga");

/// A Lambda `KafkaEvent` (self-managed Kafka) carrying `commits` on partition 0.
fn kafka_batch(commits: &[StoredCommit]) -> serde_json::Value {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let records: Vec<_> = commits
        .iter()
        .enumerate()
        .map(|(offset, c)| {
            serde_json::json!({
                "topic": "tally.commits",
                "partition": 0,
                "offset": offset,
                "timestamp": 1795000000000u64,
                "timestampType": "CREATE_TIME",
                "key": b64(c.stream.as_str().as_bytes()),
                "value": b64(&c.to_bytes()),
                "headers": [],
            })
        })
        .collect();
    serde_json::json!({
        "eventSource": "SelfManagedKafka",
        "bootstrapServers": "127.0.0.1:9092",
        "records": { "tally.commits-0": records },
    })
}

async fn open_with(host: &Host, id: &str, cents: &str) -> AccountId {
    let account = AccountId::parse(id).unwrap();
    let policy = host.config.policy().unwrap();
    let ctx = CommandContext::default();
    let commands = &host.state.commands;
    let open = AccountCommand::Open {
        id: account.clone(),
        currency: policy.currency,
        owner: None,
        holder: None,
    };
    commands
        .execute(account.stream_id(), open, &ctx)
        .await
        .unwrap();
    let amount = policy.parse(cents).unwrap();
    let deposit = AccountCommand::Deposit { amount };
    commands
        .execute(account.stream_id(), deposit, &ctx)
        .await
        .unwrap();
    account
}

async fn request(host: &Host, key: &str, from: &AccountId, to: &AccountId) -> TransferId {
    let policy = host.config.policy().unwrap();
    let request = TransferRequest {
        from: from.clone(),
        to: to.clone(),
        amount: policy.parse("25.00").unwrap(),
        reference: None,
    };
    let (view, _) = host
        .state
        .saga
        .request("", key, request, None)
        .await
        .unwrap();
    assert_eq!(view.state.status, TransferStatus::Requested);
    view.id
}

async fn status(host: &Host, id: &TransferId) -> TransferStatus {
    host.state.saga.get(id).await.unwrap().unwrap().state.status
}

async fn revision(host: &Host, account: &AccountId) -> u64 {
    let commits = host
        .store
        .read(account.stream_id(), Revision::new(1))
        .await
        .unwrap();
    commits.last().unwrap().last_revision().get()
}

#[tokio::test]
async fn under_lambda_the_saga_drives_a_kafka_batch_once_and_a_schedule_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    // The request side, in this process, on the same store (its saga is not started:
    // only the Lambda function drives).
    let host = Host::embedded(dir.path()).await.unwrap();
    let (a, b) = (
        open_with(&host, "lam-a", "100.00").await,
        open_with(&host, "lam-b", "0.01").await,
    );
    let first = request(&host, "k1", &a, &b).await;
    let requested = host
        .store
        .read(&first.stream_id(), Revision::new(1))
        .await
        .unwrap();

    let vars = [(
        "TALLY_TRANSFER_DEADLINE_SECONDS".to_string(),
        "0".to_string(),
    )];
    let saga = Function::lambda_with(BIN, dir.path(), &vars).await;

    // A batch with the request (and an account commit, which is no transfer's).
    let account_commit = host
        .store
        .read(a.stream_id(), Revision::new(1))
        .await
        .unwrap();
    let batch = kafka_batch(&[account_commit[0].clone(), requested[0].clone()]);
    let answer = saga.invoke_raw(batch.clone()).await.unwrap();
    assert_eq!(answer["commits"], 2, "{answer}");
    assert_eq!(answer["transfers"]["completed"], 1, "{answer}");
    assert_eq!(answer["transfers"]["skipped"], 1, "{answer}");
    assert_eq!(status(&host, &first).await, TransferStatus::Completed);
    let (ra, rb) = (revision(&host, &a).await, revision(&host, &b).await);
    assert_eq!((ra, rb), (3, 3), "one debit, one credit");

    // Lambda delivers at least once: the same batch again moves nothing.
    let again = saga.invoke_raw(batch).await.unwrap();
    assert_eq!(again["commits"], 2, "{again}");
    assert_eq!(
        (revision(&host, &a).await, revision(&host, &b).await),
        (ra, rb)
    );

    // A transfer whose batch never came: a scheduled invocation sweeps it to its end.
    let second = request(&host, "k2", &b, &a).await;
    let swept = saga
        .invoke_raw(serde_json::json!({"source": "aws.events", "detail-type": "Scheduled Event"}))
        .await
        .unwrap();
    assert_eq!(swept["swept"], 1, "{swept}");
    assert_eq!(status(&host, &second).await, TransferStatus::Completed);

    // A record that is not a commit: the invocation fails (Lambda retries the batch)
    // and nothing changes.
    let mut bad = kafka_batch(&requested);
    bad["records"]["tally.commits-0"][0]["value"] = "bm90IGEgY29tbWl0".into();
    let refused = saga.invoke_raw(bad).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        revision(&host, &a).await,
        ra + 1,
        "only the second transfer's credit"
    );
}
