//! `tally-testkit`: run a real function binary through both of its doors.
//!
//! * [`FakeLambdaRuntime`] — a Lambda Runtime API on 127.0.0.1 that hands the binary
//!   API Gateway v2 (HTTP API / function URL) events and collects its responses, so the
//!   binary runs its real Lambda path (`lambda_http`), exactly as under `cargo lambda`.
//! * [`Function`] — a spawned binary, in server mode ([`Function::server`]) or Lambda mode
//!   ([`Function::lambda`]), killed on drop.
//! * [`seed`] — write commits into a data directory through the real command handler.
//! * [`both_doors`] — the same request against the same seed through each door.
//! * [`services`] — the real services (PostgreSQL, Redis, S3, Kafka) provisioned by
//!   `make test`, fresh databases, and private servers a test can stop and start.

pub mod cases;
mod lambda;
pub mod read_model;
pub mod services;

pub use lambda::{apigw_v2_event, FakeLambdaRuntime};

use serde_json::Value;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tally_app::CommandContext;
use tally_domain::{AccountCommand, AccountId};
use tally_host::{Config, Host};
use tokio::process::{Child, Command};

/// A test request.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: &'static str,
    /// Path and query, e.g. `/accounts/a/transactions?limit=2`.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
}

impl Req {
    pub fn get(uri: impl Into<String>) -> Self {
        Self {
            method: "GET",
            uri: uri.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn post(uri: impl Into<String>) -> Self {
        Self {
            method: "POST",
            ..Self::get(uri)
        }
    }

    /// A JSON body (with `Content-Type: application/json`).
    pub fn json(mut self, body: &str) -> Self {
        self.headers
            .push(("content-type".into(), "application/json".into()));
        self.body = Some(body.to_owned());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What came back.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
}

impl Answer {
    /// The body without fields that legitimately differ between two runs.
    pub fn normalized(&self) -> Value {
        let mut body = self.body.clone();
        strip(&mut body);
        body
    }
}

fn strip(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for key in ["recorded_at", "opened_at", "updated_at"] {
                map.remove(key);
            }
            map.values_mut().for_each(strip);
        }
        Value::Array(items) => items.iter_mut().for_each(strip),
        _ => {}
    }
}

/// A seeding step.
pub enum Step<'a> {
    Open(&'a str),
    Deposit(&'a str, &'a str),
    Withdraw(&'a str, &'a str),
    Close(&'a str),
}

/// Write `steps` into the event store under `dir` through the real command handler.
pub async fn seed(dir: &Path, steps: &[Step<'_>]) {
    let config = Config::with_data_dir(dir);
    let embedded = Host::embedded(dir).await.expect("open the store");
    let policy = config.policy().unwrap();
    for step in steps {
        let (id, command) = match step {
            Step::Open(id) => {
                let id = AccountId::parse(id).unwrap();
                (
                    id.clone(),
                    AccountCommand::Open {
                        id,
                        currency: policy.currency,
                        owner: None,
                        holder: None,
                    },
                )
            }
            Step::Deposit(id, a) => (
                AccountId::parse(id).unwrap(),
                AccountCommand::Deposit {
                    amount: policy.parse(a).unwrap(),
                },
            ),
            Step::Withdraw(id, a) => (
                AccountId::parse(id).unwrap(),
                AccountCommand::Withdraw {
                    amount: policy.parse(a).unwrap(),
                },
            ),
            Step::Close(id) => (AccountId::parse(id).unwrap(), AccountCommand::Close),
        };
        embedded
            .state
            .commands
            .execute(id.stream_id(), command, &CommandContext::default())
            .await
            .expect("seed command");
    }
}

/// A running function binary.
pub struct Function {
    child: Child,
    door: Door,
}

enum Door {
    Server {
        base: String,
        client: reqwest::Client,
    },
    Lambda {
        runtime: FakeLambdaRuntime,
    },
}

impl Function {
    /// Start `binary` as an HTTP server on a free loopback port, with its data in `dir`.
    pub async fn server(binary: &str, dir: &Path) -> Self {
        Self::server_with(binary, dir, &[]).await
    }

    /// [`Function::server`] with extra environment variables.
    pub async fn server_with(binary: &str, dir: &Path, env: &[(String, String)]) -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = base_command(binary, dir)
            .envs(env.iter().cloned())
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .spawn()
            .expect("spawn the function");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
                if r.status().is_success() {
                    return Self {
                        child,
                        door: Door::Server { base, client },
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{binary} did not become ready on {base}");
    }

    /// Start `binary` under a fake Lambda Runtime API, with its data in `dir`.
    pub async fn lambda(binary: &str, dir: &Path) -> Self {
        Self::lambda_with(binary, dir, &[]).await
    }

    /// [`Function::lambda`] with extra environment variables.
    pub async fn lambda_with(binary: &str, dir: &Path, env: &[(String, String)]) -> Self {
        let runtime = FakeLambdaRuntime::start().await;
        let name = Path::new(binary)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let child = base_command(binary, dir)
            .envs(env.iter().cloned())
            .env("AWS_LAMBDA_RUNTIME_API", runtime.address())
            .env("AWS_LAMBDA_FUNCTION_NAME", &name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/test")
            .env("AWS_REGION", "us-east-1")
            .spawn()
            .expect("spawn the function");
        Self {
            child,
            door: Door::Lambda { runtime },
        }
    }

    /// Under the Lambda door: hand the function a raw event (e.g. a Kafka batch).
    pub async fn invoke_raw(&self, event: Value) -> Result<Value, Value> {
        match &self.door {
            Door::Lambda { runtime } => runtime.invoke_raw(event).await,
            Door::Server { .. } => panic!("invoke_raw needs the Lambda door"),
        }
    }

    /// The base URL in server mode (`http://127.0.0.1:port`).
    pub fn base_url(&self) -> Option<&str> {
        match &self.door {
            Door::Server { base, .. } => Some(base),
            Door::Lambda { .. } => None,
        }
    }

    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the function is running")
    }

    /// Send `req` through this function's door.
    pub async fn call(&self, req: &Req) -> Answer {
        self.try_call(req).await.expect("the request got an answer")
    }

    /// [`Function::call`], with a transport failure as an error (a process that died).
    pub async fn try_call(&self, req: &Req) -> Result<Answer, String> {
        match &self.door {
            Door::Server { base, client } => {
                let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap();
                let mut r = client.request(method, format!("{base}{}", req.uri));
                for (k, v) in &req.headers {
                    r = r.header(k, v);
                }
                if let Some(body) = &req.body {
                    r = r.body(body.clone());
                }
                let response = r.send().await.map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let content_type = response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let text = response.text().await.map_err(|e| e.to_string())?;
                Ok(Answer {
                    status,
                    content_type,
                    body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
                })
            }
            Door::Lambda { runtime } => {
                let event = apigw_v2_event(req);
                Ok(runtime.invoke(event).await)
            }
        }
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn base_command(binary: &str, dir: &Path) -> Command {
    let mut c = Command::new(binary);
    c.env_clear()
        .env("TALLY_DATA_DIR", dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    c
}

/// Seed two fresh stores identically, send `req` to `binary` through each door, and
/// return `(server answer, lambda answer)`.
pub async fn both_doors(binary: &str, steps: &[Step<'_>], req: &Req) -> (Answer, Answer) {
    let server_dir = tempfile::tempdir().unwrap();
    let lambda_dir = tempfile::tempdir().unwrap();
    seed(server_dir.path(), steps).await;
    seed(lambda_dir.path(), steps).await;
    let server = Function::server(binary, server_dir.path()).await;
    let via_server = server.call(req).await;
    drop(server);
    let lambda = Function::lambda(binary, lambda_dir.path()).await;
    let via_lambda = lambda.call(req).await;
    (via_server, via_lambda)
}

/// Assert both doors gave the same status, content type and body (timestamps aside),
/// and return the answer.
#[track_caller]
pub fn assert_same(answers: (Answer, Answer)) -> Answer {
    let (server, lambda) = answers;
    assert_eq!(
        server.status, lambda.status,
        "status differs: server {server:?} / lambda {lambda:?}"
    );
    assert_eq!(
        server.content_type, lambda.content_type,
        "content type differs"
    );
    assert_eq!(server.normalized(), lambda.normalized(), "body differs");
    server
}
