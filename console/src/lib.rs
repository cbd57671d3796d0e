//! `sendense-console`: the operator's terminal UI.
