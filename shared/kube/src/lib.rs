//! Kubernetes for Tally, through `kube`.
//!
//! * [`lease`] — one leader among a singleton's replicas (the relay) through a
//!   `coordination.k8s.io/v1` Lease, with client-go's algorithm.
//! * [`scale`] — scale the projector to zero and back around a rebuild (the `admin`
//!   binary), remembering the replica count on the Deployment so an interrupted rebuild
//!   is resumed by running it again.
//!
//! Only the relay and `admin` link this crate; the other functions never talk to the
//! API server. Tests run both against an in-memory API server (`tower-test`).

pub mod lease;
pub mod scale;
#[cfg(feature = "testing")]
pub mod testing;

pub use kube;

pub use lease::{Elector, Leadership, LeaseSettings};
pub use scale::{with_projector_stopped, ProjectorScale};

/// What can go wrong talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request (the message says which).
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// A setting is missing or wrong (fix the environment).
    #[error("configuration: {0}")]
    Config(String),
    /// Pods did not reach the expected state in time (look at the Deployment).
    #[error("timed out waiting until {0}")]
    Timeout(String),
    /// The work done while the projector was stopped failed; it was scaled back.
    #[error("rebuild failed (the projector was scaled back): {0}")]
    Replay(String),
}

/// A client from the in-cluster service account, or `~/.kube/config` outside a cluster.
pub async fn client() -> Result<kube::Client, Error> {
    Ok(kube::Client::try_default().await?)
}

/// A client from the pod's service account only (`KUBERNETES_SERVICE_HOST`/`_PORT`, the
/// mounted token and CA): for the relay, whose election runs only inside a cluster. It
/// links none of the kubeconfig code (YAML, exec and OIDC credentials) that [`client`]
/// carries: 16.3 → 15.9 MB for the relay's binary.
pub fn in_cluster_client() -> Result<kube::Client, Error> {
    let config = kube::Config::incluster().map_err(|e| {
        Error::Config(format!(
            "the leader election (TALLY_LEASE_NAME) runs inside a Kubernetes pod: {e}"
        ))
    })?;
    Ok(kube::Client::try_from(config)?)
}

/// The election the environment asks for (`TALLY_LEASE_NAME`), already running; `None`
/// when it asks for none. Inside a cluster only (see [`in_cluster_client`]).
pub async fn leadership_from_env() -> Result<Option<Leadership>, Error> {
    let Some(settings) = LeaseSettings::from_env()? else {
        return Ok(None);
    };
    tracing::info!(lease = %settings.name, identity = %settings.identity, "taking part in the leader election");
    Ok(Some(Elector::new(in_cluster_client()?, settings).spawn()))
}
