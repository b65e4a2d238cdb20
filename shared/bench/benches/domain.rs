//! CPU-only micro-benchmarks of the domain and the toolkit: folding a 10,000-event
//! stream into an account, and encoding/decoding a commit (the JSON that the store and
//! the broker carry). `cargo bench --profile perf -p tally-bench --bench domain`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use tally_bench::fixtures::{account_events, commit_of};
use tally_domain::{Account, AccountEvent};
use tally_es::{Aggregate, Commit, Revision, StoredCommit};

fn fold(c: &mut Criterion) {
    let events = account_events(10_000);
    let mut group = c.benchmark_group("fold");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("10k events into an account", |b| {
        b.iter(|| Account::replay(black_box(&events)))
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    let events = account_events(2);
    let commit: Commit<AccountEvent> = commit_of(Revision::new(2), vec![events[1].clone()]);
    let bytes = commit.encode().to_bytes();
    let mut group = c.benchmark_group("commit");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode (domain → JSON bytes)", |b| {
        b.iter(|| black_box(&commit).encode().to_bytes())
    });
    group.bench_function("decode (JSON bytes → domain)", |b| {
        b.iter(|| {
            let stored = StoredCommit::from_bytes(black_box(&bytes)).expect("parses");
            Commit::<AccountEvent>::decode(&stored).expect("decodes")
        })
    });
    group.bench_function("decode + apply to an account", |b| {
        b.iter_batched(
            || Account::replay(&events[..1]),
            |mut account| {
                let stored = StoredCommit::from_bytes(black_box(&bytes)).expect("parses");
                for e in &Commit::<AccountEvent>::decode(&stored)
                    .expect("decodes")
                    .events
                {
                    account.apply(e);
                }
                account
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

// Shorter than criterion's default (3 s warm-up, 5 s measuring): these run in
// microseconds, their confidence intervals stay within 0.5 %, and `make bench` keeps
// to its ten minutes.
criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = fold, codec
}
criterion_main!(benches);
