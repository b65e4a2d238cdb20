//! The real services the tests run against, provisioned by `make test`
//! (`scripts/services.sh`). A test that needs one fails loudly when it is missing.

use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// A variable `make test` sets; panics with what to do when it is missing.
pub fn required_env(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
            "{name} is not set: this test needs a real service. Run the tests with `make test`, \
             which provisions PostgreSQL, Redis, an S3 server and a Kafka broker on 127.0.0.1 \
             (or `eval \"$(scripts/services.sh env)\"` after `scripts/services.sh up`)."
        )
        })
}

/// A name no other test uses (letters, digits and `-`, starting with a letter).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A fresh PostgreSQL database with the migrations applied; returns its URL.
pub async fn fresh_database() -> String {
    let admin_url = required_env("TALLY_TEST_DATABASE_URL");
    let name = unique("tally_t").replace('-', "_");
    let admin = tally_postgres::connect(&admin_url, 1)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} is unreachable: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create a test database");
    admin.close().await;
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url.as_str(), |(b, _)| b);
    let url = format!("{base}/{name}");
    let pool = tally_postgres::connect(&url, 1).await.unwrap();
    tally_postgres::migrate(&pool).await.expect("migrations");
    pool.close().await;
    url
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for_port(port: u16, what: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not open port {port}");
}

/// A service process of this test alone, which the test can stop and start again on
/// the same port (to play an outage).
pub struct PrivateService {
    what: &'static str,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Where it runs (tansu puts its SQLite file in its working directory).
    dir: Option<std::path::PathBuf>,
    pub port: u16,
    child: Option<Child>,
}

impl PrivateService {
    async fn start_new(
        what: &'static str,
        program: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        dir: Option<std::path::PathBuf>,
        port: u16,
    ) -> Self {
        let mut service = Self {
            what,
            program,
            args,
            env,
            dir,
            port,
            child: None,
        };
        service.start().await;
        service
    }

    /// A Kafka-protocol broker (tansu) on a free port that keeps its topics, logs and
    /// offsets in a fresh bucket of the test S3 server, so they survive a restart like a
    /// real broker's.
    pub async fn persistent_broker() -> Self {
        let endpoint = required_env("TALLY_TEST_S3_ENDPOINT");
        let bucket = unique("broker");
        let store = s3_store(&endpoint, &bucket);
        store
            .ensure_bucket()
            .await
            .expect("a bucket for the broker");
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        Self::start_new(
            "broker",
            required_env("TALLY_TANSU_BIN"),
            vec![
                "broker".into(),
                "--listener-url".into(),
                url.clone(),
                "--advertised-listener-url".into(),
                url,
                "--storage-engine".into(),
                format!("s3://{bucket}/"),
            ],
            [
                ("AWS_ENDPOINT", endpoint.as_str()),
                ("AWS_ALLOW_HTTP", "true"),
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
                ("AWS_DEFAULT_REGION", "us-east-1"),
                ("AWS_REGION", "us-east-1"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            None,
            port,
        )
        .await
    }

    /// A Kafka-protocol broker (tansu) on a free port that keeps its log in a SQLite file
    /// in `dir`: killed (SIGKILL) and started again, it still has every message it
    /// acknowledged — like a real broker, unlike tansu on S3 storage (see
    /// [`PrivateService::persistent_broker`]).
    pub async fn durable_broker(dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).expect("a directory for the broker");
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let broker = Self::start_new(
            "broker",
            required_env("TALLY_TANSU_BIN"),
            vec![
                "broker".into(),
                "--listener-url".into(),
                url.clone(),
                "--advertised-listener-url".into(),
                url,
                // tansu puts the file in its working directory.
                "--storage-engine".into(),
                "sqlite://tansu.db".into(),
            ],
            Vec::new(),
            Some(dir.to_owned()),
            port,
        )
        .await;
        index_tansu_headers(&dir.join("tansu.db"));
        broker
    }

    /// An S3 server of its own (moto, `TALLY_MOTO_BIN`) on a free port that keeps its
    /// buckets and objects in `dir` (see scripts/moto_server.py): one a test may pause,
    /// and kill and start again — it has every object it acknowledged.
    pub async fn durable_s3(dir: &std::path::Path) -> Self {
        let port = free_port();
        Self::start_new(
            "s3",
            required_env("TALLY_MOTO_BIN"),
            vec![
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "--data-dir".into(),
                dir.to_string_lossy().into_owned(),
            ],
            Vec::new(),
            None,
            port,
        )
        .await
    }

    /// A Redis server on a free port, keeping nothing on disk.
    pub async fn redis() -> Self {
        let port = free_port();
        Self::start_new(
            "redis",
            required_env("TALLY_REDIS_SERVER_BIN"),
            vec![
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
            ],
            Vec::new(),
            None,
            port,
        )
        .await
    }

    /// Start (again) on the same port.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.what);
        // Its output goes to a file in the temp directory, for post-mortems.
        let log = std::env::temp_dir().join(format!("tally-{}-{}.log", self.what, self.port));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("a log file for the service");
        let mut command = Command::new(&self.program);
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        let child = command
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({}): {e}", self.what, self.program));
        self.child = Some(child);
        wait_for_port(self.port, self.what).await;
    }

