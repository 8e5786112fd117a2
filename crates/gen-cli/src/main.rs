//! The `gen` binary: a thin clap front over the library crates. Each subcommand lives in its
//! own file under `commands/`.

mod commands;
mod progress;

use clap::Parser;

fn main() -> std::process::ExitCode {
    gen_core::tune_allocator();
    quiet_library_backtraces();
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// candle attaches a captured backtrace to its errors when `RUST_BACKTRACE` is set (common in
/// developer shells), and they would print after the message; a CLI error is the message
/// alone. `RUST_LIB_BACKTRACE=0` turns library captures off and leaves panic backtraces to
/// `RUST_BACKTRACE`; a `RUST_LIB_BACKTRACE` the user set is kept. Call before any thread starts.
fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message before
/// it already contains (library errors often print their source themselves).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        last = text;
    }
    out
}

#[cfg(test)]
mod tests {
    /// With `RUST_BACKTRACE=1`, a candle error's text carries no captured backtrace once
    /// [`super::quiet_library_backtraces`] ran (std decides on the first capture of the
    /// process, so this test must be the only one here that makes candle errors).
    #[test]
    fn candle_errors_print_without_a_backtrace() {
        std::env::set_var("RUST_BACKTRACE", "1");
        std::env::remove_var("RUST_LIB_BACKTRACE");
        super::quiet_library_backtraces();
        let a =
            candle_core::Tensor::zeros((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let err = a.matmul(&a).unwrap_err().to_string();
        assert!(err.contains("shape mismatch"), "{err}");
        assert!(!err.contains('\n'), "a backtrace was printed: {err}");
    }
}
