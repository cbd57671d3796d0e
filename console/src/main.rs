//! `sendense-console`: see the crate docs of `console` for the map of its modules.

fn main() -> std::process::ExitCode {
    console::cli::main()
}
