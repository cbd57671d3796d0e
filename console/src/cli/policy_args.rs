//! The arguments of `policy …`, `points …` and `point …`: the subcommands, and a policy's
//! fields as flags (`create` and `update` share them; see `policies` for how they apply).

use clap::{Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create a policy from flags or --file policy.json; prints its id.
    Create {
        /// Name of the policy (or "name" in --file).
        name: Option<String>,
        /// A policy as JSON (the body of POST /api/v1/policies); flags override its fields.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        #[command(flatten)]
        fields: Box<PolicyFields>,
        /// Print the stored policy as JSON instead of its id.
        #[arg(long)]
        json: bool,
    },
    /// List policies by name.
    List {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// One policy (by id or name) and its recent runs.
    Show {
        policy: String,
        /// Print the hub's JSON of the policy.
        #[arg(long)]
        json: bool,
    },
    /// Change a policy (by id or name): only the fields given change.
    Update {
        policy: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// The whole policy as JSON (replaces it); flags override its fields.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        #[command(flatten)]
        fields: Box<PolicyFields>,
        /// Print the stored policy as JSON instead of its id.
        #[arg(long)]
        json: bool,
    },
    /// Delete a policy (by id or name); its points stay.
    Delete {
        policy: String,
        /// Print `{"deleted": ID}`.
        #[arg(long)]
        json: bool,
    },
    /// Run a policy (by id or name) now for all its VMs; prints the queued runs.
    RunNow {
        policy: String,
        /// Print the runs as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PointsCommand {
    /// The VM's points, newest first, with the rule that keeps each and what the next prune
    /// does to it.
    List {
        vm: String,
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PointCommand {
    /// Exempt a point from pruning and from the retention counts.
    Protect {
        /// Backup id, or its first 8 or more characters.
        id: String,
        /// Print the backup as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let retention decide about the point again.
    Unprotect {
        /// Backup id, or its first 8 or more characters.
        id: String,
        /// Print the backup as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ChainLimitArg {
    /// The next backup is a full.
    Full,
    /// The oldest points are merged into a synthetic full on the hub.
    Synthetic,
}

/// The fields of a policy as flags; each one given replaces that field.
#[derive(Debug, Default, clap::Args)]
pub struct PolicyFields {
    /// A VM by name (repeatable). Any of --vm/--pattern/--node replaces the whole selector.
    #[arg(long = "vm", value_name = "NAME")]
    pub vms: Vec<String>,
    /// VMs whose names match a glob, e.g. 'web-*' (repeatable).
    #[arg(long = "pattern", value_name = "GLOB")]
    pub patterns: Vec<String>,
    /// Every VM of a node (repeatable).
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,
    /// Repository id (may be left out on create when the hub has exactly one).
    #[arg(long, value_name = "ID")]
    pub repository: Option<String>,
    /// Five-field cron expression, e.g. '0 1 * * *'.
    #[arg(long, value_name = "CRON")]
    pub schedule: Option<String>,
    /// IANA time zone the schedule is read in (default UTC), e.g. Europe/London.
    #[arg(long, value_name = "TZ")]
    pub timezone: Option<String>,
    /// A full when the newest full is this many days old (0: off).
    #[arg(long, value_name = "N")]
    pub full_every_days: Option<u32>,
    /// A full after this many incrementals (0: off).
    #[arg(long, value_name = "N")]
    pub full_every_runs: Option<u32>,
    /// A full on runs planned on this weekday: mon … sun ('none': off).
    #[arg(long, value_name = "DAY")]
    pub weekly_full_on: Option<String>,
    /// Keep the newest N points (0: rule not used).
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest point of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest point of each of the last N years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Longest chain of points (0: no limit).
    #[arg(long, value_name = "N")]
    pub max_chain_length: Option<u32>,
    /// What happens at the chain limit.
    #[arg(long, value_enum)]
    pub chain_limit: Option<ChainLimitArg>,
    /// Higher runs first when queued runs compete (may be negative).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// How long a queued run waits before it gives up: 90m, 6h, 1d, or seconds.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub queue_window: Option<u64>,
    /// Scheduled runs happen (the default on create).
    #[arg(long, conflicts_with = "disabled")]
    pub enabled: bool,
    /// No scheduled runs (run-now still works).
    #[arg(long)]
    pub disabled: bool,
    /// Boot-check each new point (as `verify --boot`, the point's recorded hardware) before
    /// the retention prune; a point that does not boot keeps every older one. A boot spec of
    /// its own goes in --file as "boot_check".
    #[arg(long, conflicts_with = "no_boot_check")]
    pub boot_check: bool,
    /// No boot check of new points.
    #[arg(long)]
    pub no_boot_check: bool,
}

/// `90m`, `6h`, `1d`, `45s`, `3600` (seconds).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90m, 6h, 1d, 3600)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?} in {s:?} (s, m, h or d)")),
    };
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_or_seconds() {
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("6h"), Ok(21_600));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        assert_eq!(parse_duration("3600"), Ok(3600));
        assert!(parse_duration("6w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").is_err());
    }
}
