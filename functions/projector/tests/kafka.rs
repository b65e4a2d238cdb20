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

/// A fresh bucket, topic and database on the test services: the projector process's
/// environment (with `extra`), and the same backends as the configuration of a writer
/// in this process.
struct Backends {
    dir: tempfile::TempDir,
    database_url: String,
    topic: String,
    vars: Vec<(String, String)>,
    config: Config,
}

async fn backends(extra: &[(&str, &str)]) -> Backends {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database().await;
    let bucket = unique("tally");
    let topic = unique("commits");
    let s3 = required_env("TALLY_TEST_S3_ENDPOINT");
    let brokers = required_env("TALLY_TEST_KAFKA_BROKERS");
    let group = unique("group");
    let mut pairs = vec![
        ("TALLY_DATABASE_URL", database_url.as_str()),
        ("TALLY_S3_BUCKET", &bucket),
        ("TALLY_S3_ENDPOINT", &s3),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("TALLY_KAFKA_BROKERS", &brokers),
        ("TALLY_KAFKA_TOPIC", &topic),
        ("TALLY_KAFKA_GROUP", &group),
    ];
    pairs.extend_from_slice(extra);
    let vars = env(&pairs);
    let mut config = Config::with_data_dir(dir.path());
    config.s3_bucket = Some(bucket);
    config.s3_endpoint = Some(s3);
    config.s3_access_key_id = Some("test".into());
    config.s3_secret_access_key = Some("test".into());
    config.kafka_brokers = Some(brokers);
    config.kafka_topic = topic.clone();
    config.database_url = Some(database_url.clone());
    config.stream_key = extra
        .iter()
        .find(|(k, _)| *k == "TALLY_STREAM_KEY")
        .map(|(_, v)| v.to_string());
    Backends {
        dir,
        database_url,
        topic,
        vars,
        config,
    }
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
    let Backends {
        dir,
        database_url,
        vars,
        config,
        ..
    } = backends(&[]).await;
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
                        holder: None,
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

/// A fresh stream key, as an operator would make one (`openssl rand -base64 32`).
fn stream_key() -> String {
    use base64::Engine;
    let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A commit of `id` at `revision`, as the store would hold it: what a forger puts on the
/// topic.
fn forged_commit(id: &str, revision: u64, events: Vec<tally_domain::AccountEvent>) -> Vec<u8> {
    tally_es::Commit::new(
        StreamId::parse(id).unwrap(),
        Revision::new(revision),
        time::OffsetDateTime::now_utc(),
        events,
        Default::default(),
    )
    .encode()
    .to_bytes()
}

/// Integrity of the stream: messages produced to the commit topic by a stock Kafka
/// client (not Tally's producer) — unsigned, signed under another key, or carrying a
/// genuine message's MAC over other bytes — change nothing in the read model, while
/// Tally's own signed commits keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_the_store_did_not_produce_changes_nothing() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use tally_domain::AccountEvent;
    let key = stream_key();
    let Backends {
        dir,
        database_url,
        topic,
        vars,
        config,
    } = backends(&[
        ("TALLY_STREAM_KEY", &key),
        // Only the stream brings commits here: no catch-up from the store in between.
        ("TALLY_CATCH_UP_EVERY", "0"),
    ])
    .await;
    let brokers = config.kafka_brokers.clone().unwrap();
    let writer = Host::build(&config, Role::Command).await.unwrap();
    writer.init().await.unwrap();
    let projector = Function::server_with(BIN, dir.path(), &vars).await;
    let policy = config.policy().unwrap();
    let ctx = tally_app::CommandContext::default();
    let victim = AccountId::parse("victim").unwrap();
    let run = |command| {
        writer
            .state
            .commands
            .execute(victim.stream_id(), command, &ctx)
    };
    run(tally_domain::AccountCommand::Open {
        id: victim.clone(),
        currency: policy.currency,
        owner: None,
        holder: None,
    })
    .await
    .unwrap();
    run(tally_domain::AccountCommand::Deposit {
        amount: policy.parse("10").unwrap(),
    })
    .await
    .unwrap();
    let pool = tally_postgres::connect(&database_url, 2).await.unwrap();
    let row = |id: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>("SELECT balance, revision FROM accounts WHERE id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };
    for _ in 0..400 {
        if row("victim").await == Some((1000, 2)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(row("victim").await, Some((1000, 2)));

    // The forger: a plain rdkafka producer that can write to the topic.
    let stock: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let rich = forged_commit(
        "victim",
        3,
        vec![AccountEvent::Deposited {
            amount: 100_000_000,
            balance: 100_001_000,
        }],
    );
    let phantom = forged_commit(
        "phantom",
        1,
        vec![AccountEvent::Opened {
            id: AccountId::parse("phantom").unwrap(),
            currency: policy.currency,
            owner: None,
            holder: None,
        }],
    );
    let other_key = tally_kafka::StreamKey::parse(&stream_key()).unwrap();
    // The MAC of a genuine message (the deposit at revision 2), over other bytes.
    let genuine = writer
        .store
        .read_commit(victim.stream_id(), Revision::new(2))
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let genuine_mac = tally_kafka::StreamKey::parse(&key).unwrap().sign(&genuine);
    for (stream, value, mac) in [
        ("victim", &rich, None),
        ("victim", &rich, Some(other_key.sign(&rich))),
        ("victim", &rich, Some(genuine_mac.clone())),
        ("phantom", &phantom, None),
        ("phantom", &phantom, Some(other_key.sign(&phantom))),
    ] {
        let mut headers = OwnedHeaders::new();
        if let Some(mac) = &mac {
            headers = headers.insert(Header {
                key: tally_kafka::MAC_HEADER,
                value: Some(mac.as_str()),
            });
        }
        stock
            .send(
                FutureRecord::to(&topic)
                    .key(stream)
                    .payload(value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // Then a genuine deposit: once it is in the read model, the forged messages before
    // it on the partition were read (and passed over).
    run(tally_domain::AccountCommand::Deposit {
        amount: policy.parse("1").unwrap(),
    })
    .await
    .unwrap();
    for _ in 0..400 {
        if row("victim").await == Some((1100, 3)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        row("victim").await,
        Some((1100, 3)),
        "the genuine commit 3, not the forged one"
    );
    assert_eq!(
        row("phantom").await,
        None,
        "no account from a forged opening"
    );
    let movements: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transactions WHERE account_id = 'victim'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(movements, 2);
    let metrics = reqwest::get(format!("{}/metrics", projector.base_url().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let forged: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tally_stream_forged_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        forged >= 3,
        "the projector counted what it passed over:\n{metrics}"
    );
    drop(projector);
}

/// Under the Lambda runtime too: with a stream key, a batch's unsigned records (the
/// stored fixture was never signed) are passed over, not applied.
#[tokio::test]
async fn under_lambda_a_record_without_a_valid_mac_is_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database().await;
    let bucket = unique("tally");
    let s3 = required_env("TALLY_TEST_S3_ENDPOINT");
    let key = stream_key();
    let vars = env(&[
        ("TALLY_DATABASE_URL", &database_url),
        ("TALLY_S3_BUCKET", &bucket),
        ("TALLY_S3_ENDPOINT", &s3),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("TALLY_STREAM_KEY", &key),
    ]);
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/kafka-event.json")).unwrap();
    let projector = Function::lambda_with(BIN, dir.path(), &vars).await;
    let answer = projector.invoke_raw(fixture).await.unwrap();
    assert_eq!(
        (answer["commits"].as_u64(), answer["applied"].as_u64()),
        (Some(0), Some(0)),
        "{answer}"
    );
    let pool = tally_postgres::connect(&database_url, 1).await.unwrap();
    let read_model = tally_postgres::PgReadModel::new(pool);
    use tally_app::ReadModel;
    assert!(read_model
        .account(&AccountId::parse("fixture-acc").unwrap())
        .await
        .unwrap()
        .is_none());
}
