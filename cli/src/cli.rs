//! Command-line grammar.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "arrakis", version, about = "MicroVM sandboxes for AI agents")]
pub struct Args {
    /// State directory (database and per-sandbox files).
    #[arg(long, global = true, env = "ARRAKIS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Verb,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create and boot a sandbox; returns once it can run commands.
    Create(CreateArgs),
    /// Create a sandbox, run one command in it, and (with --rm) destroy it.
    Run(RunArgs),
    /// Run a command in a running sandbox; exits with the command's status.
    Exec(ExecArgs),
    /// Copy files: `arrakis cp LOCAL NAME:PATH` or `arrakis cp NAME:PATH LOCAL`.
    Cp(CpArgs),
    /// File operations inside a sandbox.
    #[command(subcommand)]
    Fs(FsVerb),
    /// List sandboxes.
    List,
    /// Show one sandbox.
    Get { name: String },
    /// Boot a stopped (or crashed) sandbox again.
    Start { name: String },
    /// Shut a sandbox's guest down; its disk is kept.
    Stop { name: String },
    /// Freeze a sandbox's vCPUs.
    Pause { name: String },
    /// Unfreeze a paused sandbox.
    Resume { name: String },
    /// Remove a sandbox and everything it owns.
    Destroy { name: String },
    /// Run the sandbox daemon with its HTTP API (py-arrakis compatible).
    Serve(ServeArgs),
}

#[derive(Debug, ClapArgs)]
pub struct ServeArgs {
    /// Address to listen on. Only loopback addresses are accepted until API
    /// tokens exist; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Clone, ClapArgs)]
pub struct SizeArgs {
    /// Virtual CPUs.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long = "memory")]
    pub memory_mb: Option<u32>,
    /// Base image name.
    #[arg(long)]
    pub image: Option<String>,
}

#[derive(Debug, ClapArgs)]
pub struct CreateArgs {
    pub name: String,
    #[command(flatten)]
    pub size: SizeArgs,
}

#[derive(Debug, Clone, ClapArgs)]
pub struct CommandArgs {
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the guest.
    #[arg(short = 'w', long)]
    pub cwd: Option<String>,
    /// User name or uid to run as.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Kill the command's process tree after this many seconds.
    #[arg(short, long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Pass this process's stdin to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Run the words as one shell command line (`bash -c`).
    #[arg(long)]
    pub shell: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, ClapArgs)]
pub struct ExecArgs {
    pub name: String,
    #[command(flatten)]
    pub command: CommandArgs,
}

#[derive(Debug, ClapArgs)]
pub struct RunArgs {
    /// Sandbox name (default: a generated one).
    #[arg(long)]
    pub name: Option<String>,
    /// Destroy the sandbox when the command ends.
    #[arg(long)]
    pub rm: bool,
    #[command(flatten)]
    pub size: SizeArgs,
    #[command(flatten)]
    pub command: CommandArgs,
}

#[derive(Debug, ClapArgs)]
pub struct CpArgs {
    pub source: String,
    pub destination: String,
    /// Permission bits of an uploaded file, in octal.
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum FsVerb {
    /// List a directory.
    Ls { name: String, path: String },
    /// Describe a path.
    Stat { name: String, path: String },
    /// Create a directory.
    Mkdir {
        name: String,
        path: String,
        /// Create missing parents too.
        #[arg(short, long)]
        parents: bool,
    },
    /// Remove a path.
    Rm {
        name: String,
        path: String,
        /// Remove directories and their contents.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Change permission bits (octal, e.g. 755).
    Chmod {
        name: String,
        #[arg(value_parser = parse_mode)]
        mode: u32,
        path: String,
    },
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| format!("{text:?} is not an octal permission mode (0 to 7777)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn exec_keeps_hyphenated_command_words() {
        let args = Args::parse_from(["arrakis", "exec", "box", "--", "ls", "-la", "/"]);
        let Verb::Exec(exec) = args.command else {
            panic!("not exec")
        };
        assert_eq!(exec.name, "box");
        assert_eq!(exec.command.command, ["ls", "-la", "/"]);
    }

    #[test]
    fn modes_are_octal_and_bounded() {
        assert_eq!(parse_mode("755"), Ok(0o755));
        assert!(parse_mode("8").is_err());
        assert!(parse_mode("17777").is_err());
    }
}