    /// Kill it (SIGKILL) and wait until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stop it the way an orchestrator does (SIGTERM), and wait until it is gone.
    pub async fn terminate(&mut self) {
        self.signal("-TERM");
        if let Some(mut child) = self.child.take() {
            match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill().await;
                }
            }
        }
    }

    /// Freeze it (SIGSTOP): it holds its connections and answers nothing until
    /// [`PrivateService::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused service go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    /// `127.0.0.1:port`
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Bucket `bucket` of the test S3 server at `endpoint` (no key prefix, the test
/// server's credentials).
pub fn s3_config(endpoint: &str, bucket: &str) -> tally_s3::S3Config {
    tally_s3::S3Config {
        endpoint: Some(endpoint.to_owned()),
        bucket: bucket.to_owned(),
        prefix: String::new(),
        region: "us-east-1".into(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        session_token: None,
    }
}

/// The event store in bucket `bucket` of the test S3 server at `endpoint`.
pub fn s3_store(endpoint: &str, bucket: &str) -> tally_s3::S3EventStore {
    tally_s3::S3EventStore::new(&s3_config(endpoint, bucket)).expect("an S3 endpoint URL")
}

/// An access token from the identity provider of `scripts/idp.sh` (its issuer in
/// `TALLY_TEST_OIDC_ISSUER`): the client-credentials grant for `client` (whose secret
/// is `{client}-secret` there) with `scope`. The end-to-end tests take their tokens
/// from it, never minting their own.
pub async fn oidc_token(client: &str, scope: &str) -> String {
    let issuer = required_env("TALLY_TEST_OIDC_ISSUER");
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{issuer}/token"))
        .basic_auth(client, Some(format!("{client}-secret")))
        .form(&[("grant_type", "client_credentials"), ("scope", scope)])
        .send()
        .await
        .unwrap_or_else(|e| panic!("the identity provider at {issuer} is unreachable: {e}"))
        .json()
        .await
        .expect("a JSON answer");
    answer["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token for {client} with {scope:?}: {answer}"))
        .to_owned()
}

/// tansu 0.6's SQLite schema has no index on its `header` table, which it reads once per
/// record fetched, joined on `(topition, offset_id)`: every fetch scans every header of
/// the log. Tally's messages each carry one (their MAC), so a consumer's fetches grow
/// with the log — at the stack-pg torture's rate, tens of thousands of commits, the
/// broker spent its CPU scanning and timed out produce requests for minutes
/// (measured: 30,000 records consumed in 37.6 s without the index, 2.0 s with it). The
/// index is added beside tansu's tables once it has made them (with Python's `sqlite3`,
/// which the S3 server's Python already needs), and stays in the file across restarts.
fn index_tansu_headers(db: &std::path::Path) {
    let made = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            // Retried while tansu is still making its tables.
            "import sqlite3, sys, time\n\
             for attempt in range(100):\n\
             \x20   try:\n\
             \x20       c = sqlite3.connect(sys.argv[1], timeout=30)\n\
             \x20       c.execute('create index if not exists header_record on header (topition, offset_id)')\n\
             \x20       c.commit()\n\
             \x20       break\n\
             \x20   except sqlite3.OperationalError:\n\
             \x20       if attempt == 99: raise\n\
             \x20       time.sleep(0.1)",
        )
        .arg(db)
        .status()
        .expect("python3 (for the broker's SQLite index)");
    assert!(made.success(), "could not index {}: {made}", db.display());
}
