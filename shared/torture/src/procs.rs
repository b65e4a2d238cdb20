//! The processes under test: a function binary on a fixed port, which the nemesis may
//! SIGKILL and start again on the same port.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// One function process.
pub struct Proc {
    pub name: String,
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Proc {
    pub fn new(
        name: &str,
        binary: PathBuf,
        env: Vec<(String, String)>,
        log: PathBuf,
        port: u16,
    ) -> Self {
        Self {
            name: name.to_owned(),
            binary,
            env,
            log,
            port,
            child: None,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start it and wait until `/readyz` answers (or, for a process whose readiness
    /// depends on a backend the nemesis may have down, until it listens).
    pub async fn start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let child = Command::new(&self.binary)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", self.port.to_string())
            // Warnings, and what the relay does (each commit it publishes, each lease it
            // takes over): what a failed drain is read from.
            .env(
                "RUST_LOG",
                "warn,tally_app::relay=info,tally_s3::outbox=info,tally_host=info",
            )
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.binary.display()))?;
        self.child = Some(child);
        wait_listening(self.port, Duration::from_secs(30))
            .await
            .map_err(|e| format!("{}: {e} (log: {})", self.name, self.log.display()))
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Whether it exited on its own (a crash), with its status.
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }
}

/// Wait until something accepts connections on `port`.
pub async fn wait_listening(port: u16, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("nothing listens on port {port} after {within:?}"))
}

/// Wait until `base/readyz` answers 200.
pub async fn wait_ready(base: &str, within: Duration) -> Result<(), String> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("{base} did not become ready within {within:?}"))
}
