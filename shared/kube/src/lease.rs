//! One leader among replicas through a `coordination.k8s.io/v1` Lease.
//!
//! The algorithm is client-go's `leaderelection`: read the Lease; if nobody holds it,
//! or its holder has not renewed it for a whole lease duration *as observed by this
//! process's own clock* (no cross-node clock comparison), write ourselves in as the
//! holder. Every write carries the `resourceVersion` that was read, so the API server
//! — not a lock in our process — decides between two candidates: exactly one write
//! succeeds, the other gets 409 Conflict and stays a follower. That is the same
//! optimistic concurrency as the event store's conditional writes.
//!
//! A leader renews every `retry_period`; if it cannot renew for `renew_deadline` it
//! steps down on its own, before any follower may take over (`lease_duration` >
//! `renew_deadline`), so two processes never both believe they lead.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Where the lease lives, who we are, and the timings (client-go's defaults).
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This process's identity in `holderIdentity` (the pod name).
    pub identity: String,
    /// How long followers wait after the last renewal they saw before taking over.
    pub lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often everyone tries to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// `TALLY_LEASE_NAME` turns election on; the namespace comes from `POD_NAMESPACE`
    /// (or the service account's), the identity from `POD_NAME` (or `HOSTNAME`).
    /// `None` when `TALLY_LEASE_NAME` is unset: the process always leads.
    pub fn from_env() -> Result<Option<Self>, crate::Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let Some(name) = var("TALLY_LEASE_NAME") else {
            return Ok(None);
        };
        let namespace = var("POD_NAMESPACE")
            .or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .ok()
            })
            .ok_or_else(|| crate::Error::Config("TALLY_LEASE_NAME needs POD_NAMESPACE".into()))?;
        let identity = var("POD_NAME")
            .or_else(|| var("HOSTNAME"))
            .ok_or_else(|| crate::Error::Config("TALLY_LEASE_NAME needs POD_NAME".into()))?;
        Ok(Some(Self::new(name, namespace.trim(), identity)))
    }

    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(
        name: impl Into<String>,
        namespace: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Takes part in the election for one lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last holder record seen, and when (by our clock) it last changed.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

impl Elector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// One round: acquire the lease if it is free or expired, renew it if it is ours.
    /// `Ok(true)`: we lead until at least the next round. `Ok(false)`: someone else does
    /// (or won the race for this round).
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, crate::Error> {
        let now = MicroTime(Timestamp::now());
        let me = self.settings.identity.clone();
        let duration =
            i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_status(&e, 409) => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        let changed = match &self.observed {
            Some((h, r, _)) => (h, r) != (&record.0, &record.1),
            None => true,
        };
        if changed {
            self.observed = Some((record.0, record.1, Instant::now()));
        }
        let observed_at = self
            .observed
            .as_ref()
            .map(|o| o.2)
            .unwrap_or_else(Instant::now);
        let ours = holder.as_deref() == Some(me.as_str());
        let held_by_other = holder.is_some() && !ours;
        // The holder's own duration counts, not ours: it promised to renew within it.
        let their_duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.settings.lease_duration);
        if held_by_other && observed_at.elapsed() < their_duration {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(me);
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now);
        // `replace` sends the resourceVersion we read: a concurrent writer makes it 409.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Give the lease up (on shutdown) so a follower takes over at its next round
    /// instead of after a whole lease duration. Only clears it if it is still ours.
    pub async fn release(&mut self) -> Result<(), crate::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Run the election in the background. The returned [`Leadership`] says, at any
    /// moment, whether this process leads; [`Leadership::release`] stops taking part
    /// and gives the lease up.
    pub fn spawn(mut self) -> Leadership {
        let (leading_tx, leading) = watch::channel(false);
        let (stop_tx, mut stop) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut last_renewal: Option<Instant> = None;
            loop {
                let was_leading = *leading_tx.borrow();
                let leads = match self.try_acquire_or_renew().await {
                    Ok(true) => {
                        last_renewal = Some(Instant::now());
                        true
                    }
                    Ok(false) => false,
                    Err(e) => {
                        // An API error is not a lost election: keep leading while within
                        // the renew deadline, as client-go does.
                        tracing::warn!(lease = %self.settings.name, error = %e, "lease round failed");
                        was_leading
                            && last_renewal
                                .is_some_and(|t| t.elapsed() < self.settings.renew_deadline)
                    }
                };
                if leads != was_leading {
                    tracing::info!(
                        lease = %self.settings.name,
                        identity = %self.settings.identity,
                        leading = leads,
                        "{}",
                        if leads { "became the leader" } else { "no longer the leader" }
                    );
                    leading_tx.send_replace(leads);
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.retry_period) => {}
                    _ = &mut stop => break,
                }
            }
            leading_tx.send_replace(false);
            if let Err(e) = self.release().await {
                tracing::warn!(lease = %self.settings.name, error = %e, "could not release the lease");
            }
        });
        Leadership {
            leading,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }
}

/// Whether this process currently leads; see [`Elector::spawn`].
pub struct Leadership {
    leading: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Leadership {
    /// A receiver that follows the leadership (`true` while leading).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Whether this process leads right now.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Stop taking part and give the lease up if it is ours.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == code)
}
