//! `/api/v1/accounts`: open, deposit, close, look up and list. Changes are
//! events appended to `payment.inflight`; the account processor applies them.

use std::time::Duration;

use axum::extract::{OriginalUri, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody, JsonBody, Path, Query};
use super::forward::{self, Owner, Scope};
use super::idempotency::{IdempotencyKey, REPLAYED};
use super::State;
use crate::model::{new_payment_id, now_ms, partition_for, validate_id, Event};
use crate::pipeline::account::{Account, AccountStatus, Accounts};
use crate::pipeline::Processor;

/// How long `POST /accounts` waits for the account processor to apply the
/// open, and `POST /accounts/{id}/close` the close.
const OPEN_WAIT: Duration = Duration::from_secs(5);

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new()
        .routes(routes!(open_account, list_accounts))
        .routes(routes!(get_account))
        .routes(routes!(deposit))
        .routes(routes!(close_account))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    /// 1–64 characters of `[A-Za-z0-9_.:-]`.
    #[schema(example = "alice")]
    pub id: String,
    /// Opening balance in cents (≥ 0).
    #[schema(example = 100000)]
    pub opening_balance: i64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DepositRequest {
    /// Amount in cents (> 0).
    #[schema(example = 2500)]
    pub amount: i64,
    /// Makes the deposit happen once: the same id again changes nothing
    /// (202, `Idempotent-Replayed: true`), with another amount 409. Without
    /// it, the `Idempotency-Key` is the id.
    #[schema(example = "dep-2026-0001")]
    pub id: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AccountView {
    #[schema(example = "alice")]
    pub id: String,
    /// Balance in cents.
    #[schema(example = 100000)]
    pub balance: i64,
    /// `open`, `closing` (its balance is moving out) or `closed`.
    #[schema(example = "open")]
    pub status: String,
    /// Opening time, ms since the epoch.
    pub opened_at: i64,
    /// Last change, ms since the epoch.
    pub updated_at: i64,
    /// The last payment that moved its money.
    pub last_payment_id: Option<String>,
    /// While closing: the payment moving its balance out, and where to.
    pub closing: Option<ClosingView>,
    /// When it closed, ms since the epoch.
    pub closed_at: Option<i64>,
    /// The payment that moved its balance out as it closed (absent: it
    /// closed empty).
    pub emptied_by: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ClosingView {
    /// The payment moving the balance.
    pub payment_id: String,
    /// The account it goes to.
    pub transfer_to: String,
}

impl From<Account> for AccountView {
    fn from(account: Account) -> Self {
        Self {
            id: account.id,
            balance: account.balance_cents,
            status: status_name(account.status).into(),
            opened_at: account.opened_at_ms,
            updated_at: account.updated_at_ms,
            last_payment_id: account.last_payment_id,
            closing: account.closing.map(|c| ClosingView {
                payment_id: c.payment_id,
                transfer_to: c.to,
            }),
            closed_at: account.closed_at_ms,
            emptied_by: account.emptied_by,
        }
    }
}

fn status_name(status: AccountStatus) -> &'static str {
    match status {
        AccountStatus::Open => "open",
        AccountStatus::Closing => "closing",
        AccountStatus::Closed => "closed",
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AccountPage {
    pub items: Vec<AccountView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AccountChange {
    #[schema(example = "alice")]
    pub account: String,
    /// `accepted`: durable in the log, applied shortly; `closing`: its
    /// balance is moving out as payment `payment_id`.
    #[schema(example = "accepted")]
    pub status: String,
    /// The payment moving a closing account's balance (`GET /api/v1/payments/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseRequest {
    /// Where the balance goes: an open account. Required when the balance
    /// is not zero; the account closes once that payment is confirmed.
    #[schema(example = "bob")]
    pub transfer_to: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size (default 100, at most the configured page limit).
    pub limit: Option<usize>,
    /// Return accounts with ids after this one.
    pub after: Option<String>,
    /// `cluster` (default) or `member` (only the partitions this instance owns).
    #[param(inline)]
    pub scope: Option<Scope>,
}

fn check_id(id: &str) -> Result<(), ApiError> {
    validate_id(id).map_err(|e| ApiError::BadRequest(format!("account id {e}")))
}

fn check_amount(state: &State, amount: i64, what: &str, min: i64) -> Result<(), ApiError> {
    let max = state.runtime.config().limits.max_amount_cents;
    if amount < min || amount > max {
        return Err(ApiError::BadRequest(format!(
            "{what} must be between {min} and {max} cents, got {amount}"
        )));
    }
    Ok(())
}

fn existing(state: &State, id: &str) -> Result<Account, ApiError> {
    check_id(id)?;
    state
        .runtime
        .account(id)?
        .ok_or_else(|| ApiError::NotFound(format!("account {id} does not exist")))
}

/// Open an account with an opening balance.
#[utoipa::path(post, path = "/api/v1/accounts", tag = "accounts", request_body = OpenAccountRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the call safe to repeat: the same key and body get the first answer again (`Idempotent-Replayed: true`), another body 409")),
    responses((status = 201, body = AccountView), (status = 202, body = AccountChange),
              (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn open_account(
    Extract(state): Extract<State>,
    JsonBody(request): JsonBody<OpenAccountRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    check_id(&request.id)?;
    check_amount(&state, request.opening_balance, "opening_balance", 0)?;
    if state.runtime.account(&request.id)?.is_some() {
        return Err(ApiError::Conflict(format!(
            "account {} already exists",
            request.id
        )));
    }
    let event = Event::OpenAccount {
        account: request.id.clone(),
        opening_balance_cents: request.opening_balance,
        at_ms: now_ms(),
    };
    state.runtime.check_space()?;
    if state.runtime.apply_account_event(event, OPEN_WAIT).await? {
        if let Some(account) = state.runtime.account(&request.id)? {
            let view = serde_json::to_value(AccountView::from(account)).expect("serializable");
            return Ok((StatusCode::CREATED, Json(view)));
        }
    }
    let change = AccountChange::accepted(request.id);
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::to_value(change).expect("serializable")),
    ))
}

/// One account. On a cluster, answered by the owner of the account's partition.
#[utoipa::path(get, path = "/api/v1/accounts/{id}", tag = "accounts",
    params(("id" = String, Path, description = "Account id")),
    responses((status = 200, body = AccountView), (status = 404, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "The cluster is rebalancing, or the owner did not answer")))]
async fn get_account(
    Extract(state): Extract<State>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let partition = partition_for(&id, state.runtime.config().log.partitions);
    match forward::owner_of(&state, Accounts::NAME, partition, &headers)? {
        Owner::Here => {
            let view = AccountView::from(existing(&state, &id)?);
            Ok(forward::answered_here(&state, Json(view).into_response()))
        }
        Owner::At(url) => forward::forward(&state, &url, &uri, &headers).await,
    }
}

/// Accounts in id order, across all partitions. On a cluster, each member
/// gives the page of the partitions it owns, and the pages are merged.
#[utoipa::path(get, path = "/api/v1/accounts", tag = "accounts", params(PageQuery),
    responses((status = 200, body = AccountPage), (status = 400, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "The cluster is rebalancing, or a member did not answer")))]
