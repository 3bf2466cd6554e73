//! The world a reconciler sees, for tests: reflector stores the test fills
//! (as the watches would), a mocked API server, and, for layout changes and
//! rollouts, real in-process nodes at loopback addresses.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cavi_operator::admin::Metrics;
use cavi_operator::build::{BuildOptions, Names, ShardAddresses};
use cavi_operator::crd::{CaviCluster, CaviClusterStatus};
use cavi_operator::reconcile::{Context, Stores, Timings};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodCondition, PodStatus, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::{ApiServer, mock_client};

pub const NS: &str = "shop";
pub const UID: &str = "0b5e2c9a-1111-4222-8333-444455556666";

/// Shard addresses a test chose (real nodes on loopback ports).
#[derive(Debug, Default)]
pub struct Loopback(pub Mutex<BTreeMap<u32, String>>);

impl ShardAddresses for Loopback {
    fn shard_addr(&self, _: &Names, ordinal: u32, _: i32) -> String {
        self.0
            .lock()
            .unwrap()
            .get(&ordinal)
            .cloned()
            .unwrap_or_else(|| format!("127.0.0.1:{}", 1 + ordinal))
    }
}

/// The writers behind a context's stores.
pub struct Writers {
    pub config_maps: Writer<ConfigMap>,
    pub services: Writer<Service>,
    pub stateful_sets: Writer<StatefulSet>,
    pub budgets: Writer<PodDisruptionBudget>,
    pub policies: Writer<NetworkPolicy>,
    pub pods: Writer<Pod>,
}

pub fn put<K>(writer: &mut Writer<K>, obj: K)
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    writer.apply_watcher_event(&watcher::Event::Apply(obj));
}

pub fn remove<K>(writer: &mut Writer<K>, obj: K)
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    writer.apply_watcher_event(&watcher::Event::Delete(obj));
}

/// A reconcile context on a mocked API server, with empty stores.
pub fn context_with(
    opts: BuildOptions,
    timings: Timings,
) -> (Arc<Context>, ApiServer, Writers, Arc<Metrics>) {
    let (client, server) = mock_client();
    let metrics = Arc::new(Metrics::default());
    let (config_maps, cm) = reflector::store();
    let (services, svc) = reflector::store();
    let (stateful_sets, sts) = reflector::store();
    let (disruption_budgets, pdb) = reflector::store();
    let (network_policies, np) = reflector::store();
    let (pods, pod) = reflector::store();
    let ctx = Context::new(
        client,
        Reporter {
            controller: "cavi-operator".into(),
            instance: Some("test".into()),
        },
        metrics.clone(),
        opts,
        Stores {
            config_maps,
            services,
            stateful_sets,
            disruption_budgets,
            network_policies,
            pods,
        },
        timings,
    );
    (
        Arc::new(ctx),
        server,
        Writers {
            config_maps: cm,
            services: svc,
            stateful_sets: sts,
            budgets: pdb,
            policies: np,
            pods: pod,
        },
        metrics,
    )
}

pub fn context() -> (Arc<Context>, ApiServer, Writers, Arc<Metrics>) {
    context_with(BuildOptions::default(), Timings::default())
}

/// A CaviCluster in namespace `shop` with the given YAML spec body.
pub fn cluster_with(name: &str, spec: &str) -> CaviCluster {
    serde_yaml::from_str(&format!(
        "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\n\
         metadata: {{name: {name}, namespace: {NS}, uid: {UID}, generation: 3, resourceVersion: '7'}}\n\
         spec:\n{spec}"
    ))
    .unwrap()
}

pub fn names(name: &str) -> Names {
    Names {
        cluster: name.into(),
        namespace: NS.into(),
    }
}

