//! The clients: a seeded random mix of operations over HTTP, each recorded in the
//! history with its outcome.

use crate::Plan;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// What an operation was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Open,
    Deposit,
    Withdraw,
    Close,
    Balance,
    Account,
    /// `POST /transfers` from `account` to `to` (always with a key: the API requires it).
    Transfer,
    /// `POST /accounts/{id}/forget`: the holder's details (given at the opening) erased.
    Forget,
}

impl Kind {
    pub fn is_command(self) -> bool {
        matches!(
            self,
            Kind::Open
                | Kind::Deposit
                | Kind::Withdraw
                | Kind::Close
                | Kind::Transfer
                | Kind::Forget
        )
    }

    /// A command on one account, answered with that account's revision.
    pub fn is_account_command(self) -> bool {
        self.is_command() && self != Kind::Transfer
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Open => "open",
            Kind::Deposit => "deposit",
            Kind::Withdraw => "withdraw",
            Kind::Close => "close",
            Kind::Balance => "balance",
            Kind::Account => "account",
            Kind::Transfer => "transfer",
            Kind::Forget => "forget",
        }
    }
}

/// How an operation ended, as Jepsen names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Acknowledged (2xx).
    Ok,
    /// Refused: it took no effect (4xx, or a 503 that is not `outcome-unknown`).
    Fail,
    /// Unknown: no answer, a hang-up, a timeout, `outcome-unknown`, a 5xx. Allowed
    /// either way by the checker.
    Info,
}

/// One operation of the history.
#[derive(Clone, Debug, Serialize)]
pub struct Op {
    pub client: usize,
    pub kind: Kind,
    pub account: String,
    /// A transfer's credited account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The id an acknowledged transfer was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<String>,
    /// Minor units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub if_match: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_revision: Option<u64>,
    /// The newest revision of this account acknowledged to this client (by a command
    /// or a read) before this operation started.
    pub floor: u64,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<i64>,
    /// Sent over a socket that was closed before the answer.
    pub hung_up: bool,
    /// A retry (same key) of an earlier operation that timed out or hung up.
    pub retry: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every operation of every client, in the order they ended.
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<Vec<Op>>>);

