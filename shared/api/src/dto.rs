//! Request and response bodies. Requests accept the seed project's capitalised field
//! names (`ID`, `Amount`) and lower-case ones; responses use lower case.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tally_app::{AccountView, TransactionView};
use tally_domain::Currency;
use time::OffsetDateTime;
use utoipa::ToSchema;

/// `POST /accounts`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    /// The new account's id: 1–64 characters from `A-Z a-z 0-9 _ -`. `ID` or `id`.
    #[serde(rename = "ID", alias = "id")]
    #[schema(example = "account123")]
    pub id: String,
    /// The holder's details: sealed under a key of their own before they are stored,
    /// and erased for good by `POST /accounts/{id}/forget`.
    #[serde(default)]
    pub holder: Option<HolderDetails>,
}

/// A holder's personal data.
#[derive(Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HolderDetails {
    /// 1–200 characters, no control characters.
    #[schema(
        example = "Ada Lovelace",
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    pub name: String,
    /// 3–254 characters with an `@`, no spaces or control characters.
    #[schema(
        example = "ada@example.com",
        min_length = 3,
        max_length = 254,
        pattern = r"^[^\s\x00-\x1f\x7f-\x9f]*@[^\s\x00-\x1f\x7f-\x9f]*$"
    )]
    pub email: String,
}

impl HolderDetails {
    /// `Ok` if the details are within their limits.
    pub fn check(&self) -> Result<(), String> {
        let name = self.name.chars().count();
        if !(1..=200).contains(&name) || self.name.chars().any(char::is_control) {
            return Err("holder.name: 1 to 200 characters, no control characters".into());
        }
        let email = self.email.chars().count();
        if !(3..=254).contains(&email)
            || !self.email.contains('@')
            || self
                .email
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err("holder.email: 3 to 254 characters with an @, no spaces".into());
        }
        Ok(())
    }
}

/// The holder as `GET /accounts/{id}` shows it: the details, or that they were erased.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum HolderView {
    Details(HolderDetails),
    Erased {
        /// Always `true`: the holder's personal data was forgotten.
        erased: bool,
    },
}

/// An amount: a JSON number or a decimal string. Its schema is written out in
/// `openapi::value`, since no Rust type here is "decimal text in either JSON form".
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AmountValue(String);

/// `POST /accounts/{id}/deposit` and `/withdraw`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AmountRequest {
    /// Greater than zero, at most the configured maximum. `Amount` or `amount`.
    #[serde(rename = "Amount", alias = "amount")]
    #[schema(value_type = AmountValue)]
    pub amount: Box<RawValue>,
}

impl AmountRequest {
    /// The amount's decimal text, whether it came as a number or a string.
    pub fn text(&self) -> Result<String, String> {
        let raw = self.amount.get().trim();
        if raw.starts_with('"') {
            serde_json::from_str::<String>(raw).map_err(|e| e.to_string())
        } else if raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            Ok(raw.to_owned())
        } else {
            Err(format!(
                "Amount must be a number or a decimal string, not {}",
                raw.chars().take(20).collect::<String>()
            ))
        }
    }
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What a command did.
#[derive(Serialize, ToSchema)]
pub struct CommandResponse {
    #[schema(example = "account123")]
    pub id: String,
    /// The stream revision after this command; send it as `min_revision` to read your
    /// own write, or as `If-Match` to write only if nothing changed in between.
    #[schema(example = 3)]
    pub revision: u64,
    /// `open` or `closed`.
    #[schema(example = "open")]
    pub status: &'static str,
    /// The balance after this command, as decimal text.
    #[schema(example = "350.00")]
    pub balance: String,
    #[schema(example = "USD")]
    pub currency: String,
    /// The amount moved, for deposits and withdrawals.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "150.00")]
    pub amount: Option<String>,
    /// When the command was recorded (RFC 3339).
    pub recorded_at: String,
}

impl CommandResponse {
    pub fn new(
        id: &str,
        revision: u64,
        closed: bool,
        balance: i64,
        currency: Currency,
        amount: Option<i64>,
        recorded_at: OffsetDateTime,
    ) -> Self {
        Self {
            id: id.to_owned(),
            revision,
            status: if closed { "closed" } else { "open" },
            balance: currency.format(balance),
            currency: currency.code().to_owned(),
            amount: amount.map(|a| currency.format(a)),
            recorded_at: rfc3339(recorded_at),
        }
    }
}

