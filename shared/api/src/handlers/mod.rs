//! One file per function: parse → domain → ports. Shared response shaping here.

pub mod close_account;
pub mod deposit;
pub mod forget_holder;
pub mod get_account;
pub mod get_balance;
pub mod get_statement;
pub mod get_transfer;
pub mod list_transactions;
pub mod open_account;
pub mod request_transfer;
pub mod withdraw;

use crate::dto::CommandResponse;
use crate::extract::CommandHeaders;
use crate::{ApiError, AppState, Who};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tally_app::{CachedBalance, CommandContext, Executed};
use tally_domain::{Account, AccountCommand, AccountEvent, AccountId, Revision};

/// Run `command` on account `id`; `fingerprint` describes the request for
/// `Idempotency-Key` reuse detection.
pub(crate) async fn run_command(
    state: &AppState,
    who: &Who,
    id: &AccountId,
    command: AccountCommand,
    fingerprint: String,
    headers: CommandHeaders,
    success: StatusCode,
) -> Result<Response, ApiError> {
    let ctx = CommandContext {
        idempotency: headers
            .idempotency_key
            .map(|k| (k.as_str().to_owned(), fingerprint)),
        expected: headers.expected,
        request_id: headers.request_id,
        key_unused_through: None,
        caller: who.caller.clone(),
    };
    // The command runs in a task of its own: a client that hangs up drops this
    // handler's future, and a command cut off between its append and its publish (or
    // its cache write) would leave a commit that no projection in this process sees.
    // The task finishes whatever happens to the request.
    let work = {
        let state = state.clone();
        let id = id.clone();
        async move {
            let executed = state
                .commands
                .execute(id.stream_id(), command, &ctx)
                .await?;
            let summary = Summary::of(&executed.commit);
            // A replayed or superseded answer is history: caching its balance could put
            // an old one back.
            if !executed.replayed && !executed.superseded {
                let balance = CachedBalance {
                    balance: summary.balance,
                    currency: state.policy.currency,
                    revision: executed.commit.last_revision(),
                };
                state.queries.note_write(&id, balance).await;
            }
            Ok::<_, ApiError>((executed, summary))
        }
    };
    let (executed, summary) = tokio::spawn(work)
        .await
        .map_err(|e| ApiError::Internal(format!("the command's task failed: {e}")))??;
    Ok(respond(state, id, &executed, &summary, success))
}

/// What a commit left the account as: read once from its events (each carries the
/// balance after it), for the response and for the cache.
struct Summary {
    closed: bool,
    balance: i64,
    amount: Option<i64>,
}

impl Summary {
    fn of(commit: &tally_es::Commit<AccountEvent>) -> Self {
        let mut summary = Summary {
            closed: false,
            balance: 0,
            amount: None,
        };
        for event in &commit.events {
            if matches!(event, AccountEvent::Closed) {
                summary.closed = true;
            }
            if let Some((amount, balance)) = event.movement() {
                summary.balance = balance;
                summary.amount = Some(amount);
            }
            if let AccountEvent::HolderForgotten { balance } = event {
                summary.balance = *balance;
            }
        }
        summary
    }
}

fn respond(
    state: &AppState,
    id: &AccountId,
    executed: &Executed<Account>,
    summary: &Summary,
    success: StatusCode,
) -> Response {
    let commit = &executed.commit;
    let revision = commit.last_revision();
    let body = CommandResponse::new(
        id.as_str(),
        revision.get(),
        summary.closed,
        summary.balance,
        state.policy.currency,
        summary.amount,
        commit.recorded_at,
    );
    let mut response = (success, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(revision));
    if success == StatusCode::CREATED {
        if let Ok(location) = HeaderValue::from_str(&format!("/accounts/{id}")) {
            headers.insert(header::LOCATION, location);
        }
    }
    if executed.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// The holder of account `id` as a client may see it: the details opened from their
/// sealed form, `{"erased": true}` once their key is destroyed, `None` if none were given.
pub(crate) async fn holder(
    state: &AppState,
    who: &Who,
    id: &AccountId,
) -> Result<Option<crate::dto::HolderView>, ApiError> {
    use crate::dto::{HolderDetails, HolderView};
    let Some(sealed) = state.queries.holder(id, &who.caller).await? else {
        return Ok(None);
    };
    match vault(state)?.open(&sealed, HOLDER).await? {
        tally_vault::Opened::Erased => Ok(Some(HolderView::Erased { erased: true })),
        tally_vault::Opened::Plain(bytes) => {
            // `null`: the account's key was made without details (for free text).
            let details: Option<HolderDetails> = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::Internal(format!("sealed holder details: {e}")))?;
            Ok(details.map(HolderView::Details))
        }
    }
}

/// The purpose holder details are sealed for (`tally_vault`'s associated data).
pub(crate) const HOLDER: &str = "holder";

/// The purpose a transfer's reference is sealed for.
pub(crate) const REFERENCE: &str = "reference";

/// The vault, or 503: this deployment has no master key.
pub(crate) fn vault(state: &AppState) -> Result<&tally_vault::Vault, ApiError> {
    state.vault.as_ref().ok_or_else(|| {
        ApiError::Unavailable(
            "personal data and free text need a master key (TALLY_MASTER_KEY), and this deployment has none"
                .into(),
        )
    })
}

/// A transfer's reference as a client sees it: `Some(text)` (`""`: none given), or
/// `None` once it is erased with the debited account's holder.
pub(crate) async fn reference_text(
    state: &AppState,
    view: &tally_app::TransferView,
) -> Result<Option<String>, ApiError> {
    match &view.state.reference {
        None => Ok(Some(String::new())),
        Some(tally_domain::Reference::Legacy(text)) => Ok(Some(text.clone())),
        Some(tally_domain::Reference::Sealed(sealed)) => {
            match vault(state)?.open(sealed, REFERENCE).await? {
                tally_vault::Opened::Erased => Ok(None),
                tally_vault::Opened::Plain(bytes) => {
                    Ok(Some(String::from_utf8(bytes).map_err(|e| {
                        ApiError::Internal(format!("a sealed reference: {e}"))
                    })?))
                }
            }
        }
    }
}

/// The amount of a deposit or withdrawal, parsed under the deployment's policy.
pub(crate) fn amount(
    state: &AppState,
    request: &crate::dto::AmountRequest,
) -> Result<tally_domain::Amount, ApiError> {
    let text = request.text().map_err(ApiError::InvalidAmount)?;
    state
        .policy
        .parse(&text)
        .map_err(|e| ApiError::InvalidAmount(e.to_string()))
}

/// A revision as a strong ETag: `"3"`.
pub(crate) fn etag(revision: Revision) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).expect("digits are a valid header")
}
