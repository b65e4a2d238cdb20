//! The Account aggregate, told as given/when/then stories and as properties.

use proptest::prelude::*;
use tally_domain::{
    Account, AccountCommand, AccountError, AccountEvent, AccountId, AccountStatus, Amount,
    AmountPolicy, Caller, Currency, Money, Owner,
};
use tally_es::testing::AggregateTest;
use tally_es::{Aggregate, Commit, DomainEvent, StoredCommit};

fn id() -> AccountId {
    AccountId::parse("account123").unwrap()
}

fn usd(text: &str) -> Amount {
    AmountPolicy::new(Currency::USD, i64::MAX)
        .parse(text)
        .unwrap()
}

fn opened() -> AccountEvent {
    AccountEvent::Opened {
        id: id(),
        currency: Currency::USD,
        owner: None,
        holder: None,
    }
}

fn owner(subject: &str) -> Owner {
    Owner::parse(subject).unwrap()
}

fn money(minor: i64) -> Money {
    Money {
        minor,
        currency: Currency::USD,
    }
}

type Test = AggregateTest<Account>;

#[test]
fn opening_an_empty_stream_opens_the_account() {
    let state = Test::given_no_previous_events()
        .when(AccountCommand::Open {
            id: id(),
            currency: Currency::USD,
            owner: None,
            holder: None,
        })
        .then_expect_events(vec![opened()]);
    assert_eq!(state.status, AccountStatus::Open);
    assert_eq!(state.balance, 0);
}

#[test]
fn opening_an_account_twice_is_refused() {
    Test::given(vec![opened()])
        .when(AccountCommand::Open {
            id: id(),
            currency: Currency::USD,
            owner: None,
            holder: None,
        })
        .then_expect_error(AccountError::AlreadyOpen);
}

#[test]
fn a_deposit_records_the_amount_and_the_new_balance() {
    Test::given(vec![
        opened(),
        AccountEvent::Deposited {
            amount: 100,
            balance: 100,
        },
    ])
    .when(AccountCommand::Deposit {
        amount: usd("500.00"),
    })
    .then_expect_events(vec![AccountEvent::Deposited {
        amount: 50_000,
        balance: 50_100,
    }]);
}

#[test]
fn depositing_into_an_unknown_account_is_refused() {
    Test::given_no_previous_events()
        .when(AccountCommand::Deposit { amount: usd("1") })
        .then_expect_error(AccountError::NotFound);
}

#[test]
fn depositing_into_a_closed_account_is_refused() {
    Test::given(vec![opened(), AccountEvent::Closed])
        .when(AccountCommand::Deposit { amount: usd("1") })
        .then_expect_error(AccountError::Closed);
}

#[test]
fn depositing_another_currency_is_refused() {
    let eur = AmountPolicy::new(Currency::parse("EUR").unwrap(), 1_000_00)
        .parse("1")
        .unwrap();
    Test::given(vec![opened()])
        .when(AccountCommand::Deposit { amount: eur })
        .then_expect_error(AccountError::CurrencyMismatch {
            account: Currency::USD,
            amount: Currency::parse("EUR").unwrap(),
        });
}

#[test]
fn a_deposit_that_would_overflow_the_balance_is_refused() {
    Test::given(vec![
        opened(),
        AccountEvent::Deposited {
            amount: i64::MAX,
            balance: i64::MAX,
        },
    ])
    .when(AccountCommand::Deposit {
        amount: usd("0.01"),
    })
    .then_expect_error(AccountError::BalanceOverflow);
}

#[test]
fn a_withdrawal_within_the_balance_records_the_new_balance() {
    Test::given(vec![
        opened(),
        AccountEvent::Deposited {
            amount: 50_000,
            balance: 50_000,
        },
    ])
    .when(AccountCommand::Withdraw {
        amount: usd("150.00"),
    })
    .then_expect_events(vec![AccountEvent::Withdrawn {
        amount: 15_000,
        balance: 35_000,
    }]);
}

#[test]
fn withdrawing_more_than_the_balance_is_rejected() {
    Test::given(vec![
        opened(),
        AccountEvent::Deposited {
            amount: 1_000,
            balance: 1_000,
        },
    ])
    .when(AccountCommand::Withdraw {
        amount: usd("10.01"),
    })
    .then_expect_error(AccountError::InsufficientFunds {
        balance: money(1_000),
        requested: money(1_001),
    });
}

