//! `kvstore-api <SHARD> <CONFIG>`: parse, set up logging, serve.

use clap::Parser;

use cavi_node::cli::{Args, init_tracing, run};

/// mimalloc: glibc's malloc and free took about a quarter of the
/// instructions of a GET (many small, short-lived allocations per request).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kvstore-api: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
