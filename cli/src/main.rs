//! The `countersign` binary: parses the command line, starts tracing, calls [`countersign::run`].

use std::process::ExitCode;

use clap::Parser;

/// The event store's read and write paths allocate per row; glibc's allocator showed up as a
/// third of the profile of `$all` reads, mimalloc makes that a few percent.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = countersign::Cli::parse();
    countersign::init_tracing(cli.log_filter());
    match countersign::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, no backtrace: the cause chain is enough to act on.
            let message = format!("{error:#}");
            let line: Vec<&str> = message
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("error: {}", line.join(" "));
            ExitCode::FAILURE
        }
    }
}
