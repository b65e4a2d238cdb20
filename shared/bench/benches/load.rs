//! Loading a 10,000-event stream (one event per commit, as commands write them) the
//! way a command handler does with nothing warm, with and without a snapshot:
//!
//! * `dir/...` — the directory store of `make dev` (a fresh temporary directory);
//! * `s3/...` — the S3 server named by `TALLY_S3_*` / `AWS_*` (`make bench` starts
//!   one and sets them; `eval "$(scripts/services.sh env)"` does the same by hand).
//!   The stream is seeded once per server and reused, and copied into segments (as
//!   the projector's compactor leaves a stream once it settles).
//! * `pg/...` — the PostgreSQL event store at `TALLY_EVENT_STORE_URL` (`make bench`
//!   gives it a database of its own), migrated and seeded once, then reused.
//!
//! "With a snapshot" starts from a snapshot 50 revisions before the end, the average
//! tail with `TALLY_SNAPSHOT_EVERY=100`. (The S3 load without segments was 10,000 GETs,
//! 23 s on moto here: too slow for criterion's ten samples, it was timed once.)
//!
//! `cargo bench --profile perf -p tally-bench --bench load`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_app::CommandHandler;
use tally_bench::fixtures::{seed_stream, STREAM_EVENTS};
use tally_domain::Account;
use tally_embedded::{DirEventStore, InProcessStream};
use tally_es::{Compact, EventStore, Revision, SnapshotStore, StreamId};

const SNAPSHOT_TAIL: u64 = 50;

fn bench_store<S>(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, store: Arc<S>)
where
    S: EventStore + SnapshotStore,
{
    let stream = StreamId::parse("bench-load-10k").expect("valid id");
    let seeding = Instant::now();
    rt.block_on(seed_stream(
        &*store,
        &*store,
        &stream,
        STREAM_EVENTS,
        STREAM_EVENTS - SNAPSHOT_TAIL,
    ))
    .unwrap_or_else(|e| panic!("seeding the {name} store failed: {e}"));
    eprintln!(
        "load/{name}: stream of {STREAM_EVENTS} events ready in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let publisher = Arc::new(InProcessStream::new(16));
    let plain: CommandHandler<Account> = CommandHandler::new(store.clone(), publisher.clone());
    let snapshotted: CommandHandler<Account> =
        CommandHandler::new(store.clone(), publisher).with_snapshots(store, 100);
    let load = |handler: &CommandHandler<Account>| {
        let (_, revision) = rt
            .block_on(handler.load_from_store(&stream))
            .expect("loads");
        assert_eq!(revision, Revision::new(STREAM_EVENTS));
    };
    let mut group = c.benchmark_group(format!("load/{name}"));
    group.throughput(Throughput::Elements(STREAM_EVENTS));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("10k events, no snapshot", |b| b.iter(|| load(&plain)));
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("10k events, snapshot", |b| b.iter(|| load(&snapshotted)));
    group.finish();
}

fn load(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(DirEventStore::open(dir.path()).expect("directory store"));
    bench_store(c, &rt, "dir", store);

    let config = tally_s3::S3Config::from_env().unwrap_or_else(|e| {
        panic!(
            "the S3 load benchmark needs an S3 server: {e}. `make bench` starts one; by hand: \
             ./scripts/services.sh up && eval \"$(./scripts/services.sh env)\""
        )
    });
    let s3 = Arc::new(tally_s3::S3EventStore::new(&config).unwrap_or_else(|e| panic!("{e}")));
    rt.block_on(s3.ensure_bucket())
        .unwrap_or_else(|e| panic!("S3 server at {:?}: {e}", config.endpoint));
    // The stream in segments, as the projector's compactor leaves a stream once it
    // settles: the loads read a handful of objects, not 10,000.
    let stream = StreamId::parse("bench-load-10k").expect("valid id");
    let compacting = Instant::now();
    rt.block_on(async {
        seed_stream(
            &*s3,
            &*s3,
            &stream,
            STREAM_EVENTS,
            STREAM_EVENTS - SNAPSHOT_TAIL,
        )
        .await?;
        s3.compact(&stream, None).await
    })
    .unwrap_or_else(|e| panic!("seeding and compacting the s3 stream failed: {e}"));
    eprintln!(
        "load/s3: stream seeded and in segments in {:.1} s",
        compacting.elapsed().as_secs_f64()
    );
    bench_store(c, &rt, "s3", s3);

    let url = std::env::var("TALLY_EVENT_STORE_URL").unwrap_or_else(|_| {
        panic!(
            "the PostgreSQL load benchmark needs TALLY_EVENT_STORE_URL (a database of its \
             own; `make bench` creates one)"
        )
    });
    let pool = rt
        .block_on(tally_postgres::connect(&url, 8))
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    rt.block_on(tally_postgres::migrate(&pool))
        .unwrap_or_else(|e| panic!("migrating {url}: {e}"));
    let pg = Arc::new(tally_postgres::PgEventStore::new(pool).without_outbox());
    bench_store(c, &rt, "pg", pg);
}

criterion_group!(benches, load);
criterion_main!(benches);