/// A pod of `cluster` with ordinal `ordinal`, created from a template with
/// `hash`, ready or not.
pub fn pod(cluster: &str, ordinal: u32, hash: &str, ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{cluster}-{ordinal}")),
            namespace: Some(NS.into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_owned(), "cavi".to_owned()),
                ("app.kubernetes.io/instance".to_owned(), cluster.to_owned()),
            ])),
            annotations: Some(BTreeMap::from([(
                "cavi.dev/template-hash".to_owned(),
                hash.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        status: Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
        ..Pod::default()
    }
}

/// The template hash a StatefulSet's pods get.
/// The template hash of the running pod `<cluster>-<ordinal>`, as the
/// operator's pod store sees it.
pub fn running_hash(ctx: &Context, cluster: &str, ordinal: u32) -> String {
    let name = format!("{cluster}-{ordinal}");
    let pod = ctx
        .stores
        .pods
        .state()
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
        .unwrap();
    pod.metadata.annotations.as_ref().unwrap()["cavi.dev/template-hash"].clone()
}

pub fn template_hash(sts: &StatefulSet) -> String {
    sts.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()["cavi.dev/template-hash"]
        .clone()
}

/// One request the auto-answering server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: Value,
}

/// Answers every request as an API server would for the operator's calls
/// (applies echoed, events accepted, status applies merged into the
/// cluster), and keeps them for the test to look at.
pub fn answer_everything(mut server: ApiServer, cluster: &CaviCluster) -> Arc<Mutex<Vec<Seen>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let base = serde_json::to_value(cluster).unwrap();
    tokio::spawn(async move {
        while let Ok(Some((request, send))) = tokio::time::timeout(
            std::time::Duration::from_secs(3600),
            server.0.next_request(),
        )
        .await
        {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap().to_vec();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.path().to_owned();
            log.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                path: path.clone(),
                body: body.clone(),
            });
            let (status, answer) = if path.ends_with("/status") {
                let mut obj = base.clone();
                obj["status"] = body["status"].clone();
                (200, obj)
            } else if parts.method == http::Method::PATCH {
                let mut obj = body.clone();
                obj["metadata"]["resourceVersion"] = json!("100");
                obj["metadata"]["uid"] = json!("child-uid");
                (200, obj)
            } else if parts.method == http::Method::POST {
                (201, body.clone())
            } else if parts.method == http::Method::DELETE {
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                )
            } else {
                (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                )
            };
            send.send_response(
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(
                        serde_json::to_vec(&answer).unwrap(),
                    ))
                    .unwrap(),
            );
        }
    });
    seen
}

impl Writers {
    /// Feeds what the server was asked to apply back into the stores, as
    /// the watches would; returns how many applies there were.
    pub fn sync(&mut self, seen: &[Seen]) -> usize {
        let mut applied = 0;
        for s in seen
            .iter()
            .filter(|s| s.method == "PATCH" && !s.path.ends_with("/status"))
        {
            applied += 1;
            let mut obj = s.body.clone();
            obj["metadata"]["resourceVersion"] = json!("100");
            if s.path.contains("/configmaps/") {
                put(&mut self.config_maps, serde_json::from_value(obj).unwrap());
            } else if s.path.contains("/services/") {
                put(&mut self.services, serde_json::from_value(obj).unwrap());
            } else if s.path.contains("/statefulsets/") {
                put(
                    &mut self.stateful_sets,
                    serde_json::from_value(obj).unwrap(),
                );
            } else if s.path.contains("/poddisruptionbudgets/") {
                put(&mut self.budgets, serde_json::from_value(obj).unwrap());
            } else if s.path.contains("/networkpolicies/") {
                put(&mut self.policies, serde_json::from_value(obj).unwrap());
            }
        }
        applied
    }
}

/// The status the last status apply in `seen` wrote.
pub fn last_status(seen: &[Seen]) -> Option<CaviClusterStatus> {
    seen.iter()
        .rev()
        .find(|s| s.path.ends_with("/status"))
        .map(|s| serde_json::from_value(s.body["status"].clone()).unwrap())
}

/// Events posted in `seen`: (type, reason, note).
pub fn events(seen: &[Seen]) -> Vec<(String, String, String)> {
    seen.iter()
        .filter(|s| s.method == "POST" && s.path.contains("/events"))
        .map(|s| {
            (
                s.body["type"].as_str().unwrap_or_default().to_owned(),
                s.body["reason"].as_str().unwrap_or_default().to_owned(),
                s.body["note"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The object an apply in `seen` sent to `path_part`, the last one.
pub fn last_applied<K: serde::de::DeserializeOwned>(seen: &[Seen], path_part: &str) -> Option<K> {
    seen.iter()
        .rev()
        .find(|s| s.method == "PATCH" && s.path.contains(path_part) && !s.path.ends_with("/status"))
        .map(|s| serde_json::from_value(s.body.clone()).unwrap())
}

/// `cluster` with `status` stored, as the next watch event would carry it.
pub fn with_status(cluster: &CaviCluster, status: Option<CaviClusterStatus>) -> CaviCluster {
    let mut c = cluster.clone();
    c.status = status;
    c
}

/// The owner reference every child carries.
pub fn owner_uid<K: Resource>(obj: &K) -> String {
    obj.meta().owner_references.as_ref().unwrap()[0].uid.clone()
}