impl History {
    pub fn push(&self, op: Op) {
        self.0.lock().expect("history").push(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.0.lock().expect("history").clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("history").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The accounts of a run: `t{seed}-{n}`; the first `hot` are hot.
pub fn account_names(plan: &Plan) -> Vec<String> {
    (0..plan.accounts)
        .map(|n| format!("t{}-{n}", plan.seed))
        .collect()
}

/// `"12.34"` → 1234 (two decimals, the deployment's USD).
pub fn minor(text: &str) -> Option<i64> {
    let (units, cents) = text.split_once('.').unwrap_or((text, "00"));
    let cents = format!("{cents:0<2}");
    if cents.len() != 2 {
        return None;
    }
    Some(units.parse::<i64>().ok()? * 100 + cents.parse::<i64>().ok()?)
}

fn decimal(minor: i64) -> String {
    format!("{}.{:02}", minor / 100, minor % 100)
}

/// What a client sends.
struct Request {
    kind: Kind,
    account: String,
    to: Option<String>,
    amount: Option<i64>,
    key: Option<String>,
    if_match: Option<u64>,
    min_revision: Option<u64>,
    /// A transfer with a reference.
    reference: bool,
}

impl Request {
    fn method_path_body(&self) -> (&'static str, String, Option<String>) {
        let a = &self.account;
        match self.kind {
            // Every account is opened with its holder's details (sealed; `forget` erases
            // them), named after it so the checker can look for them in the clear.
            Kind::Open => (
                "POST",
                "/accounts".into(),
                Some(format!(
                    r#"{{"id": "{a}", "holder": {{"name": "{}", "email": "{}"}}}}"#,
                    holder_name(a),
                    holder_email(a)
                )),
            ),
            Kind::Forget => ("POST", format!("/accounts/{a}/forget"), None),
            Kind::Deposit | Kind::Withdraw => (
                "POST",
                format!("/accounts/{a}/{}", self.kind.name()),
                Some(format!(
                    r#"{{"amount": "{}"}}"#,
                    decimal(self.amount.unwrap_or(1))
                )),
            ),
            Kind::Close => ("POST", format!("/accounts/{a}/close"), None),
            Kind::Transfer => (
                "POST",
                "/transfers".into(),
                Some(format!(
                    r#"{{"from": "{a}", "to": "{}", "amount": "{}", "reference": "{}"}}"#,
                    self.to.as_deref().unwrap_or_default(),
                    decimal(self.amount.unwrap_or(1)),
                    if self.reference {
                        reference(a)
                    } else {
                        String::new()
                    }
                )),
            ),
            Kind::Balance | Kind::Account => {
                let mut path = if self.kind == Kind::Balance {
                    format!("/accounts/{a}/balance")
                } else {
                    format!("/accounts/{a}")
                };
                if let Some(min) = self.min_revision {
                    path.push_str(&format!("?min_revision={min}"));
                }
                ("GET", path, None)
            }
        }
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(key) = &self.key {
            headers.push(("Idempotency-Key", key.clone()));
        }
        if let Some(rev) = self.if_match {
            headers.push(("If-Match", format!("\"{rev}\"")));
        }
        headers
    }
}

/// One client: its own seeded generator, its own view of what was acknowledged.
pub struct Client {
    pub id: usize,
    rng: fastrand::Rng,
    base: String,
    http: reqwest::Client,
    accounts: Vec<String>,
    hot: usize,
    /// Newest revision acknowledged to this client, per account.
    known: HashMap<String, u64>,
    /// Accounts this client knows to be forgotten: their transfers carry no reference
    /// (a forgotten holder writes no more free text).
    forgotten: std::collections::HashSet<String>,
    history: History,
    started: Instant,
    counter: u64,
}

impl Client {
    pub fn new(id: usize, plan: &Plan, base: String, history: History, started: Instant) -> Self {
        Self {
            id,
            rng: fastrand::Rng::with_seed(
                plan.seed.wrapping_mul(1_000_003).wrapping_add(id as u64),
            ),
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .pool_max_idle_per_host(2)
                .build()
                .expect("http client"),
            accounts: account_names(plan),
            hot: plan.hot.max(1),
            known: HashMap::new(),
            forgotten: Default::default(),
            history,
            started,
            counter: 0,
        }
    }

    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn pick(&mut self) -> Request {
        let account = if self.rng.u32(0..100) < 70 {
            self.accounts[self.rng.usize(0..self.hot)].clone()
        } else {
            self.accounts[self.rng.usize(0..self.accounts.len())].clone()
        };
        // An account this client has not seen yet is as likely opened as used.
        let unseen = !self.known.contains_key(&account);
        let roll = if unseen && self.rng.bool() {
            0
        } else {
            self.rng.u32(0..100)
        };
        let kind = match roll {
            0..=9 => Kind::Open,
            10..=44 => Kind::Deposit,
            45..=59 => Kind::Withdraw,
            60..=69 => Kind::Transfer,
            // Only cold accounts are closed, so the hot ones stay in play.
            70..=71 if !self.accounts[..self.hot].contains(&account) => Kind::Close,
            70..=89 => Kind::Balance,
            // Only cold accounts are forgotten, so the hot ones keep writing references.
            99 if !self.accounts[..self.hot].contains(&account) => Kind::Forget,
            _ => Kind::Account,
        };
        let to = (kind == Kind::Transfer).then(|| loop {
            let other = if self.rng.u32(0..100) < 70 {
                self.accounts[self.rng.usize(0..self.hot)].clone()
            } else {
                self.accounts[self.rng.usize(0..self.accounts.len())].clone()
            };
            if other != account || self.accounts.len() < 2 {
                break other;
            }
        });
        let amount = matches!(kind, Kind::Deposit | Kind::Withdraw | Kind::Transfer).then(|| {
            if kind != Kind::Deposit {
                self.rng.i64(1..=6_000)
            } else {
                self.rng.i64(1..=5_000)
            }
        });
        let known = self.known.get(&account).copied();
        let keyed = kind == Kind::Transfer || self.rng.u32(0..100) < 60;
        let key = (kind.is_command() && keyed).then(|| {
            self.counter += 1;
            format!("c{}-{}-{:x}", self.id, self.counter, self.rng.u64(..))
        });
        let if_match = (kind.is_account_command()
            && !matches!(kind, Kind::Open | Kind::Forget)
            && self.rng.u32(0..100) < 15)
            .then_some(known)
            .flatten();
        let min_revision = (!kind.is_command() && self.rng.bool())
            .then_some(known)
            .flatten();
        let reference = kind == Kind::Transfer && !self.forgotten.contains(&account);
        Request {
            kind,
            account,
            to,
            amount,
            key,
            if_match,
            min_revision,
            reference,
        }
    }

    /// Run until `deadline`. `hang_up_percent` of the commands are sent over a socket
    /// closed before the answer (and retried with the same key, if they had one).
    pub async fn run(mut self, deadline: Instant, hang_up_percent: u32) {
        while Instant::now() < deadline {
            let request = self.pick();
            let hang_up = request.kind.is_command() && self.rng.u32(0..100) < hang_up_percent;
            let op = if hang_up {
                self.hang_up(&request).await
            } else {
                self.send(&request, false).await
            };
            let mut unknown = op.outcome == Outcome::Info && request.key.is_some();
            self.history.push(op);
            // A client that timed out or hung up retries with the same key.
            let mut tries = 0;
            while unknown && tries < 4 && Instant::now() < deadline + Duration::from_secs(5) {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(self.rng.u64(20..300))).await;
                let retry = self.send(&request, true).await;
                unknown = retry.outcome == Outcome::Info;
                self.history.push(retry);
            }
            if !unknown {
                continue;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn op(&self, request: &Request, started_ms: u64) -> Op {
        Op {
            client: self.id,
            kind: request.kind,
            account: request.account.clone(),
            to: request.to.clone(),
            transfer: None,
            amount: request.amount,
            key: request.key.clone(),
            if_match: request.if_match,
            min_revision: request.min_revision,
            floor: self.known.get(&request.account).copied().unwrap_or(0),
            started_ms,
            ended_ms: started_ms,
            outcome: Outcome::Info,
            status: None,
            problem: None,
            retry_after: None,
            revision: None,
            balance: None,
            hung_up: false,
            retry: false,
            error: None,
        }
    }

    async fn send(&mut self, request: &Request, retry: bool) -> Op {
        let mut op = self.op(request, self.ms());
        op.retry = retry;
        let (method, path, body) = request.method_path_body();
        let url = format!("{}{path}", self.base);
        let mut builder = if method == "GET" {
            self.http.get(&url)
        } else {
            self.http.post(&url)
        };
        for (name, value) in request.headers() {
            builder = builder.header(name, value);
        }
        if let Some(body) = body {
            builder = builder
                .header("Content-Type", "application/json")
                .body(body);
        }
        match builder.send().await {
            Err(e) => {
                op.error = Some(e.to_string());
                // Nothing answered: the gateway may be down; do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(response) => {
                let status = response.status().as_u16();
                op.status = Some(status);
                op.retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body: Value = match response.bytes().await {
                    Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
                    Err(e) => {
                        op.error = Some(e.to_string());
                        Value::Null
                    }
                };
                op.problem = body["type"].as_str().map(str::to_owned);
                op.outcome = match status {
                    200..=299 => Outcome::Ok,
                    400..=499 => Outcome::Fail,
                    503 if op.problem.as_deref() != Some("/problems/outcome-unknown")
                        && op.error.is_none() =>
                    {
                        Outcome::Fail
                    }
                    _ => Outcome::Info,
                };
                let forgotten = (request.kind == Kind::Forget && status < 500)
                    || op.problem.as_deref() == Some("/problems/holder-forgotten");
                if forgotten {
                    self.forgotten.insert(request.account.clone());
                }
                if op.outcome == Outcome::Ok && request.kind == Kind::Transfer {
                    op.transfer = body["id"].as_str().map(str::to_owned);
                } else if op.outcome == Outcome::Ok {
                    op.revision = body["revision"].as_u64();
                    op.balance = body["balance"].as_str().and_then(minor);
                    if let Some(revision) = op.revision {
                        let known = self.known.entry(request.account.clone()).or_default();
                        *known = (*known).max(revision);
                    }
                }
            }
        }
        op.ended_ms = self.ms();
        op
    }

    /// Send `request` over a raw socket and close it 0–15 ms later, before the answer.
    async fn hang_up(&mut self, request: &Request) -> Op {
        let mut op = self.op(request, self.ms());
        op.hung_up = true;
        let (method, path, body) = request.method_path_body();
        let host = self.base.trim_start_matches("http://").to_owned();
        let body = body.unwrap_or_default();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (name, value) in request.headers() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        let wait = Duration::from_millis(self.rng.u64(0..15));
        match tokio::net::TcpStream::connect(&host).await {
            Ok(mut socket) => {
                if let Err(e) = socket.write_all(head.as_bytes()).await {
                    op.error = Some(e.to_string());
                }
                tokio::time::sleep(wait).await;
                drop(socket);
            }
            Err(e) => {
                op.error = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        op.ended_ms = self.ms();
        op
    }
}

/// The holder's name every opening of `account` gives (a marker no store may hold in
/// the clear).
pub fn holder_name(account: &str) -> String {
    format!("Holder {account}")
}

/// The holder's email every opening of `account` gives.
pub fn holder_email(account: &str) -> String {
    format!("{account}@torture-holder.example")
}

/// The reference of every transfer from `account` (free text: sealed like the details).
pub fn reference(account: &str) -> String {
    format!("torture-reference {account}")
}

/// What no stored object may contain: a part of every holder's email and reference.
pub const CLEAR_MARKERS: &[&str] = &["@torture-holder.example", "torture-reference "];
