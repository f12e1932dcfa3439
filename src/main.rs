//! The `spool` binary: the command line with the built-in workflows.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    spool::cli::main_with(spool::Registry::with_builtins()).await
}
