//! Configuration from the environment (`TALLY_*`).

use serde::Deserialize;
use std::path::PathBuf;
use tally_domain::{AmountPolicy, Currency};
use tally_runtime::BoxError;

/// Settings read from the environment. A backend is real when its variable is set
/// (`TALLY_S3_BUCKET`, `TALLY_KAFKA_BROKERS`, `TALLY_DATABASE_URL`, `TALLY_REDIS_URL`)
/// and embedded otherwise.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default = "default_max_amount")]
    pub max_amount: String,

    /// The event store: `directory` (the default), `s3` (the default when
    /// `TALLY_S3_BUCKET` is set) or `postgres` (in `TALLY_EVENT_STORE_URL`, else in
    /// `TALLY_DATABASE_URL`).
    pub store: Option<String>,
    /// The PostgreSQL event store's database (defaults to `TALLY_DATABASE_URL`).
    pub event_store_url: Option<String>,

    pub s3_bucket: Option<String>,
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_prefix: String,
    /// Falls back to `AWS_ACCESS_KEY_ID`.
    pub s3_access_key_id: Option<String>,
    /// Falls back to `AWS_SECRET_ACCESS_KEY`.
    pub s3_secret_access_key: Option<String>,

    pub kafka_brokers: Option<String>,
    #[serde(default = "default_topic")]
    pub kafka_topic: String,
    #[serde(default = "default_group")]
    pub kafka_group: String,
    /// How long the broker may hold a consumer's fetch (ms; librdkafka's
    /// `fetch.wait.max.ms`). See [`tally_kafka::KafkaConfig::fetch_wait`].
    #[serde(default = "default_kafka_fetch_wait_ms")]
    pub kafka_fetch_wait_ms: u64,
    /// The transfer saga's consumer group.
    #[serde(default = "default_saga_group")]
    pub saga_group: String,
    /// A transfer pending this long since its last step is driven on by the sweep
    /// (seconds).
    #[serde(default = "default_transfer_deadline")]
    pub transfer_deadline_seconds: u64,

    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    #[serde(default = "default_redis_prefix")]
    pub redis_prefix: String,

    /// Keep a snapshot every this many revisions of a stream (0: never).
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,

    /// Deliberate faults, comma-separated (tests only; `tally_app::faults`), e.g.
    /// `crash-after-append`: abort right after a successful append.
    pub fault_injection: Option<String>,
    /// Catch every stream up from the store when a projector starts (default: with the
    /// in-memory read model or the in-process stream, where nothing else would).
    pub catch_up_on_start: Option<bool>,
    /// A projector following a broker also catches every stream up from the store this
    /// often (seconds; 0: never): whatever the stream lost or a stalled consumer missed
    /// reaches the read model within this long.
    #[serde(default = "default_catch_up_every")]
    pub catch_up_every: u64,
    /// A projector on a store with segments (S3) copies a stream into them once it has
    /// been this long without a new commit (seconds), or at once past 64 new revisions
    /// (see `tally_app::compaction`).
    #[serde(default = "default_compaction_quiet_seconds")]
    pub compaction_quiet_seconds: u64,
    /// On S3 with a broker, that projector also writes packs of every account's history
    /// for rebuilds once the topic has been still a little longer than that, and at
    /// least this often while it keeps moving (seconds; see `tally_app::packing`); 0:
    /// no packs, a rebuild reads every stream.
    #[serde(default = "default_pack_at_most_seconds")]
    pub pack_at_most_seconds: u64,
    /// On S3, each outbox object is a lease open this long (seconds): a command on a
    /// stream the process recorded an entry for within it writes no outbox object of
    /// its own. A crashed process's last commits reach the stream through the relay
    /// this long plus 15 s after (see `tally_s3`'s `outbox` module). 0: no leases (an
    /// outbox object per group of concurrent commands, read by a relay after 2 s).
    #[serde(default = "default_outbox_lease_seconds")]
    pub outbox_lease_seconds: u64,
    /// Gateway proxy mode: `function=http://host:port,...` (see `make stack`).
    pub upstreams: Option<String>,

    /// Bearer tokens: the issuer (`iss`) whose tokens every route requires. Unset:
    /// authentication is off (every request may do anything; `make dev`).
    pub auth_issuer: Option<String>,
    /// The audience (`aud`) tokens must name.
    #[serde(default = "default_auth_audience")]
    pub auth_audience: String,
    /// The discovery document, if not at `{issuer}/.well-known/openid-configuration`.
    pub auth_discovery_url: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (seconds).
    #[serde(default = "default_auth_leeway_seconds")]
    pub auth_leeway_seconds: u64,
    /// The subject that owns the accounts opened before owners were recorded.
    pub auth_legacy_owner: Option<String>,
    /// How many verified tokens each process remembers (0: none; every request checks
    /// its token's signature).
    #[serde(default = "default_auth_verified_tokens")]
    pub auth_verified_tokens: usize,

    /// The key (base64, at least 32 bytes) every message on the commit topic is signed
    /// with and checked against (`tally_kafka::mac`). Unset: the topic is trusted.
    pub stream_key: Option<String>,

    /// The master key (base64, 32 bytes) that wraps the holders' data keys
    /// (`tally_vault`). Unset: with the directory store, one is made and kept in
    /// `TALLY_DATA_DIR/master.key` (development); elsewhere holder details are refused.
    pub master_key: Option<String>,
}

