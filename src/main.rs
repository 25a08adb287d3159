//! The `mergefleet` binary: parse arguments, set up logging and threads, map errors to exit
//! codes (0 success, 2 invalid config or input, 3 a worker told the merge failed, 1 anything
//! else).

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOC: mergefleet::hugepages::HugePages = mergefleet::hugepages::HugePages;

/// Log lines on stderr (text or JSON, filtered by RUST_LOG, default info), and object_store's
/// retries counted for the metrics whatever RUST_LOG says.
fn init_logs(format: mergefleet::args::LogFormat) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let lines = match format {
        mergefleet::args::LogFormat::Json => lines.json().flatten_event(true).boxed(),
        mergefleet::args::LogFormat::Text => lines
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(
            mergefleet::metrics::StoreRetries
                .with_filter(mergefleet::metrics::store_retries_filter()),
        )
        .init();
}

fn main() -> ExitCode {
    let cli = mergefleet::args::Cli::parse();
    if matches!(
        cli.command,
        mergefleet::args::Command::Plan(_) | mergefleet::args::Command::Status(_)
    ) {
        // Commands that only print: a closed pipe (`mergefleet plan | head`) ends them
        // quietly, as it ends `cat`, instead of a panic on the next println.
        // SAFETY: called before any thread starts; SIG_DFL is always a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logs(cli.log_format);
    let threads = cli::threads(&cli.command);
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        eprintln!("error: cannot start {threads} compute threads: {e}");
        return ExitCode::from(1);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(2))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, skipping causes whose text the message already includes.
            let mut shown = e.to_string();
            eprintln!("error: {shown}");
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !shown.contains(&c) {
                    eprintln!("  caused by: {c}");
                    shown.push_str(&c);
                }
            }
            ExitCode::from(
                e.downcast_ref::<mergefleet::Error>()
                    .map_or(1, mergefleet::Error::exit_code),
            )
        }
    }
}
