//! A program that embeds the Hatchery control client: prints each site's name, state and
//! ready/desired workers, one site a line.
//!
//! ```text
//! cargo run --example status -- [SOCKET]
//! ```
//!
//! The socket is the argument, else `$HATCHERY_SOCKET`, else the agent's default
//! (`/run/hatchery/control.sock`). Exit 1 if the agent refused or could not be reached.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use hatchery::control::{Client, ClientError, PROTOCOL_VERSION};

/// The socket to use: the first argument, `$HATCHERY_SOCKET`, or the default.
fn socket() -> PathBuf {
    std::env::args_os()
        .nth(1)
        .or_else(|| std::env::var_os("HATCHERY_SOCKET"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/hatchery/control.sock"))
}

/// Writes one line per site to `out`: `NAME STATE READY/DESIRED`, after a line naming
/// the agent, its version and its protocol.
pub fn run(socket: &std::path::Path, out: &mut dyn Write) -> Result<(), ClientError> {
    let status = Client::connect(socket)?.status(None)?;
    let agent = &status.agent;
    if agent.protocol != PROTOCOL_VERSION {
        eprintln!(
            "note: the agent speaks control protocol {}, this program {PROTOCOL_VERSION}",
            agent.protocol
        );
    }
    writeln!(
        out,
        "agent {} (pid {}, protocol {})",
        agent.version, agent.pid, agent.protocol
    )?;
    for site in &status.sites {
        writeln!(
            out,
            "{} {} {}/{}",
            site.name,
            site.state.name(),
            site.ready,
            site.desired
        )?;
    }
    Ok(())
}

#[allow(dead_code)]
fn main() -> ExitCode {
    let socket = socket();
    match run(&socket, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("status: {}: {e}", socket.display());
            ExitCode::FAILURE
        }
    }
}
