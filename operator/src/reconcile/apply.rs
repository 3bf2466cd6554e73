//! Writing to the API server: server-side apply of the children whose
//! intent changed, and of the status when it changed.

use std::borrow::Cow;
use std::fmt::Debug;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::info;

use super::seen::Seen;
use super::{Context, Error, FIELD_MANAGER};
use crate::build::{APPLIED_HASH_ANNOTATION, Children, Names, stable_hash};
use crate::crd::{CaviCluster, CaviClusterStatus};

/// Applies every child whose intent changed, in dependency order: config
/// and DNS before the pods. The NetworkPolicy goes when it is turned off.
pub(super) async fn apply_children(
    ctx: &Context,
    names: &Names,
    children: &Children,
    seen: &Seen,
) -> Result<(), Error> {
    let client = &ctx.client;
    let ns = names.namespace.as_str();
    apply(
        &Api::namespaced(client.clone(), ns),
        &children.config_map,
        seen.config_map.as_deref(),
    )
    .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    apply(
        &services,
        &children.headless_service,
        seen.headless_service.as_deref(),
    )
    .await?;
    apply(
        &services,
        &children.client_service,
        seen.client_service.as_deref(),
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), ns),
        &children.stateful_set,
        seen.stateful_set.as_deref(),
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), ns),
        &children.disruption_budget,
        seen.disruption_budget.as_deref(),
    )
    .await?;
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    match (&children.network_policy, &seen.network_policy) {
        (Some(np), observed) => apply(&policies, np, observed.as_deref()).await?,
        (None, Some(_)) => {
            info!("removing the NetworkPolicy (spec.networkPolicy.enabled is off)");
            match policies
                .delete(&names.network_policy(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        (None, None) => {}
    }
    Ok(())
}

/// Server-side applies `desired` (the whole object, under one field
/// manager, so fields it no longer sets are removed) unless the child
/// already carries the hash of exactly this intent and every field the
/// operator sets still has its value (someone may have edited one).
pub async fn apply<K>(api: &Api<K>, desired: &K, observed: Option<&K>) -> Result<(), Error>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let hash = stable_hash(&serde_json::to_vec(desired)?);
    let mut desired = desired.clone();
    desired
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
    if let Some(observed) = observed {
        let same_intent = observed
            .meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(APPLIED_HASH_ANNOTATION))
            == Some(&hash);
        if same_intent
            && is_subset(
                &serde_json::to_value(&desired)?,
                &serde_json::to_value(observed)?,
            )
        {
            return Ok(());
        }
    }
    let name = desired.meta().name.clone().unwrap_or_default();
    let kind = K::kind(&Default::default()).into_owned();
    info!(%kind, %name, "applying");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(&name, &params, &Patch::Apply(&desired)).await {
        Ok(_) => Ok(()),
        // The API server understood the request and refuses its content:
        // the spec must change, and the user must be told.
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => Err(Error::ApplyFailed {
            what: format!("{kind} {name}"),
            message: format!("{kind} {name}: {}", s.message),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Whether every field set in `desired` has the same value in `observed`.
/// Fields only in `observed` (defaults, status, other managers) are
/// ignored; lists must have the same length and match item by item.
pub fn is_subset(desired: &serde_json::Value, observed: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (desired, observed) {
        (Value::Object(d), Value::Object(o)) => d
            .iter()
            .all(|(k, dv)| o.get(k).is_some_and(|ov| is_subset(dv, ov))),
        (Value::Array(d), Value::Array(o)) => {
            d.len() == o.len() && d.iter().zip(o).all(|(dv, ov)| is_subset(dv, ov))
        }
        (d, o) => d == o,
    }
}

/// The typed body of a status apply: `apiVersion`, `kind` and `status`
/// only, so the operator never claims ownership of spec fields.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusApply<'a> {
    api_version: Cow<'static, str>,
    kind: Cow<'static, str>,
    status: &'a CaviClusterStatus,
}

pub(super) async fn patch_status(
    cluster: &CaviCluster,
    names: &Names,
    status: &CaviClusterStatus,
    client: &Client,
) -> Result<(), Error> {
    if cluster.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<CaviCluster> = Api::namespaced(client.clone(), &names.namespace);
    let body = StatusApply {
        api_version: CaviCluster::api_version(&()),
        kind: CaviCluster::kind(&()),
        status,
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&names.cluster, &params, &Patch::Apply(&body))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::is_subset;

    #[test]
    fn fields_only_the_server_sets_do_not_count_as_a_change() {
        let desired = json!({"spec": {"replicas": 3, "ports": [{"port": 8080}]}});
        let observed = json!({
            "spec": {"replicas": 3, "revisionHistoryLimit": 10,
                     "ports": [{"port": 8080, "protocol": "TCP"}]},
            "status": {"readyReplicas": 3}
        });
        assert!(is_subset(&desired, &observed));
    }

    #[test]
    fn an_edited_value_a_missing_field_or_another_list_is_a_change() {
        let desired = json!({"spec": {"replicas": 3, "ports": [{"port": 8080}]}});
        for observed in [
            json!({"spec": {"replicas": 4, "ports": [{"port": 8080}]}}),
            json!({"spec": {"ports": [{"port": 8080}]}}),
            json!({"spec": {"replicas": 3, "ports": [{"port": 8080}, {"port": 9090}]}}),
            json!({"spec": {"replicas": 3, "ports": [{"port": 9090}]}}),
            json!({"spec": {"replicas": "3", "ports": [{"port": 8080}]}}),
        ] {
            assert!(!is_subset(&desired, &observed), "{observed}");
        }
    }
}