async fn list_accounts(
    Extract(state): Extract<State>,
    Query(query): Query<PageQuery>,
    headers: HeaderMap,
) -> Result<Json<AccountPage>, ApiError> {
    let limit = super::page_limit(&state, query.limit, 100)?;
    if let Some(after) = &query.after {
        validate_id(after).map_err(|e| ApiError::BadRequest(format!("after {e}")))?;
    }
    let after = query.after.as_deref();
    let owned = state.runtime.ownership().owned();
    let ownership = state.runtime.ownership();
    let partitions = state.runtime.config().log.partitions;
    let taking_over =
        (0..partitions).find(|&p| owned.owns(p) && !ownership.acts_for(Accounts::NAME, p));
    if let (Some(p), Some(_)) = (taking_over, state.membership.get()) {
        return Err(ApiError::Unavailable(format!(
            "partition {p} is being taken over by this instance; retry shortly"
        )));
    }
    let mut accounts = (state.runtime).accounts_page(after, limit + 1, |p| owned.owns(p))?;
    if query.scope.unwrap_or_default() == Scope::Cluster {
        let size = (limit + 1).to_string();
        let mut asked = vec![("limit", size.as_str())];
        asked.extend(after.map(|after| ("after", after)));
        let pages =
            forward::gather_all::<AccountPage>(&state, "/api/v1/accounts", &asked, &headers);
        // Each member's page has `limit + 1` items, so the merge can tell whether more follow.
        let others = pages
            .await?
            .into_iter()
            .flatten()
            .flat_map(|page| page.items);
        let mut merged: Vec<AccountView> =
            accounts.into_iter().map(Into::into).chain(others).collect();
        merged.sort_by(|a, b| a.id.cmp(&b.id));
        return Ok(Json(page_of(merged, limit)));
    }
    accounts.truncate(limit + 1);
    Ok(Json(page_of(
        accounts.into_iter().map(Into::into).collect(),
        limit,
    )))
}