#[test]
fn an_account_at_zero_can_be_closed_and_then_refuses_everything() {
    let state = Test::given(vec![opened()])
        .when(AccountCommand::Close)
        .then_expect_events(vec![AccountEvent::Closed]);
    assert_eq!(state.status, AccountStatus::Closed);
    Test::given(vec![opened(), AccountEvent::Closed])
        .when(AccountCommand::Close)
        .then_expect_error(AccountError::Closed);
    Test::given(vec![opened(), AccountEvent::Closed])
        .when(AccountCommand::Withdraw { amount: usd("1") })
        .then_expect_error(AccountError::Closed);
}

#[test]
fn an_account_with_money_cannot_be_closed() {
    Test::given(vec![
        opened(),
        AccountEvent::Deposited {
            amount: 5,
            balance: 5,
        },
    ])
    .when(AccountCommand::Close)
    .then_expect_error(AccountError::BalanceNotZero { balance: money(5) });
}

/// Every schema version ever written stays readable: one fixture per version, forever.
#[test]
fn every_stored_fixture_version_decodes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let stored = StoredCommit::from_bytes(&bytes).unwrap();
        let commit = Commit::<AccountEvent>::decode(&stored)
            .unwrap_or_else(|e| panic!("{} no longer decodes: {e}", path.display()));
        // Re-encoding at the current version and decoding again gives the same events.
        let again = Commit::<AccountEvent>::decode(&commit.encode()).unwrap();
        assert_eq!(again.events, commit.events);
        seen += 1;
    }
    assert!(seen >= 4, "one fixture per event type and version");
}

#[test]
fn an_account_opened_before_owners_were_recorded_reads_as_owned_by_nobody() {
    let fixture = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        StoredCommit::from_bytes(&std::fs::read(path).unwrap()).unwrap()
    };
    let v1 = Commit::<AccountEvent>::decode(&fixture("AccountOpened.v1.json")).unwrap();
    assert_eq!(
        v1.events,
        vec![AccountEvent::Opened {
            id: id(),
            currency: Currency::USD,
            owner: None,
            holder: None,
        }]
    );
    // Written again, it is written at the current version.
    let stored = v1.encode();
    assert_eq!(stored.events[0].version, 2);
    assert_eq!(stored.events[0].data["owner"], serde_json::Value::Null);
    let v2 = Commit::<AccountEvent>::decode(&fixture("AccountOpened.v2.json")).unwrap();
    let AccountEvent::Opened { owner, holder, .. } = &v2.events[0] else {
        panic!("not an opening: {v2:?}");
    };
    assert_eq!(owner.as_ref().map(Owner::as_str), Some("client-a"));
    assert_eq!(holder.as_ref().map(|h| h.key.as_str()), Some("holder-7d2f"));
    // The decoder itself reads only the current version: v1 goes through the chain.
    assert!(AccountEvent::decode(
        "AccountOpened",
        1,
        serde_json::json!({"id": "a", "currency": "USD"})
    )
    .is_err());
    tally_domain::check_event_schemas().unwrap();
}

#[test]
fn the_subject_that_opens_an_account_owns_it_and_no_other_subject_reaches_it() {
    let a = owner("client-a");
    let state = Test::given_no_previous_events()
        .when(AccountCommand::Open {
            id: id(),
            currency: Currency::USD,
            owner: Some(a.clone()),
            holder: None,
        })
        .then_expect_events(vec![AccountEvent::Opened {
            id: id(),
            currency: Currency::USD,
            owner: Some(a.clone()),
            holder: None,
        }]);
    assert_eq!(state.owner, Some(a.clone()));
    let deposit = AccountCommand::Deposit {
        amount: usd("1.00"),
    };
    assert_eq!(state.admits(&Caller::subject(a.clone()), &deposit), Ok(()));
    assert_eq!(state.admits(&Caller::Operator, &deposit), Ok(()));
    assert_eq!(state.admits(&Caller::Service, &deposit), Ok(()));
    let other = Caller::subject(owner("client-b"));
    // Another subject is told what it would be told of an account that does not exist.
    assert_eq!(state.admits(&other, &deposit), Err(AccountError::NotFound));
    assert_eq!(
        state.admits(&other, &AccountCommand::Close),
        Err(AccountError::NotFound)
    );
    assert!(!state.reaches(&other));
    // Opening names the id the client chose: taken is taken, whoever asks.
    let open = AccountCommand::Open {
        id: id(),
        currency: Currency::USD,
        owner: Some(owner("client-b")),
        holder: None,
    };
    assert_eq!(state.admits(&other, &open), Ok(()));
    assert_eq!(state.handle(open), Err(AccountError::AlreadyOpen));
    // An account opened before owners: only operators and the configured legacy owner.
    let legacy = Account::replay(&[opened()]);
    assert!(!legacy.reaches(&Caller::subject(a.clone())));
    assert!(legacy.reaches(&Caller::Subject {
        owner: a,
        legacy: true
    }));
    assert!(legacy.reaches(&Caller::Operator));
}

