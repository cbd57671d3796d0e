//! Where the hub URL and the bearer token come from: a flag, then the environment, then the
//! config file, then the default. The token itself never travels on the command line (it would
//! show in `ps`): only the path of a file holding it, or `SENDENSE_TOKEN` in the environment.

use sendense_shared::token::{TokenError, read_token_file};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Hub address when nothing else says otherwise (API.md: the hub listens on 127.0.0.1:8082).
pub const DEFAULT_HUB_URL: &str = "http://127.0.0.1:8082";
/// Environment variable holding the token itself (an alternative to a token file).
pub const TOKEN_ENV: &str = "SENDENSE_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for the console (keys: hub_url, token_file)")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// The token file could not be read, is empty, or group or others may read it (the one
    /// reader of token files, shared with hub and node, names the path and the mode).
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("hub URL {url:?} must start with http:// (e.g. http://127.0.0.1:8082)")]
    BadUrl { url: String },
}

/// The console's config file (`~/.config/sendense/console.toml` unless `--config` names one).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub hub_url: Option<String>,
    pub token_file: Option<PathBuf>,
}

/// What the flags and environment said (clap fills flags and their `env` forms).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub hub_url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub hub_url: String,
    pub token: Option<String>,
}

/// Default config path: `$XDG_CONFIG_HOME/sendense/console.toml` or `~/.config/...`.
pub fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("sendense").join("console.toml"))
}

fn load_file(path: &Path, must_exist: bool) -> Result<FileConfig, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileConfig::default());
        }
        Err(source) => {
            return Err(ConfigError::ReadConfig {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    toml::from_str(&text).map_err(|source| ConfigError::ParseConfig {
        path: path.to_path_buf(),
        source,
    })
}

/// Read a token file with the reader hub and node use: refused when empty or readable by
/// group or others; surrounding white space is not part of the token.
pub fn read_token(path: &Path) -> Result<String, ConfigError> {
    Ok(read_token_file(path)?.as_str().to_string())
}

/// Resolve the settings. `token_env` is the value of [`TOKEN_ENV`], passed in so tests need not
/// touch the process environment.
pub fn resolve(over: &Overrides, token_env: Option<String>) -> Result<Settings, ConfigError> {
    let file = match &over.config {
        Some(path) => load_file(path, true)?,
        None => match default_config_path() {
            Some(path) => load_file(&path, false)?,
            None => FileConfig::default(),
        },
    };
    let hub_url = over
        .hub_url
        .clone()
        .or(file.hub_url)
        .unwrap_or_else(|| DEFAULT_HUB_URL.to_string());
    let hub_url = hub_url.trim_end_matches('/').to_string();
    if !hub_url.starts_with("http://") && !hub_url.starts_with("https://") {
        return Err(ConfigError::BadUrl { url: hub_url });
    }
    let token = match over.token_file.clone().or(file.token_file) {
        Some(path) => Some(read_token(&path)?),
        None => token_env
            .filter(|t| !t.trim().is_empty())
            .map(|t| t.trim().to_string()),
    };
    Ok(Settings { hub_url, token })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A token file as an operator would leave it: `mode` set explicitly, whatever the umask.
    fn write_token(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn flag_beats_config_file_and_token_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let token = write_token(dir.path(), "s3cret\n", 0o600);
        let cfg = dir.path().join("console.toml");
        std::fs::write(
            &cfg,
            format!(
                "hub_url = \"http://127.0.0.1:9999\"\ntoken_file = {:?}\n",
                token
            ),
        )
        .unwrap();
        let from_file = resolve(
            &Overrides {
                config: Some(cfg.clone()),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(from_file.hub_url, "http://127.0.0.1:9999");
        assert_eq!(from_file.token.as_deref(), Some("s3cret"));

        let flagged = resolve(
            &Overrides {
                config: Some(cfg),
                hub_url: Some("http://127.0.0.1:8082/".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(flagged.hub_url, "http://127.0.0.1:8082");
    }

    #[test]
    fn missing_token_file_names_the_path() {
        let err = resolve(
            &Overrides {
                token_file: Some("/nonexistent/sendense-token".into()),
                config: Some("/dev/null".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert_eq!(
            sendense_shared::errors::chain(&err),
            "cannot read token file /nonexistent/sendense-token: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn unknown_config_key_and_bad_url_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("console.toml");
        std::fs::write(&cfg, "hub = \"x\"\n").unwrap();
        let err = resolve(
            &Overrides {
                config: Some(cfg),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::ParseConfig { .. }), "{err}");

        let err = resolve(
            &Overrides {
                hub_url: Some("127.0.0.1:8082".into()),
                config: Some("/dev/null".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("http://"), "{err}");
    }

    #[test]
    fn token_from_environment_when_no_file() {
        let s = resolve(
            &Overrides {
                config: Some("/dev/null".into()),
                ..Default::default()
            },
            Some("envtoken".into()),
        )
        .unwrap();
        assert_eq!(s.token.as_deref(), Some("envtoken"));
    }

    #[test]
    fn a_token_file_others_may_read_is_refused_naming_path_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let token = write_token(dir.path(), "s3cret\n", 0o644);
        let err = resolve(
            &Overrides {
                token_file: Some(token.clone()),
                config: Some("/dev/null".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert_eq!(
            sendense_shared::errors::chain(&err),
            format!(
                "token file {} is readable by group or others (mode 0644); `chmod 600` it \
                 (and consider the token leaked)",
                token.display()
            )
        );
    }

    #[test]
    fn an_empty_token_file_is_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let token = write_token(dir.path(), " \n", 0o600);
        let err = read_token(&token).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("token file {} is empty", token.display())
        );
    }
}
