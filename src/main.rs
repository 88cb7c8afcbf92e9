//! The standalone `kser` command: send messages, inspect state, migrate.
//! It has no tasks of its own; a worker is built from the library with a
//! registry of tasks (see `examples/dice.rs`).

fn main() -> std::process::ExitCode {
    kser::cli::run(kser::Registry::new())
}
