//! `cavi`: the command-line client. Parse, run, and turn an error into
//! `cavi: <sentence>` on stderr and an exit code (1 the server said no or
//! the input is bad, 2 usage, 3 unreachable).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use cavi_client::command::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "cavi: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
