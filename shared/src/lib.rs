//! Code shared by the Sendense hub, node and console.
//!
//! - [`api`]: the JSON types of the HTTP contract (`shared/API.md` of the project), one doc
//!   comment per field. Both agents and the console serialise exactly these.
//! - [`errors`]: the [`errors::ErrorCode`] carried in every error body, and the one cause-chain
//!   formatter [`errors::chain`].
//! - [`token`]: the bearer [`token::Token`] (constant-time compare, redacted `Debug`) and the one
//!   token-file reader, which refuses a file group or others may read.
//! - [`http`] (feature `server`): the plumbing of the hub's and node's servers: the bearer
//!   middleware, the `ApiJson` extractor (400 syntax / 422 shape naming the field), the error
//!   answer whose status follows its [`errors::ErrorCode`].
//! - [`ids`]: newtypes for values that must not be mixed up (`DiskKey`, `NbdPort`, `BackupId`).
//! - [`names`]: validation of names that become file names in the repository.
//! - [`targets`]: the NBD targets string `2000:nbd://127.0.0.1:10100/vm-disk-2000,...`.
//! - [`identity`]: version, git commit, build time, executable path and PID of this binary.
//! - [`nbd`]: an async NBD client (fixed newstyle, structured replies, block status) and
//!   [`nbd::verify`], the read-back verification of checksummed ranges both agents use.
//! - [`child`]: supervised child processes (own process group, stderr tail, stop = SIGTERM to the
//!   group, bounded wait, SIGKILL, reap) and checks of foreign PIDs through `/proc`.
//! - [`fsmode`]: directories only the agent may touch (0700, refused when another user owns
//!   them or could write into them) and files created 0600.
//! - [`portholder`]: who listens on a TCP port of this host (a squatter named in a tunnel state).
//! - [`proof`]: the challenge an endpoint answers to prove it holds the node's credential
//!   before a caller sends that credential (`client::proof` checks it on every new connection).
//! - [`backoff`]: retry pacing for every retry loop (exponential, capped, deterministic; jitter
//!   supplied by the caller).
//! - `cli` (feature `cli`): what the three binaries' command lines share: `--log-format`
//!   ([`cli::LogFormat`]) and the hidden `man DIR` / `completions SHELL` subcommands.
//! - `client` (feature `client`): the one typed hub client of the console and the node, and its
//!   error type.

pub mod api;
pub mod backoff;
pub mod child;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
pub mod errors;
pub mod fsmode;
#[cfg(feature = "server")]
pub mod http;
pub mod identity;
pub mod ids;
pub mod names;
pub mod nbd;
pub mod portholder;
pub mod proof;
pub mod targets;
pub mod token;
