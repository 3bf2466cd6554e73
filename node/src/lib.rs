//! CAVI node: one shard of the sharded key-value store.
//!
//! The pipeline of a request: [`api`] (HTTP in, JSON errors out) →
//! [`dispatch`] (local or forward, decided once) → [`store`] or [`peers`].
//! [`search`] fans a prefix query out over the shards that can hold it.

pub mod config;
pub mod keyspace;
