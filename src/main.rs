//! The `pglifeguard` binary; everything lives in the library.
fn main() -> std::process::ExitCode {
    pglifeguard::cli::main()
}
