//! Integration tests of `sendense-console`: the real binary (`CARGO_BIN_EXE_sendense-console`)
//! and the live feed, against a fake hub on 127.0.0.1 (port 0).
//!
//! The fake hub is a small axum router serving fixture JSON. It stands in for the real hub only
//! because the hub is being written in parallel with this console; the end-to-end test against
//! the real hub and node (driving the TUI in tmux) is added by the lead in `tests/`.

mod cli;
mod cli_policies;
mod cli_recover;
mod fake_hub;
mod feed;
mod tui;
