//! CAVI node: one shard of the sharded key-value store.
//!
//! The pipeline of a request: [`api`] (HTTP in, JSON errors out) →
//! [`dispatch`] (local or forward, decided once) → [`store`] or [`peers`].
//! [`search`] fans a prefix query out over the shards that can hold it.

pub mod api;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod keyspace;
pub mod metrics;
pub mod peers;
pub mod search;
pub mod server;
pub mod settings;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
