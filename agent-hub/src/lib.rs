//! `sendense-hub`: the backup server.
