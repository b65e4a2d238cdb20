//! Transfers: the account's side (debit, credit, refund) and the Transfer aggregate's
//! state machine, as given/when/then stories.

use tally_domain::{
    Account, AccountCommand, AccountError, AccountEvent, AccountId, Amount, AmountPolicy, Currency,
    Money, Reference, Transfer, TransferCommand, TransferError, TransferEvent, TransferFailure,
    TransferId, TransferStatus,
};
use tally_es::testing::AggregateTest;
use tally_es::{Commit, Revision, StoredCommit};

fn account(id: &str) -> AccountId {
    AccountId::parse(id).unwrap()
}

fn usd(text: &str) -> Amount {
    AmountPolicy::new(Currency::USD, i64::MAX)
        .parse(text)
        .unwrap()
}

fn transfer_id() -> TransferId {
    TransferId::from_key("", "rent-2026-12")
}

fn opened_with(minor: i64) -> Vec<AccountEvent> {
    let mut events = vec![AccountEvent::Opened {
        id: account("a"),
        currency: Currency::USD,
        owner: None,
        holder: None,
    }];
    if minor > 0 {
        events.push(AccountEvent::Deposited {
            amount: minor,
            balance: minor,
        });
    }
    events
}

#[test]
fn a_debit_names_the_transfer_and_the_counterparty_and_never_overdraws() {
    AggregateTest::<Account>::given(opened_with(10_000))
        .when(AccountCommand::TransferOut {
            transfer: transfer_id(),
            to: account("b"),
            amount: usd("25.00"),
        })
        .then_expect_events(vec![AccountEvent::TransferredOut {
            transfer: transfer_id(),
            counterparty: account("b"),
            amount: 2_500,
            balance: 7_500,
        }]);
    AggregateTest::<Account>::given(opened_with(1_000))
        .when(AccountCommand::TransferOut {
            transfer: transfer_id(),
            to: account("b"),
            amount: usd("25.00"),
        })
        .then_expect_error(AccountError::InsufficientFunds {
            balance: Money {
                minor: 1_000,
                currency: Currency::USD,
            },
            requested: usd("25.00").money(),
        });
}

#[test]
fn a_credit_needs_an_open_account_but_a_refund_reaches_a_closed_one() {
    let mut closed = opened_with(0);
    closed.push(AccountEvent::Closed);
    AggregateTest::<Account>::given(closed.clone())
        .when(AccountCommand::TransferIn {
            transfer: transfer_id(),
            from: account("b"),
            amount: usd("1.00"),
        })
        .then_expect_error(AccountError::Closed);
    let state = AggregateTest::<Account>::given(closed)
        .when(AccountCommand::Refund {
            transfer: transfer_id(),
            to: account("b"),
            amount: usd("1.00"),
        })
        .then_expect_events(vec![AccountEvent::TransferRefunded {
            transfer: transfer_id(),
            counterparty: account("b"),
            amount: 100,
            balance: 100,
        }]);
    assert_eq!(state.balance, 100, "the money is back, on a closed account");
    AggregateTest::<Account>::given_no_previous_events()
        .when(AccountCommand::TransferIn {
            transfer: transfer_id(),
            from: account("b"),
            amount: usd("1.00"),
        })
        .then_expect_error(AccountError::NotFound);
}

/// A reference as the API stores it: sealed under the debited holder's key.
fn sealed_rent() -> Reference {
    Reference::Sealed(tally_es::Sealed {
        key: "k-000102030405060708090a0b0c0d0e0f".into(),
        data: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
    })
}

fn requested() -> TransferEvent {
    TransferEvent::Requested {
        id: transfer_id(),
        from: account("a"),
        to: account("b"),
        amount: 2_500,
        currency: Currency::USD,
        reference: Some(sealed_rent()),
        from_at_request: Revision::new(41),
        to_at_request: Revision::new(7),
    }
}

fn failure(code: &str) -> TransferFailure {
    TransferFailure {
        code: code.into(),
        account: account("b"),
        detail: "refused".into(),
    }
}

type Test = AggregateTest<Transfer>;

