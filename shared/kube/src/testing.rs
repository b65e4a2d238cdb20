//! An in-memory Kubernetes API server for tests (feature `testing`).
//!
//! `kube::Client`s made by [`FakeApiServer::client`] send their requests through a
//! `tower-test` mock to one shared object store, which answers the way the real API
//! server does for what Tally uses: GET, POST (409 AlreadyExists), PUT with optimistic
//! concurrency (409 Conflict when the `resourceVersion` is not the stored one), JSON
//! merge PATCH, and a Deployment's `scale` subresource. A pretend controller moves a
//! Deployment's status to its desired replica count, `settle_after` GETs later. Every
//! request is logged, and the server can be made to fail (503) to test outages.

use kube::client::Body;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tower_test::mock;

type Request = http::Request<Body>;
type Response = http::Response<Body>;

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    resource_version: u64,
    log: Vec<String>,
    down: bool,
    /// Deployments whose pods have not caught up yet: GETs left until they do.
    pending: BTreeMap<String, u32>,
}

/// The shared object store; clone it freely.
#[derive(Clone, Default)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    /// How many GETs of a Deployment pass before its pods match a new replica count.
    settle_after: u32,
}

impl FakeApiServer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pods follow a new replica count only after `gets` GETs of their Deployment
    /// (default: at once), as a slow controller would.
    pub fn with_settle_after(mut self, gets: u32) -> Self {
        self.settle_after = gets;
        self
    }

    /// A client talking to this server, with `namespace` as its default namespace.
    pub fn client(&self, namespace: &str) -> kube::Client {
        let (service, mut handle) = mock::pair::<Request, Response>();
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let response = server.answer(request).await;
                respond.send_response(response);
            }
        });
        kube::Client::new(service, namespace)
    }

    /// Store `object` at `path` (e.g. `/apis/apps/v1/namespaces/ns/deployments/name`).
    pub fn put(&self, path: &str, object: Value) {
        let _ = store(&mut self.state.lock().unwrap(), path.to_string(), object);
    }

    /// The object at `path`, if any.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Every request so far, as `METHOD path body`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// While down, every request gets 503.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// A Deployment named `name` in `namespace` with `replicas` ready pods.
    pub fn add_deployment(&self, namespace: &str, name: &str, replicas: i32) {
        self.put(
            &format!("/apis/apps/v1/namespaces/{namespace}/deployments/{name}"),
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}},
                                      "spec": {"containers": [{"name": name, "image": "tally"}]}}},
                "status": {"replicas": replicas, "readyReplicas": replicas}
            }),
        );
    }

    async fn answer(&self, request: Request) -> Response {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let body = request
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut state = self.state.lock().unwrap();
        let logged = if body.is_null() {
            String::new()
        } else {
            format!(" {body}")
        };
        state.log.push(format!("{method} {path}{logged}"));
        if state.down {
            return status(503, "ServiceUnavailable", "the API server is down");
        }
        if let Some(deployment) = path.strip_suffix("/scale") {
            return scale(
                &mut state,
                self.settle_after,
                deployment,
                method.as_str(),
                body,
            );
        }
        match method.as_str() {
            "GET" => {
                settle(&mut state, &path);
                match state.objects.get(&path) {
                    Some(object) => ok(object),
                    None => status(404, "NotFound", "not found"),
                }
            }
            "POST" => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let path = format!("{path}/{name}");
                if state.objects.contains_key(&path) {
                    return status(409, "AlreadyExists", "already exists");
                }
                store(&mut state, path, body)
            }
            "PUT" => {
                let Some(current) = state.objects.get(&path) else {
                    return status(404, "NotFound", "not found");
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                store(&mut state, path, body)
            }
            "PATCH" => {
                let Some(mut current) = state.objects.get(&path).cloned() else {
                    return status(404, "NotFound", "not found");
                };
                merge(&mut current, &body);
                store(&mut state, path, current)
            }
            _ => status(405, "MethodNotAllowed", "method not allowed"),
        }
    }
}

fn scale(
    state: &mut State,
    settle_after: u32,
    deployment: &str,
    method: &str,
    body: Value,
) -> Response {
    let Some(mut object) = state.objects.get(deployment).cloned() else {
        return status(404, "NotFound", "not found");
    };
    if method == "PATCH" || method == "PUT" {
        if let Some(replicas) = body["spec"]["replicas"].as_i64() {
            object["spec"]["replicas"] = json!(replicas);
            if settle_after == 0 {
                object["status"] = json!({"replicas": replicas, "readyReplicas": replicas});
            } else {
                state.pending.insert(deployment.to_string(), settle_after);
            }
            let _ = store(state, deployment.to_string(), object.clone());
        }
    }
    ok(&json!({
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": object["metadata"]["name"], "namespace": object["metadata"]["namespace"]},
        "spec": {"replicas": object["spec"]["replicas"]},
        "status": {"replicas": object["status"]["replicas"].as_i64().unwrap_or(0)}
    }))
}

/// The pretend controller: after `settle_after` GETs the pods match the spec.
fn settle(state: &mut State, path: &str) {
    let Some(left) = state.pending.get_mut(path) else {
        return;
    };
    *left = left.saturating_sub(1);
    if *left == 0 {
        state.pending.remove(path);
        if let Some(object) = state.objects.get_mut(path) {
            let replicas = object["spec"]["replicas"].clone();
            object["status"] = json!({"replicas": replicas, "readyReplicas": replicas});
        }
    }
}

fn store(state: &mut State, path: String, mut object: Value) -> Response {
    state.resource_version += 1;
    object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
    state.objects.insert(path, object.clone());
    ok(&object)
}

/// RFC 7386 JSON merge patch: objects merge, `null` deletes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn ok(object: &Value) -> Response {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(object).expect("json")))
        .expect("a response")
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("a response")
}