fn sealed() -> tally_es::Sealed {
    tally_es::Sealed {
        key: "k-000102030405060708090a0b0c0d0e0f".into(),
        data: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
    }
}

#[test]
fn a_holder_is_forgotten_once_and_the_ledger_stays() {
    let opened_with_holder = AccountEvent::Opened {
        id: id(),
        currency: Currency::USD,
        owner: None,
        holder: Some(sealed()),
    };
    let deposited = AccountEvent::Deposited {
        amount: 500,
        balance: 500,
    };
    let state = Test::given(vec![opened_with_holder.clone(), deposited.clone()])
        .when(AccountCommand::ForgetHolder)
        .then_expect_events(vec![AccountEvent::HolderForgotten { balance: 500 }]);
    assert!(state.forgotten);
    assert_eq!(state.balance, 500, "balances and movements stay");
    assert_eq!(state.holder_key.as_deref(), Some(sealed().key.as_str()));
    Test::given(vec![
        opened_with_holder,
        deposited,
        AccountEvent::HolderForgotten { balance: 500 },
    ])
    .when(AccountCommand::ForgetHolder)
    .then_expect_error(AccountError::AlreadyForgotten);
    Test::given_no_previous_events()
        .when(AccountCommand::ForgetHolder)
        .then_expect_error(AccountError::NotFound);
    // A closed account's holder can be forgotten too.
    Test::given(vec![opened(), AccountEvent::Closed])
        .when(AccountCommand::ForgetHolder)
        .then_expect_events(vec![AccountEvent::HolderForgotten { balance: 0 }]);
}

#[test]
fn unknown_types_and_future_versions_are_refused_not_guessed() {
    assert!(AccountEvent::decode("Teleported", 1, serde_json::json!({})).is_err());
    assert!(AccountEvent::decode("Deposited", 99, serde_json::json!({})).is_err());
    assert!(AccountEvent::decode("Deposited", 1, serde_json::json!({"amount": "1"})).is_err());
}

/// A random command against a random account.
fn command() -> impl Strategy<Value = AccountCommand> {
    let amount = (1i64..=100_000).prop_map(|minor| usd(&Currency::USD.format(minor)));
    prop_oneof![
        Just(AccountCommand::Open {
            id: id(),
            currency: Currency::USD,
            owner: Some(owner("client-a")),
            holder: Some(sealed()),
        }),
        Just(AccountCommand::ForgetHolder),
        amount
            .clone()
            .prop_map(|amount| AccountCommand::Deposit { amount }),
        amount
            .clone()
            .prop_map(|amount| AccountCommand::Withdraw { amount }),
        amount.prop_map(|amount| AccountCommand::Withdraw { amount }),
        Just(AccountCommand::Close),
    ]
}

proptest! {
    #[test]
    fn the_balance_never_goes_negative_and_replay_gives_the_same_state(
        commands in proptest::collection::vec(command(), 0..60)
    ) {
        let mut state = Account::default();
        let mut history = Vec::new();
        for c in commands {
            if let Ok(events) = state.handle(c) {
                for e in events {
                    state.apply(&e);
                    prop_assert!(state.balance >= 0, "balance went negative: {}", state.balance);
                    history.push(e);
                }
            }
        }
        prop_assert_eq!(Account::replay(&history), state.clone());
        // The sum of the moves equals the balance.
        let sum: i64 = history.iter().map(|e| match e {
            AccountEvent::Deposited { amount, .. } => *amount,
            AccountEvent::Withdrawn { amount, .. } => -*amount,
            _ => 0,
        }).sum();
        prop_assert_eq!(sum, state.balance);
    }

    #[test]
    fn decimal_text_round_trips_through_minor_units(minor in 1i64..=i64::MAX) {
        let policy = AmountPolicy::new(Currency::USD, i64::MAX);
        let text = Currency::USD.format(minor);
        prop_assert_eq!(policy.parse(&text).unwrap().minor(), minor);
    }
}

proptest! {
    #[test]
    fn a_snapshot_restores_exactly_the_state_it_was_taken_of(
        commands in proptest::collection::vec(command(), 0..40)
    ) {
        let mut state = Account::default();
        for c in commands {
            if let Ok(events) = state.handle(c) {
                for e in events {
                    state.apply(&e);
                }
            }
        }
        let value = state.to_snapshot().unwrap();
        prop_assert_eq!(Account::from_snapshot(value), Some(state));
    }
}
