//! `vma`: see the `vma-cli` crate documentation, or `vma --help`.
#![warn(clippy::too_many_lines)]

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(vma_cli::run(std::env::args_os()) as u8)
}
