//! `kvstore-api <SHARD> <CONFIG>`: parse, set up logging, serve.

use clap::Parser;

use cavi_node::cli::{Args, avoid_huge_pages, init_tracing, run};

/// mimalloc: glibc's malloc and free took about a quarter of the
/// instructions of a GET (many small, short-lived allocations per request).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before the runtime's threads and their first allocations.
    let huge_pages = avoid_huge_pages();
    let args = Args::parse();
    init_tracing(args.log_format);
    if let Err(e) = huge_pages {
        tracing::warn!(
            "cannot turn transparent huge pages off ({e}); latency may spike while memory grows"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kvstore-api: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kvstore-api: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
