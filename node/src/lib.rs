//! CAVI node: one shard of the sharded key-value store.
//!
//! The pipeline of a request: [`api`] (HTTP in, JSON errors out) →
//! [`dispatch`] (local or forward, decided once, by the live
//! [`shard_map`]) → [`store`] or [`peers`]. [`search`] reads a prefix a
//! bounded page per range; [`moves`] hands ranges between live nodes;
//! [`boot`] decides which map a starting node serves; [`server`] runs the
//! HTTP connections.

pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod crash;
pub mod dispatch;
pub mod error;
pub mod keyspace;
pub mod metrics;
pub mod moves;
pub mod node;
pub mod peers;
pub mod pipe;
pub mod search;
pub mod server;
pub mod settings;
pub mod shard_map;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod wire;
