//! `cavi-operator render`: the children of a `CaviCluster` file, offline,
//! as a multi-document YAML stream (what `helm template` is to a chart).

use serde::Deserialize;

use crate::build::{BuildError, BuildOptions, Children, Names};
use crate::crd::CaviCluster;
use crate::validate::validate;

/// Namespace used when the file's `metadata.namespace` is empty.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("not a CaviCluster: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("the file holds no CaviCluster")]
    Empty,
    #[error("document {index} is a {kind}, not a CaviCluster")]
    WrongKind { index: usize, kind: String },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("CaviCluster {name} would be refused ({reason}): {message}")]
    Refused {
        name: String,
        reason: &'static str,
        message: String,
    },
}

/// Renders every `CaviCluster` document of `text`, as the operator with
/// `opts` would build them for a new cluster.
pub fn render(text: &str, opts: &BuildOptions) -> Result<String, RenderError> {
    let mut out = String::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default();
        if kind != "CaviCluster" {
            return Err(RenderError::WrongKind {
                index,
                kind: if kind.is_empty() {
                    "document without kind".into()
                } else {
                    kind.into()
                },
            });
        }
        let cluster: CaviCluster = serde_yaml::from_value(value)?;
        let namespace = cluster
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        // The same validation the operator runs, so a file that renders is
        // one the operator accepts (the kept-keys check needs a live cluster).
        let names = Names::new(&cluster, &namespace)?;
        validate(&names, &cluster.spec, None).map_err(|invalid| RenderError::Refused {
            name: names.cluster.clone(),
            reason: invalid.reason,
            message: invalid.message,
        })?;
        out.push_str(&Children::of_spec(&cluster, &namespace, opts)?.to_yaml_stream()?);
    }
    if out.is_empty() {
        return Err(RenderError::Empty);
    }
    Ok(out)
}
