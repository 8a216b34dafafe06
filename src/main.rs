//! The `outbox-relay` binary: parses the command line, sets up logging, dispatches.

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// The relay allocates and frees a few small buffers per row (its fields, headers, reports) on
/// many threads; glibc's allocator was the largest part of the relay's CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(&args.global);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::dispatch(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<cli::NotFound>() => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::NotFound::EXIT_CODE)
        }
        Err(e) if e.is::<cli::Missing>() => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::Missing::EXIT_CODE)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
