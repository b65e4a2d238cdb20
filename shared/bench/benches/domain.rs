//! CPU-only micro-benchmarks of the domain and the toolkit: folding a 10,000-event
//! stream into an account, encoding/decoding a commit (the JSON that the store and the
//! broker carry), and checking a bearer token (RS256) with and without the verifier's
//! record of tokens it verified. `cargo bench --profile perf -p tally-bench --bench
//! domain`.

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

/// One RS256 token checked again and again, as a client's requests carry it: each time
/// in full (`TALLY_AUTH_VERIFIED_TOKENS=0`), and remembered (the default). The keys come
/// from an issuer on loopback, fetched once before measuring.
fn auth(c: &mut Criterion) {
    use tally_auth::testing::TestIssuer;
    use tally_auth::{AuthConfig, Verifier};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let issuer = rt.block_on(TestIssuer::with_rsa());
    let token = issuer.token("client-a", "accounts:read accounts:write");
    let mut group = c.benchmark_group("auth");
    group.throughput(Throughput::Elements(1));
    for (name, remembered) in [
        ("RS256 token, checked in full", 0),
        ("RS256 token, remembered", 4096),
    ] {
        let mut config = AuthConfig::new(&issuer.url, tally_auth::testing::AUDIENCE);
        config.verified_tokens = remembered;
        let verifier = Verifier::new(config);
        rt.block_on(verifier.verify(&token))
            .expect("the token verifies");
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(verifier.verify(black_box(&token)))
                    .expect("verifies")
            })
        });
    }
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
    targets = fold, codec, auth
}
criterion_main!(benches);
