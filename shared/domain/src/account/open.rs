//! Opening an account: only on an empty stream.

use super::{Account, AccountError, AccountEvent, AccountStatus};
use crate::{AccountId, Currency, Owner};
use tally_es::Sealed;

pub(super) fn decide(
    account: &Account,
    id: AccountId,
    currency: Currency,
    owner: Option<Owner>,
    holder: Option<Sealed>,
) -> Result<Vec<AccountEvent>, AccountError> {
    if account.status != AccountStatus::NotOpened {
        return Err(AccountError::AlreadyOpen);
    }
    Ok(vec![AccountEvent::Opened {
        id,
        currency,
        owner,
        holder,
    }])
}