/// The first `limit` of `sorted`, and where the next page starts if more follow.
fn page_of(mut sorted: Vec<AccountView>, limit: usize) -> AccountPage {
    let more = sorted.len() > limit;
    sorted.truncate(limit);
    let next = more.then(|| sorted.last().map(|a| a.id.clone())).flatten();
    AccountPage {
        items: sorted,
        next,
    }
}

/// Add money to an open account.
#[utoipa::path(post, path = "/api/v1/accounts/{id}/deposit", tag = "accounts",
    params(("id" = String, Path, description = "Account id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the call safe to repeat: \
        the same key and body get the first answer again (`Idempotent-Replayed: true`), another body 409; \
        without an `id` in the body the key is the deposit's id, applied once")), request_body = DepositRequest,
    responses((status = 202, body = AccountChange), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn deposit(
    Extract(state): Extract<State>,
    Path(id): Path<String>,
    key: Option<axum::Extension<IdempotencyKey>>,
    JsonBody(request): JsonBody<DepositRequest>,
) -> Result<Response, ApiError> {
    check_amount(&state, request.amount, "amount", 1)?;
    let account = existing(&state, &id)?;
    if account.status != AccountStatus::Open {
        let status = status_name(account.status);
        return Err(ApiError::Conflict(format!("account {id} is {status}")));
    }
    let deposit_id = request
        .id
        .or(key.map(|axum::Extension(IdempotencyKey(key))| key));
    let Some(deposit_id) = deposit_id else {
        let event = Event::Deposit {
            account: id.clone(),
            amount_cents: request.amount,
            at_ms: now_ms(),
        };
        return Ok(accept_account_event(&state, id, event)
            .await?
            .into_response());
    };
    validate_id(&deposit_id).map_err(|e| ApiError::BadRequest(format!("deposit id {e}")))?;
    let kept = account.deposits.as_deref().into_iter().flatten();
    if let Some(before) = kept.into_iter().find(|k| k.id == deposit_id) {
        if before.amount_cents != request.amount {
            return Err(ApiError::Conflict(format!(
                "deposit {deposit_id} was made with {} cents, not {}",
                before.amount_cents, request.amount
            )));
        }
        let change = AccountChange::accepted(id);
        let mut response = (StatusCode::ACCEPTED, Json(change)).into_response();
        response
            .headers_mut()
            .insert(REPLAYED, axum::http::HeaderValue::from_static("true"));
        return Ok(response);
    }
    let event = Event::KeyedDeposit {
        account: id.clone(),
        amount_cents: request.amount,
        at_ms: now_ms(),
        id: deposit_id,
    };
    Ok(accept_account_event(&state, id, event)
        .await?
        .into_response())
}

/// Close an account. With money in it, name where the money goes
/// (`transfer_to`): it moves as a payment, and the account closes once that
/// is confirmed (`closing` until then; a reversal reopens it). A closed
/// account refuses payments from it and reverses payments to it.
#[utoipa::path(post, path = "/api/v1/accounts/{id}/close", tag = "accounts", request_body(content = Option<CloseRequest>, description = "Optional; required with a balance"),
    params(("id" = String, Path, description = "Account id"), ("Idempotency-Key" = Option<String>, Header, description = "Makes the call safe to repeat: the same key and body get the first answer again (`Idempotent-Replayed: true`), another body 409")),
    responses((status = 200, body = AccountView, description = "Closed"),
              (status = 202, body = AccountChange, description = "Closing (the balance is moving as `payment_id`), or accepted and not applied yet"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "`balance_not_zero` without `transfer_to`; already closed or closing; `transfer_to` not open")))]