/// `GET /accounts/{id}/balance`
#[derive(Serialize, ToSchema)]
pub struct BalanceResponse {
    #[schema(example = "account123")]
    pub id: String,
    #[schema(example = "350.00")]
    pub balance: String,
    #[schema(example = "USD")]
    pub currency: String,
    /// The revision this balance reflects.
    #[schema(example = 3)]
    pub revision: u64,
    /// When the event at `revision` was recorded: as-of balances only.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "2026-12-01T09:58:12.5Z")]
    pub recorded_at: Option<String>,
}

/// `GET /accounts/{id}`
#[derive(Serialize, ToSchema)]
pub struct AccountResponse {
    #[schema(example = "account123")]
    pub id: String,
    #[schema(example = "open")]
    pub status: &'static str,
    #[schema(example = "350.00")]
    pub balance: String,
    #[schema(example = "USD")]
    pub currency: String,
    #[schema(example = 3)]
    pub revision: u64,
    pub opened_at: String,
    pub updated_at: String,
    /// The holder's details, `{"erased": true}` once forgotten; absent if none were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<HolderView>,
}

impl From<AccountView> for AccountResponse {
    fn from(v: AccountView) -> Self {
        Self {
            id: v.id.to_string(),
            status: if v.closed { "closed" } else { "open" },
            balance: v.currency.format(v.balance),
            currency: v.currency.code().to_owned(),
            revision: v.revision.get(),
            opened_at: rfc3339(v.opened_at),
            updated_at: rfc3339(v.updated_at),
            holder: None,
        }
    }
}

/// One money movement: a deposit, a withdrawal, or a transfer's credit, debit or
/// refund.
#[derive(Serialize, ToSchema)]
pub struct TransactionItem {
    #[schema(example = 2)]
    pub revision: u64,
    /// `deposit`, `withdrawal`, `transfer-in`, `transfer-out` or `transfer-refund` (a
    /// transfer's debit given back because the credit was refused).
    #[serde(rename = "type")]
    #[schema(
        example = "deposit",
        pattern = "^(deposit|withdrawal|transfer-in|transfer-out|transfer-refund)$"
    )]
    pub kind: &'static str,
    #[schema(example = "500.00")]
    pub amount: String,
    /// The balance after this transaction.
    #[schema(example = "500.00")]
    pub balance: String,
    pub recorded_at: String,
    /// A transfer's movement: the transfer's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "5d41402abc4b2a76b9719d911017c592")]
    pub transfer: Option<String>,
    /// A transfer's movement: the other account (where the money went, or came from;
    /// for a refund, the account that refused the credit).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "account456")]
    pub counterparty: Option<String>,
}

impl TransactionItem {
    pub fn new(t: &TransactionView, currency: Currency) -> Self {
        Self {
            revision: t.revision.get(),
            kind: t.kind.name(),
            amount: currency.format(t.amount),
            balance: currency.format(t.balance),
            recorded_at: rfc3339(t.recorded_at),
            transfer: t.transfer.as_ref().map(|(t, _)| t.as_str().to_owned()),
            counterparty: t.transfer.as_ref().map(|(_, c)| c.as_str().to_owned()),
        }
    }
}

/// `GET /accounts/{id}/transactions`: one page, oldest first.
#[derive(Serialize, ToSchema)]
pub struct TransactionsPage {
    #[schema(example = "account123")]
    pub id: String,
    pub items: Vec<TransactionItem>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `GET /accounts/{id}/statement`: a period's opening balance, movements and closing
/// balance; closing = opening + in − out, to the cent.
#[derive(Serialize, ToSchema)]
pub struct StatementResponse {
    #[schema(example = "account123")]
    pub id: String,
    #[schema(example = "USD")]
    pub currency: String,
    /// The period's start (inclusive).
    #[schema(example = "2026-12-01T00:00:00Z")]
    pub from: String,
    /// The period's end (exclusive).
    #[schema(example = "2027-01-01T00:00:00Z")]
    pub to: String,
    /// The balance right before the period.
    #[schema(example = "100.00")]
    pub opening_balance: String,
    /// The deposits in the period, summed.
    #[schema(example = "500.00")]
    pub money_in: String,
    /// The withdrawals in the period, summed.
    #[schema(example = "150.00")]
    pub money_out: String,
    /// The balance at the end of the period (so far, for a period still running).
    #[schema(example = "450.00")]
    pub closing_balance: String,
    /// The account revision the statement reflects.
    #[schema(example = 7)]
    pub revision: u64,
    /// Every deposit and withdrawal in the period, oldest first.
    pub movements: Vec<TransactionItem>,
}

/// An RFC 9457 problem (`application/problem+json`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ProblemBody {
    /// Stable: `/problems/{kind}`, e.g. `/problems/insufficient-funds`.
    #[serde(rename = "type")]
    #[schema(example = "/problems/insufficient-funds")]
    pub kind: String,
    #[schema(example = "Insufficient funds")]
    pub title: String,
    #[schema(example = 422)]
    pub status: u16,
    #[schema(example = "insufficient funds: balance 5.00, requested 10.00")]
    pub detail: String,
}

