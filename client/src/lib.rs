//! CAVI client: talks to a running cluster.
//!
//! - [`client`]: a typed HTTP client for one node's API;
//! - [`routing`]: each key straight to its owner by the live map;
//! - [`reshard`]: the resharding planner and driver (the operator uses
//!   them too);
//! - [`command`]: the `cavi` command line, built on it ([`cluster`],
//!   [`load`] and [`table`] hold the bigger commands and their output).
//!
//! The binary `src/bin/cavi.rs` only parses arguments, calls
//! [`command::run`] and turns a [`ClientError`] into `cavi: <sentence>` and
//! an exit code.

pub mod client;
pub mod cluster;
pub mod command;
mod error;
pub mod load;
pub mod reshard;
pub mod routing;
pub mod table;

pub use client::{Client, DEFAULT_ENDPOINT, Entry, SearchAnswer, normalize_endpoint, seconds};
pub use error::{ClientError, EXIT_FAILURE, EXIT_UNREACHABLE, EXIT_USAGE};