fn default_auth_audience() -> String {
    "tally".into()
}
fn default_auth_leeway_seconds() -> u64 {
    30
}
fn default_auth_verified_tokens() -> usize {
    tally_auth::DEFAULT_VERIFIED_TOKENS
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./.data")
}
fn default_currency() -> String {
    "USD".into()
}
fn default_max_amount() -> String {
    "1000000.00".into()
}
fn default_snapshot_every() -> u64 {
    100
}
fn default_catch_up_every() -> u64 {
    30
}
fn default_compaction_quiet_seconds() -> u64 {
    tally_app::compaction::QUIET.as_secs()
}
fn default_pack_at_most_seconds() -> u64 {
    tally_app::packing::AT_MOST.as_secs()
}
fn default_outbox_lease_seconds() -> u64 {
    5
}
fn default_topic() -> String {
    "tally.commits".into()
}
fn default_kafka_fetch_wait_ms() -> u64 {
    tally_kafka::DEFAULT_FETCH_WAIT.as_millis() as u64
}
fn default_group() -> String {
    "tally-projector".into()
}
fn default_saga_group() -> String {
    "tally-transfer-saga".into()
}
fn default_transfer_deadline() -> u64 {
    10
}
fn default_redis_prefix() -> String {
    "tally:".into()
}

impl Config {
    /// Whether a PostgreSQL event store lives in the read model's database (no
    /// `TALLY_EVENT_STORE_URL`, or the same URL as `TALLY_DATABASE_URL`): then one pool
    /// and one migration serve both.
    pub fn event_store_shares_database(&self) -> bool {
        self.database_url.is_some()
            && (self.event_store_url.is_none() || self.event_store_url == self.database_url)
    }

    /// Read `TALLY_*` variables.
    pub fn from_env() -> Result<Self, BoxError> {
        envy::prefixed("TALLY_")
            .from_env::<Config>()
            .map_err(|e| format!("configuration: {e}").into())
    }