async fn close_account(
    Extract(state): Extract<State>,
    Path(id): Path<String>,
    request: Option<JsonBody<CloseRequest>>,
) -> Result<Response, ApiError> {
    let account = existing(&state, &id)?;
    let transfer_to = request.and_then(|JsonBody(r)| r.transfer_to);
    let event = match (account.status, account.balance_cents, transfer_to) {
        (AccountStatus::Closing, ..) => {
            return Err(ApiError::Conflict(format!("account {id} is closing")));
        }
        (AccountStatus::Closed, 0, _) => {
            return Err(ApiError::Conflict(format!(
                "account {id} is already closed"
            )));
        }
        (_, balance, None) if balance != 0 => return Err(not_zero(&id, balance)),
        (_, _, None) => Event::CloseAccount {
            account: id.clone(),
            at_ms: now_ms(),
        },
        (_, balance, Some(to)) => {
            check_transfer(&state, &id, balance, &to)?;
            Event::CloseAccountTo {
                account: id.clone(),
                to,
                payment_id: new_payment_id(),
                at_ms: now_ms(),
            }
        }
    };
    state.runtime.check_space()?;
    if !state.runtime.apply_account_event(event, OPEN_WAIT).await? {
        return Ok((StatusCode::ACCEPTED, Json(AccountChange::accepted(id))).into_response());
    }
    let account = existing(&state, &id)?;
    match account.status {
        AccountStatus::Closed => Ok(Json(AccountView::from(account)).into_response()),
        AccountStatus::Closing => {
            let change = AccountChange {
                account: id,
                status: "closing".into(),
                payment_id: account.closing.map(|c| c.payment_id),
            };
            Ok((StatusCode::ACCEPTED, Json(change)).into_response())
        }
        // Money came in between the check and the close: it stays open.
        AccountStatus::Open => Err(not_zero(&id, account.balance_cents)),
    }
}

fn not_zero(id: &str, balance: i64) -> ApiError {
    ApiError::ConflictAs(
        "balance_not_zero",
        format!(
            "account {id} holds {balance} cents: close it with {{\"transfer_to\": \"<account>\"}} \
             to move them to another account"
        ),
    )
}

/// Whether `balance` can move from `id` to `to` as one payment.
fn check_transfer(state: &State, id: &str, balance: i64, to: &str) -> Result<(), ApiError> {
    validate_id(to).map_err(|e| ApiError::BadRequest(format!("transfer_to {e}")))?;
    if to == id {
        return Err(ApiError::BadRequest(
            "transfer_to is the account being closed".into(),
        ));
    }
    let max = state.runtime.config().limits.max_amount_cents;
    if balance > max {
        return Err(ApiError::ConflictAs(
            "balance_above_limit",
            format!(
                "account {id} holds {balance} cents, more than one payment may move \
                 (limits.max_amount_cents = {max}): pay part of it out first"
            ),
        ));
    }
    match state.runtime.account(to)? {
        Some(target) if target.status == AccountStatus::Open => Ok(()),
        Some(target) => Err(ApiError::Conflict(format!(
            "transfer_to account {to} is {}",
            status_name(target.status)
        ))),
        None => Err(ApiError::Conflict(format!(
            "transfer_to account {to} does not exist"
        ))),
    }
}

impl AccountChange {
    fn accepted(account: String) -> Self {
        Self {
            account,
            status: "accepted".into(),
            payment_id: None,
        }
    }
}

/// Appends an account event (unless the data device is short of space) and
/// answers 202: the account processor applies it in order.
async fn accept_account_event(
    state: &State,
    account: String,
    event: Event,
) -> Result<(StatusCode, Json<AccountChange>), ApiError> {
    state.runtime.check_space()?;
    state.runtime.append_account_events(vec![event]).await?;
    Ok((StatusCode::ACCEPTED, Json(AccountChange::accepted(account))))
}