#[test]
fn a_transfer_goes_requested_debited_completed() {
    let state = Test::given_no_previous_events()
        .when(TransferCommand::Request {
            id: transfer_id(),
            from: account("a"),
            to: account("b"),
            amount: usd("25.00"),
            reference: Some(sealed_rent()),
            from_at_request: Revision::new(41),
            to_at_request: Revision::new(7),
        })
        .then_expect_events(vec![requested()]);
    assert_eq!(state.status.name(), "pending");
    let debited = TransferEvent::Debited {
        revision: Revision::new(3),
    };
    Test::given(vec![requested()])
        .when(TransferCommand::RecordDebit {
            revision: Revision::new(3),
        })
        .then_expect_events(vec![debited.clone()]);
    let state = Test::given(vec![requested(), debited])
        .when(TransferCommand::RecordCredit {
            revision: Revision::new(2),
        })
        .then_expect_events(vec![TransferEvent::Credited {
            revision: Revision::new(2),
        }]);
    assert_eq!(
        (state.status, state.status.is_final()),
        (TransferStatus::Completed, true)
    );
}

#[test]
fn a_refused_credit_is_recorded_before_the_refund_and_a_step_out_of_turn_is_refused() {
    let debited = TransferEvent::Debited {
        revision: Revision::new(3),
    };
    let refused = TransferEvent::CreditRefused {
        failure: failure("account-closed"),
    };
    let state = Test::given(vec![requested(), debited.clone(), refused.clone()])
        .when(TransferCommand::RecordRefund {
            revision: Revision::new(4),
        })
        .then_expect_events(vec![TransferEvent::Reversed {
            revision: Revision::new(4),
        }]);
    assert_eq!(state.status.name(), "reversed");
    // Once the credit was refused, it is never recorded as done.
    Test::given(vec![requested(), debited.clone(), refused])
        .when(TransferCommand::RecordCredit {
            revision: Revision::new(2),
        })
        .then_expect_error(TransferError::OutOfStep {
            status: TransferStatus::CreditRefused,
        });
    // A second worker recording the debit again is refused.
    Test::given(vec![requested(), debited])
        .when(TransferCommand::RecordDebit {
            revision: Revision::new(3),
        })
        .then_expect_error(TransferError::OutOfStep {
            status: TransferStatus::Debited,
        });
    let state = Test::given(vec![requested()])
        .when(TransferCommand::RefuseDebit {
            failure: failure("insufficient-funds"),
        })
        .then_expect_events(vec![TransferEvent::Failed {
            failure: failure("insufficient-funds"),
        }]);
    assert_eq!(state.status.name(), "failed");
}

#[test]
fn a_transfer_needs_two_accounts_and_a_short_reference() {
    let request = |to: &str, reference: String| TransferCommand::Request {
        id: transfer_id(),
        from: account("a"),
        to: account(to),
        amount: usd("1.00"),
        reference: Some(Reference::Legacy(reference)),
        from_at_request: Revision::ZERO,
        to_at_request: Revision::ZERO,
    };
    Test::given_no_previous_events()
        .when(request("a", String::new()))
        .then_expect_error(TransferError::SameAccount);
    Test::given_no_previous_events()
        .when(request("b", "é".repeat(141)))
        .then_expect_error(TransferError::ReferenceTooLong(141));
    Test::given(vec![requested()])
        .when(request("b", String::new()))
        .then_expect_error(TransferError::AlreadyRequested);
}

/// Every schema version ever written stays readable: one fixture per version, forever.
#[test]
fn every_stored_transfer_fixture_decodes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transfer-fixtures");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let stored = StoredCommit::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
        let commit = Commit::<TransferEvent>::decode(&stored)
            .unwrap_or_else(|e| panic!("{} no longer decodes: {e}", path.display()));
        let again = Commit::<TransferEvent>::decode(&commit.encode()).unwrap();
        assert_eq!(again.events, commit.events);
        assert_eq!(
            TransferId::of_stream(&stored.stream).map(|t| t.to_string()),
            Some("5d41402abc4b2a76b9719d911017c592".to_owned())
        );
        seen += 1;
    }
    assert_eq!(seen, 8, "one fixture per event type and version");
}