    /// Defaults everywhere: embedded backends with their data in `data_dir`.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let mut config: Config =
            envy::from_iter(std::iter::empty::<(String, String)>()).expect("defaults");
        config.data_dir = data_dir.into();
        config
    }

    /// The amount policy: currency and maximum.
    pub fn policy(&self) -> Result<AmountPolicy, BoxError> {
        let currency =
            Currency::parse(&self.currency).map_err(|e| format!("TALLY_CURRENCY: {e}"))?;
        let max = AmountPolicy::new(currency, i64::MAX)
            .parse(&self.max_amount)
            .map_err(|e| format!("TALLY_MAX_AMOUNT={:?}: {e}", self.max_amount))?;
        Ok(AmountPolicy::new(currency, max.minor()))
    }

    /// How requests are authenticated: bearer tokens of `TALLY_AUTH_ISSUER`, or off.
    pub fn auth(&self) -> Result<tally_api::Auth, BoxError> {
        let Some(issuer) = self.auth_issuer.as_deref().filter(|i| !i.is_empty()) else {
            return Ok(tally_api::Auth::Off);
        };
        let mut config = tally_auth::AuthConfig::new(issuer, &self.auth_audience);
        config.discovery_url = self.auth_discovery_url.clone();
        config.leeway = std::time::Duration::from_secs(self.auth_leeway_seconds);
        config.verified_tokens = self.auth_verified_tokens;
        let legacy_owner = self
            .auth_legacy_owner
            .as_deref()
            .map(tally_domain::Owner::parse)
            .transpose()
            .map_err(|e| format!("TALLY_AUTH_LEGACY_OWNER: {e}"))?;
        Ok(tally_api::Auth::On {
            verifier: std::sync::Arc::new(tally_auth::Verifier::new(config)),
            legacy_owner,
        })
    }

    /// The vault for holders' personal data, over `keys`: the master key from
    /// `TALLY_MASTER_KEY`, or — where `development_key` (the directory store) — a
    /// development one kept in the data directory; `None` otherwise.
    pub fn vault(
        &self,
        keys: std::sync::Arc<dyn tally_es::KeyStore>,
        development_key: bool,
    ) -> Result<Option<tally_vault::Vault>, BoxError> {
        let text = match self.master_key.as_deref().filter(|k| !k.is_empty()) {
            Some(text) => text.to_owned(),
            None if development_key => {
                let path = self.data_dir.join("master.key");
                match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        std::fs::create_dir_all(&self.data_dir)?;
                        let text = tally_vault::MasterKey::generate();
                        write_private(&path, &text)?;
                        tracing::warn!(path = %path.display(),
                            "a development master key was made for holders' data: set TALLY_MASTER_KEY (a Secret) in production");
                        text
                    }
                    Err(e) => return Err(format!("{}: {e}", path.display()).into()),
                }
            }
            None => return Ok(None),
        };
        let master = tally_vault::MasterKey::parse(&text)?;
        Ok(Some(tally_vault::Vault::new(
            keys,
            std::sync::Arc::new(master),
        )))
    }

    /// The stream key, if one is configured.
    pub fn stream_key(&self) -> Result<Option<tally_kafka::StreamKey>, BoxError> {
        Ok(self
            .stream_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .map(tally_kafka::StreamKey::parse)
            .transpose()?)
    }

    /// `TALLY_KAFKA_FETCH_WAIT_MS` as a duration ([`tally_kafka::fetch_wait_of_ms`]).
    pub fn kafka_fetch_wait(&self) -> Result<std::time::Duration, BoxError> {
        Ok(tally_kafka::fetch_wait_of_ms(self.kafka_fetch_wait_ms)?)
    }

    /// The S3 settings, if the S3 store is configured.
    pub fn s3(&self) -> Result<Option<tally_s3::S3Config>, BoxError> {
        let Some(bucket) = &self.s3_bucket else {
            return Ok(None);
        };
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Ok(Some(tally_s3::S3Config {
            endpoint: self.s3_endpoint.clone(),
            bucket: bucket.clone(),
            prefix: self.s3_prefix.clone(),
            region: env("AWS_REGION").unwrap_or_else(|| "us-east-1".into()),
            access_key_id: self
                .s3_access_key_id
                .clone()
                .or_else(|| env("AWS_ACCESS_KEY_ID"))
                .ok_or("S3 store: set AWS_ACCESS_KEY_ID (or TALLY_S3_ACCESS_KEY_ID)")?,
            secret_access_key: self
                .s3_secret_access_key
                .clone()
                .or_else(|| env("AWS_SECRET_ACCESS_KEY"))
                .ok_or("S3 store: set AWS_SECRET_ACCESS_KEY (or TALLY_S3_SECRET_ACCESS_KEY)")?,
            session_token: env("AWS_SESSION_TOKEN"),
        }))
    }
}

/// Write `text` to a new file only its owner may read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, envy::Error> {
        envy::prefixed("TALLY_").from_iter(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn the_fetch_wait_defaults_to_the_kafka_crates_and_takes_milliseconds() {
        let default = config(&[]).unwrap();
        assert_eq!(
            default.kafka_fetch_wait().unwrap(),
            tally_kafka::DEFAULT_FETCH_WAIT
        );
        let set = config(&[("TALLY_KAFKA_FETCH_WAIT_MS", "7")]).unwrap();
        assert_eq!(
            set.kafka_fetch_wait().unwrap(),
            std::time::Duration::from_millis(7)
        );
    }

    #[test]
    fn a_fetch_wait_outside_librdkafkas_range_is_refused_with_its_name() {
        for bad in ["0", "300001"] {
            let e = config(&[("TALLY_KAFKA_FETCH_WAIT_MS", bad)])
                .unwrap()
                .kafka_fetch_wait()
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("TALLY_KAFKA_FETCH_WAIT_MS") && e.contains(bad),
                "{e}"
            );
        }
        let e = config(&[("TALLY_KAFKA_FETCH_WAIT_MS", "soon")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("KAFKA_FETCH_WAIT_MS") && e.contains("soon"),
            "{e}"
        );
    }
}
