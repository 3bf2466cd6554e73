//! CAVI operator: reconciles `CaviCluster` resources into the objects that
//! run a CAVI cluster on Kubernetes.
//!
//! The pipeline of one reconcile: [`validate`] (is the layout acceptable?)
//! → [`build`] (pure: the desired children) → [`reconcile::apply`]
//! (server-side apply of what differs) → [`status`] (pure: what is running).
//! [`controller`] wires the reconciler to the API server, [`leader`] keeps
//! two replicas from reconciling at once, [`admin`] serves health and
//! metrics, [`render`] prints the children of a file offline.

pub mod admin;
pub mod build;
pub mod controller;
pub mod crd;
pub mod layout;
pub mod leader;
pub mod quantity;
pub mod rbac;
pub mod reconcile;
pub mod render;
pub mod rollout;
pub mod status;
pub mod telemetry;
pub mod validate;
