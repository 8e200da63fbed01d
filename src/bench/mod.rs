//! `spliced bench`: placeholder, being written.

/// Arguments of `spliced bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {}

/// Runs the benchmark; returns the process exit code.
pub fn run(_args: BenchArgs) -> std::process::ExitCode {
    eprintln!("spliced bench: not built yet");
    std::process::ExitCode::FAILURE
}
