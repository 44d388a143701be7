//! The `soup` command line (issue [cli] adds its subcommands: train, finetune, mix, eval, inspect).

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--version") | Some("-V") => {
            println!("soup {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("soup: no subcommands yet; the command line arrives with issue [cli]");
            ExitCode::from(2)
        }
    }
}
