//! `sendense-console`: the operator's terminal UI and a scriptable CLI over the hub's HTTP API.
//!
//! - [`config`]: where the hub URL and the bearer token come from (flags, environment, config file).
//! - The hub's HTTP client is `sendense_shared::client` (feature `client`), shared with the node.
//! - [`sse`]: the live feed: the hub's event stream with reconnect and backoff, and polling every
//!   2 s while the stream is down. It only produces [`app::Update`]s.
//! - [`app`]: all state of the TUI (backups, restores and instant recoveries alike in the Jobs
//!   view; policies, their runs and points in the Policies view; the file browser of a point).
//!   Pure:
//!   applying an update or a key changes it; nothing in it does I/O, so it is tested without a
//!   terminal or a hub.
//! - [`view`]: the views of the main screen (a low module: keys and app both name views).
//! - [`keys`]: every key binding, in one table per mode (the help overlay is drawn from it). It
//!   only turns keys into [`keys::Command`]s; the app applies them (keys does not know the app).
//! - [`strings`]: every text the UI shows.
//! - [`ui`]: drawing. `ui::render` takes `&App` and never mutates it.
//! - [`tui`]: the terminal loop: raw mode, render tick, key events, hub updates, SIGTERM; it
//!   carries out the actions keys ask for (the Policies view's in `tui::policies`, the file
//!   browser's listings and tar downloads in `tui::files`) and the re-reads
//!   [`app::App::reload_on`] asks for.
//! - [`cli`]: the command line: the TUI by default, or `backups list`, `backup start`,
//!   `backup cancel`, `restores list`, `restore start`, `restore cancel`,
//!   `recover start|list|show|cancel`, `files ls|get`, `verify`,
//!   `policy create|list|show|update|delete|run-now`, `points list`, `point protect|unprotect`,
//!   `prune` run once with an exit status that says the outcome.
//! - [`format`]: human units (bytes, rates, durations) shared by the UI and the CLI.

pub mod app;
pub mod cli;
pub mod config;
pub mod format;
pub mod keys;
pub mod sse;
pub mod strings;
pub mod tui;
pub mod ui;
pub mod view;

#[cfg(test)]
mod fixtures;
