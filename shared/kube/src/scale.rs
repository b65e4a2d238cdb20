//! Scaling the projector to zero and back around a rebuild.
//!
//! While a rebuild replays the store into an emptied read model, no projector may
//! write to it. The replica count it had is written into an annotation on the
//! Deployment before it is scaled to zero, so a rebuild that dies half-way is resumed
//! (and the projector restored to its real size) by simply running it again. When KEDA
//! autoscales the projector, its ScaledObject is paused at zero for the duration
//! (`autoscaling.keda.sh/paused-replicas`), or KEDA would scale it straight back up.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// The annotation that remembers the replica count during a rebuild.
pub const REPLICAS_ANNOTATION: &str = "tally.dev/replicas-before-rebuild";
/// KEDA's annotation that pins a ScaledObject's target at a replica count.
pub const KEDA_PAUSED_ANNOTATION: &str = "autoscaling.keda.sh/paused-replicas";

/// The projector Deployment (and its KEDA ScaledObject, if any) in one namespace.
pub struct ProjectorScale {
    deployments: Api<Deployment>,
    scaled_objects: Api<DynamicObject>,
    name: String,
    scaled_object: Option<String>,
    /// How long to wait for pods to go away or come back.
    pub timeout: Duration,
    /// How often to look.
    pub poll: Duration,
}

impl ProjectorScale {
    pub fn new(
        client: Client,
        namespace: &str,
        deployment: &str,
        scaled_object: Option<String>,
    ) -> Self {
        let keda = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "keda.sh",
            "v1alpha1",
            "ScaledObject",
        ));
        Self {
            deployments: Api::namespaced(client.clone(), namespace),
            scaled_objects: Api::namespaced_with(client, namespace, &keda),
            name: deployment.into(),
            scaled_object,
            timeout: Duration::from_secs(300),
            poll: Duration::from_secs(1),
        }
    }

    /// The replica count to restore: the remembered one if an earlier rebuild was cut
    /// short, the current one otherwise.
    pub async fn replicas_to_restore(&self) -> Result<i32, crate::Error> {
        let deployment = self.deployments.get(&self.name).await?;
        let remembered = deployment
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REPLICAS_ANNOTATION))
            .and_then(|v| v.parse::<i32>().ok());
        if let Some(n) = remembered {
            return Ok(n);
        }
        let scale = self.deployments.get_scale(&self.name).await?;
        Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(1))
    }

    /// Remember `replicas`, pause KEDA, scale to zero and wait until no pod is left.
    pub async fn scale_down(&self, replicas: i32) -> Result<(), crate::Error> {
        let remember =
            json!({"metadata": {"annotations": {REPLICAS_ANNOTATION: replicas.to_string()}}});
        self.deployments
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(&remember),
            )
            .await?;
        if let Some(so) = &self.scaled_object {
            let pause = json!({"metadata": {"annotations": {KEDA_PAUSED_ANNOTATION: "0"}}});
            self.scaled_objects
                .patch(so, &PatchParams::default(), &Patch::Merge(&pause))
                .await?;
        }
        self.set_replicas(0).await?;
        self.wait_until("no projector pod is left", |d| pods(d) == 0)
            .await
    }

    /// Scale back to `replicas`, resume KEDA, forget the annotation, and wait until the
    /// pods are ready.
    pub async fn scale_up(&self, replicas: i32) -> Result<(), crate::Error> {
        self.set_replicas(replicas).await?;
        if let Some(so) = &self.scaled_object {
            let resume = json!({"metadata": {"annotations": {KEDA_PAUSED_ANNOTATION: null}}});
            self.scaled_objects
                .patch(so, &PatchParams::default(), &Patch::Merge(&resume))
                .await?;
        }
        let forget = json!({"metadata": {"annotations": {REPLICAS_ANNOTATION: null}}});
        self.deployments
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&forget))
            .await?;
        self.wait_until("the projector is ready again", |d| ready(d) >= replicas)
            .await
    }

    async fn set_replicas(&self, replicas: i32) -> Result<(), crate::Error> {
        let patch = json!({"spec": {"replicas": replicas}});
        self.deployments
            .patch_scale(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(deployment = %self.name, replicas, "scaled");
        Ok(())
    }

    async fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&Deployment) -> bool,
    ) -> Result<(), crate::Error> {
        let start = Instant::now();
        loop {
            let deployment = self.deployments.get(&self.name).await?;
            if done(&deployment) {
                return Ok(());
            }
            if start.elapsed() >= self.timeout {
                return Err(crate::Error::Timeout(format!(
                    "{} ({}): still {} pods, {} ready after {:?}",
                    what,
                    self.name,
                    pods(&deployment),
                    ready(&deployment),
                    self.timeout
                )));
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

fn pods(d: &Deployment) -> i32 {
    d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn ready(d: &Deployment) -> i32 {
    d.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

/// Scale the projector to zero, run `replay`, and scale it back — also when `replay`
/// fails (the projector then repairs what is missing from the store, as after any gap).
/// Returns what `replay` returned.
pub async fn with_projector_stopped<T, E, F>(
    scale: &ProjectorScale,
    replay: F,
) -> Result<T, crate::Error>
where
    F: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let replicas = scale.replicas_to_restore().await?;
    tracing::info!(replicas, "stopping the projector for the rebuild");
    scale.scale_down(replicas).await?;
    let outcome = replay.await;
    let restored = scale.scale_up(replicas).await;
    match (outcome, restored) {
        (Ok(value), Ok(())) => Ok(value),
        (Err(e), _) => Err(crate::Error::Replay(e.to_string())),
        (Ok(_), Err(e)) => Err(e),
    }
}
