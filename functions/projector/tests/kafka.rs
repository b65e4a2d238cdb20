//! The projector against the real stream and read model: a Lambda Kafka batch through
//! the Lambda runtime, and a consumer-group member killed mid-stream and restarted.

use std::time::Duration;
use tally_domain::AccountId;
use tally_es::{Revision, StreamId};
use tally_host::{Config, Host, Role};
use tally_testkit::services::{fresh_database, required_env, unique};
use tally_testkit::Function;

const BIN: &str = env!("CARGO_BIN_EXE_projector");

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn under_lambda_the_projector_applies_a_kafka_batch_once_in_partition_order() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database().await;
    let bucket = unique("tally");
    let s3 = required_env("TALLY_TEST_S3_ENDPOINT");
    let vars = env(&[
        ("TALLY_DATABASE_URL", &database_url),
        ("TALLY_S3_BUCKET", &bucket),
        ("TALLY_S3_ENDPOINT", &s3),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ]);
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/kafka-event.json")).unwrap();
    let projector = Function::lambda_with(BIN, dir.path(), &vars).await;
    let first = projector.invoke_raw(fixture.clone()).await.unwrap();
    assert_eq!(first["commits"], 2);
    assert_eq!(first["applied"], 2, "{first}");
    // Lambda delivers at least once: the same batch again changes nothing.
    let again = projector.invoke_raw(fixture).await.unwrap();
    assert_eq!(again["duplicates"], 2, "{again}");

    let pool = tally_postgres::connect(&database_url, 1).await.unwrap();
    let read_model = tally_postgres::PgReadModel::new(pool);
    use tally_app::ReadModel;
    let view = read_model
        .account(&AccountId::parse("fixture-acc").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((view.balance, view.revision.get()), (1234, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_mid_stream_and_restarted_applies_every_commit_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database().await;
    let bucket = unique("tally");
    let topic = unique("commits");
    let group = unique("group");
    let s3 = required_env("TALLY_TEST_S3_ENDPOINT");
    let brokers = required_env("TALLY_TEST_KAFKA_BROKERS");
    let vars = env(&[
        ("TALLY_DATABASE_URL", &database_url),
        ("TALLY_S3_BUCKET", &bucket),
        ("TALLY_S3_ENDPOINT", &s3),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("TALLY_KAFKA_BROKERS", &brokers),
        ("TALLY_KAFKA_TOPIC", &topic),
        ("TALLY_KAFKA_GROUP", &group),
    ]);

    // The writer side, in this process: commands publishing to Kafka.
    let mut config = Config::with_data_dir(dir.path());
    config.s3_bucket = Some(bucket.clone());
    config.s3_endpoint = Some(s3.clone());
    config.s3_access_key_id = Some("test".into());
    config.s3_secret_access_key = Some("test".into());
    config.kafka_brokers = Some(brokers.clone());
    config.kafka_topic = topic.clone();
    config.database_url = Some(database_url.clone());
    let writer = Host::build(&config, Role::Command).await.unwrap();
    writer.init().await.unwrap();

    let accounts = ["k1", "k2", "k3", "k4", "k5"];
    let deposits = 40;
    let policy = config.policy().unwrap();
    let write = |id: &'static str| {
        let writer = writer.clone();
        async move {
            let account = AccountId::parse(id).unwrap();
            let ctx = tally_app::CommandContext::default();
            writer
                .state
                .commands
                .execute(
                    account.stream_id(),
                    tally_domain::AccountCommand::Open {
                        id: account.clone(),
                        currency: policy.currency,
                        owner: None,
                    },
                    &ctx,
                )
                .await
                .unwrap();
            for _ in 0..deposits {
                let amount = policy.parse("1.01").unwrap();
                writer
                    .state
                    .commands
                    .execute(
                        account.stream_id(),
                        tally_domain::AccountCommand::Deposit { amount },
                        &ctx,
                    )
                    .await
                    .unwrap();
            }
        }
    };
    let mut projector = Function::server_with(BIN, dir.path(), &vars).await;
    let writers: Vec<_> = accounts.iter().map(|id| tokio::spawn(write(id))).collect();

    // Kill the projector (SIGKILL) once it is part-way through.
    let pool = tally_postgres::connect(&database_url, 2).await.unwrap();
    let applied = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM transactions")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    for _ in 0..600 {
        if applied().await >= 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_kill = applied().await;
    assert!(before_kill >= 30, "the projector was applying commits");
    std::process::Command::new("kill")
        .args(["-KILL", &projector.pid().to_string()])
        .status()
        .unwrap();
    drop(projector);
    let killed = tokio::time::Instant::now();
    for w in writers {
        w.await.unwrap();
    }
    // tansu drops a dead group member only when someone joins after its session
    // (10 s) ran out; a member joining earlier waits for it forever. (A Kafka broker
    // expires it on its own.) So the replacement starts after the session, as a
    // restarted pod would after its back-off.
    tokio::time::sleep_until(killed + Duration::from_secs(11)).await;
    projector = Function::server_with(BIN, dir.path(), &vars).await;

    let total = (accounts.len() * deposits) as i64;
    for _ in 0..1200 {
        if applied().await >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        applied().await,
        total,
        "every deposit applied exactly once (killed at {before_kill})"
    );
    for id in accounts {
        let (balance, revision): (i64, i64) =
            sqlx::query_as("SELECT balance, revision FROM accounts WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        let stored = writer
            .store
            .read(&StreamId::parse(id).unwrap(), Revision::new(1))
            .await
            .unwrap();
        assert_eq!(
            revision as u64,
            stored.last().unwrap().last_revision().get()
        );
        assert_eq!(balance, 101 * deposits as i64);
    }
    drop(projector);
}
