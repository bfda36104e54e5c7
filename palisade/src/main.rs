//! The `palisade` executable: the CLI, and the platform's processes (`controller`, `agent`, and
//! the internal `jail` step that sandboxes each QEMU process) in one binary.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Palisade: a public IaaS platform built to X.1605"
)]
struct Cli {
    #[command(flatten)]
    global: palisade_cli::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Client(palisade_cli::Command),
    /// Run the controller (HTTPS API and services).
    Controller(palisade_controller::ControllerArgs),
    /// Run a host agent.
    Agent(palisade_agent::AgentArgs),
    /// Internal: sandbox the current process and exec QEMU (used by the agent).
    #[command(hide = true)]
    Jail(palisade_agent::JailArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The jailer must stay single-threaded until it execs QEMU: no runtime, no logger threads.
    if let Command::Jail(args) = cli.command {
        return palisade_agent::jail_main(args);
    }
    if matches!(cli.command, Command::Controller(_) | Command::Agent(_)) {
        if let Err(e) = palisade_cli::up::end_with_supervisor() {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    }
    init_logging();
    palisade_common::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Client(command) => palisade_cli::run(cli.global, command).await,
            Command::Controller(args) => palisade_controller::serve(args).await,
            Command::Agent(args) => palisade_agent::serve(args).await,
            Command::Jail(_) => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error chain is printed once, here at the edge.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (stdout carries command output); `RUST_LOG` overrides the level.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