/// `POST /transfers`
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequestBody {
    /// The account debited.
    #[schema(example = "account123", pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub from: String,
    /// The account credited; not `from`.
    #[schema(example = "account456", pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub to: String,
    /// Greater than zero, at most the configured maximum.
    #[schema(value_type = AmountValue)]
    pub amount: Box<RawValue>,
    /// Free text for both accounts' holders, at most 140 characters.
    #[serde(default)]
    #[schema(example = "rent", max_length = 140)]
    pub reference: String,
}

impl TransferRequestBody {
    /// The amount as a deposit's would be read.
    pub fn amount(&self) -> AmountRequest {
        AmountRequest {
            amount: self.amount.clone(),
        }
    }
}

/// A step of a transfer as it was recorded.
#[derive(Serialize, ToSchema)]
pub struct TransferStepItem {
    /// `requested`, `debited`, `failed`, `credited`, `credit-refused` or `reversed`.
    #[schema(example = "debited")]
    pub step: &'static str,
    /// The account the step changed (the debit, credit or refund).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "account123")]
    pub account: Option<String>,
    /// The account's revision that step produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = 4)]
    pub revision: Option<u64>,
    /// When the step was recorded (RFC 3339).
    pub at: String,
}

/// Why a transfer failed or was reversed.
#[derive(Serialize, ToSchema)]
pub struct TransferFailureItem {
    /// `insufficient-funds`, `account-not-found`, `account-closed`,
    /// `currency-mismatch` or `balance-limit`.
    #[schema(example = "insufficient-funds")]
    pub code: String,
    /// The account that refused.
    #[schema(example = "account123")]
    pub account: String,
    #[schema(example = "insufficient funds: balance 10.00 USD, requested 25.00 USD")]
    pub detail: String,
}

/// A transfer and where it is.
#[derive(Serialize, ToSchema)]
pub struct TransferResponse {
    #[schema(example = "5d41402abc4b2a76b9719d911017c592")]
    pub id: String,
    /// `pending` (not ended yet), `completed`, `failed` (nothing moved) or `reversed`
    /// (the debit was refunded because the credit was refused).
    #[schema(
        example = "completed",
        pattern = "^(pending|completed|failed|reversed)$"
    )]
    pub status: &'static str,
    #[schema(example = "account123")]
    pub from: String,
    #[schema(example = "account456")]
    pub to: String,
    #[schema(example = "25.00")]
    pub amount: String,
    #[schema(example = "USD")]
    pub currency: String,
    /// The reference, `""` if none was given or it was erased.
    #[schema(example = "rent")]
    pub reference: String,
    /// `true` once the debited account's holder was forgotten: the reference, sealed
    /// under their key, is erased with them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reference_erased: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<TransferFailureItem>,
    /// Every step so far, oldest first.
    pub steps: Vec<TransferStepItem>,
}

impl TransferResponse {
    /// The view, with its reference as opened (`Some(text)`, or `None`: erased).
    pub fn new(view: &tally_app::TransferView, reference: Option<String>) -> Self {
        let t = &view.state;
        let currency = t.currency.unwrap_or(Currency::USD);
        Self {
            id: view.id.as_str().to_owned(),
            status: t.status.name(),
            from: t
                .from
                .as_ref()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default(),
            to: t
                .to
                .as_ref()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default(),
            amount: currency.format(t.amount),
            currency: currency.code().to_owned(),
            reference_erased: reference.is_none(),
            reference: reference.unwrap_or_default(),
            failure: t.failure.as_ref().map(|f| TransferFailureItem {
                code: if f.code == "balance-overflow" {
                    "balance-limit".into()
                } else {
                    f.code.clone()
                },
                account: f.account.as_str().to_owned(),
                detail: f.detail.clone(),
            }),
            steps: view
                .steps
                .iter()
                .map(|s| TransferStepItem {
                    step: s.name,
                    account: s.account.as_ref().map(|(a, _)| a.as_str().to_owned()),
                    revision: s.account.as_ref().map(|(_, r)| r.get()),
                    at: rfc3339(s.at),
                })
                .collect(),
        }
    }
}
