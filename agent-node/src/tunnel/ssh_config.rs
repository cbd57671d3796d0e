//! The ssh config file the tunnel runs with (`ssh -F FILE -N sendense-hub`): a hundred forwards
//! do not belong on a command line (`ps` truncates it, an operator cannot read it), and with
//! `-F` ssh reads neither `~/.ssh/config` nor `/etc/ssh/ssh_config`, so nothing on the machine
//! changes what the tunnel does. Each link (ssh process) has a file of its own holding its share
//! of the forwards: `tunnel.ssh_config` for link 0, `tunnel.K.ssh_config` for link K.

use super::config::{Forward, TunnelConfig};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The `Host` alias the file defines and ssh is started with.
pub const HOST_ALIAS: &str = "sendense-hub";

/// File name of link 0's ssh config inside the node's run directory.
pub const FILE_NAME: &str = "tunnel.ssh_config";

/// File name of link `link`'s ssh config: [`FILE_NAME`] for link 0, `tunnel.K.ssh_config` else.
pub fn file_name(link: usize) -> String {
    match link {
        0 => FILE_NAME.to_string(),
        k => format!("tunnel.{k}.ssh_config"),
    }
}

/// The text of link `link`'s ssh config file.
pub fn render(cfg: &TunnelConfig, link: usize) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: &dyn std::fmt::Display| s.push_str(&format!("    {k} {v}\n"));
    line("HostName", &cfg.target.host);
    line("Port", &cfg.target.port);
    line("User", &cfg.target.user);
    line("IdentityFile", &quoted(&cfg.identity));
    // Only the given key: never keys of an agent or of ~/.ssh.
    line("IdentitiesOnly", &"yes");
    line("IdentityAgent", &"none");
    line("PreferredAuthentications", &"publickey");
    line("PasswordAuthentication", &"no");
    line("KbdInteractiveAuthentication", &"no");
    line("BatchMode", &"yes");
    line("UserKnownHostsFile", &quoted(&cfg.known_hosts));
    line("GlobalKnownHostsFile", &"/dev/null");
    line("StrictHostKeyChecking", &"yes");
    line("UpdateHostKeys", &"no");
    line("CheckHostIP", &"no");
    line("ExitOnForwardFailure", &"yes");
    line("ServerAliveInterval", &cfg.server_alive_interval);
    line("ServerAliveCountMax", &cfg.server_alive_count_max);
    line("Ciphers", &cfg.ciphers);
    line("ConnectTimeout", &10);
    line("TCPKeepAlive", &"yes");
    line("ControlMaster", &"no");
    line("ControlPath", &"none");
    line("ForwardAgent", &"no");
    line("ForwardX11", &"no");
    line("PermitLocalCommand", &"no");
    line("RequestTTY", &"no");
    // DEBUG1 is the level at which ssh reports each forward as established ("Local forwarding
    // listening on ...", "forwarding_success: all expected forwarding replies received"): the
    // supervisor says `up` on those lines, not on a guess.
    line("LogLevel", &"DEBUG1");
    if cfg.nbd_unix().is_some() {
        // A socket left by a SIGKILLed ssh would make the next bind fail; the directory is
        // the node's own 0700 one, so nobody else can have put anything there.
        line("StreamLocalBindUnlink", &"yes");
        line("StreamLocalBindMask", &"0177");
    }
    for f in cfg.link_forwards(link) {
        match f {
            Forward::Local { listen, to } => line("LocalForward", &format_args!("{listen} {to}")),
            // Paths are checked for spaces and quotes by TunnelConfig::resolve.
            Forward::LocalUnix { listen, to } => line(
                "LocalForward",
                &format_args!("{} {}", listen.display(), to.display()),
            ),
            Forward::Remote { listen, to } => line("RemoteForward", &format_args!("{listen} {to}")),
        }
    }
    format!(
        "# Written by sendense-node before every start of its tunnel; edits are overwritten.\n\
         # Link {link} of {}. Run by hand: ssh -F THIS_FILE -N {HOST_ALIAS}\n\
         Host {HOST_ALIAS}\n{s}",
        cfg.links.max(1)
    )
}

fn quoted(p: &Path) -> String {
    // TunnelConfig::resolve refused paths holding a double quote or a line break.
    format!("\"{}\"", p.display())
}

/// Writes link `link`'s file (mode 0600: it names the key) into the run directory, atomically.
pub fn write(cfg: &TunnelConfig, link: usize) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(&cfg.run_dir)?;
    if cfg.nbd_unix().is_some() {
        // The local ends of the streamlocal forwards: only the node's user may connect.
        sendense_shared::fsmode::private_dir(&cfg.local_nbd_dir())
            .map_err(std::io::Error::other)?;
    }
    let name = file_name(link);
    let path = cfg.run_dir.join(&name);
    let tmp = cfg.run_dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(render(cfg, link).as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::config::{BackoffPolicy, PortRange, TunnelTarget};
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    pub(crate) fn sample(run_dir: &Path) -> TunnelConfig {
        TunnelConfig {
            target: TunnelTarget {
                user: "sendense".into(),
                host: "127.0.0.1".into(),
                port: 2222,
            },
            identity: "/etc/sendense/id ed25519".into(),
            known_hosts: "/etc/sendense/known_hosts".into(),
            bind: "127.0.0.2".parse().unwrap(),
            nbd_ports: PortRange {
                first: 10100,
                last: 10101,
            },
            nbd_forward: super::super::config::NbdForward::Tcp,
            hub_api_port: 8082,
            reverse_port: 9081,
            node_api: "127.0.0.1:8081".parse().unwrap(),
            ssh: "ssh".into(),
            server_alive_interval: 15,
            server_alive_count_max: 3,
            ciphers: super::super::config::DEFAULT_CIPHERS.into(),
            run_dir: run_dir.to_path_buf(),
            preflight_timeout: Duration::from_secs(5),
            up_timeout: Duration::from_secs(30),
            backoff: BackoffPolicy::default(),
            links: 1,
        }
    }

    #[test]
    fn renders_one_forward_per_port_and_strict_options() {
        let text = render(&sample(Path::new("/run/x")), 0);
        for want in [
            "Host sendense-hub\n",
            "    HostName 127.0.0.1\n",
            "    Port 2222\n",
            "    User sendense\n",
            "    IdentityFile \"/etc/sendense/id ed25519\"\n",
            "    StrictHostKeyChecking yes\n",
            "    ExitOnForwardFailure yes\n",
            "    BatchMode yes\n",
            "    IdentitiesOnly yes\n",
            "    ServerAliveInterval 15\n",
            "    ServerAliveCountMax 3\n",
            "    LocalForward 127.0.0.2:10100 127.0.0.1:10100\n",
            "    LocalForward 127.0.0.2:10101 127.0.0.1:10101\n",
            "    LocalForward 127.0.0.2:8082 127.0.0.1:8082\n",
            "    RemoteForward 127.0.0.1:9081 127.0.0.1:8081\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert_eq!(text.matches("LocalForward").count(), 3);
    }

    #[test]
    fn unix_exports_are_streamlocal_forwards_with_stale_sockets_unlinked() {
        let cfg = TunnelConfig {
            nbd_forward: super::super::config::NbdForward::Unix {
                hub_dir: "/run/sendense-nbd".into(),
            },
            ..sample(Path::new("/run/x"))
        };
        let text = render(&cfg, 0);
        for want in [
            "    LocalForward /run/x/nbd/10100.sock /run/sendense-nbd/10100.sock\n",
            "    LocalForward /run/x/nbd/10101.sock /run/sendense-nbd/10101.sock\n",
            "    LocalForward 127.0.0.2:8082 127.0.0.1:8082\n",
            "    StreamLocalBindUnlink yes\n",
            "    StreamLocalBindMask 0177\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("127.0.0.2:10100"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let cfg = TunnelConfig {
            run_dir: dir.path().to_path_buf(),
            ..cfg
        };
        write(&cfg, 0).unwrap();
        let mode = std::fs::metadata(dir.path().join("nbd"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn links_split_the_slots_in_turn_and_link_0_carries_the_api() {
        let cfg = TunnelConfig {
            links: 2,
            nbd_ports: super::super::config::PortRange {
                first: 10100,
                last: 10102,
            },
            ..sample(Path::new("/run/x"))
        };
        let zero = render(&cfg, 0);
        let one = render(&cfg, 1);
        for want in [
            "    LocalForward 127.0.0.2:10100 127.0.0.1:10100\n",
            "    LocalForward 127.0.0.2:10102 127.0.0.1:10102\n",
            "    LocalForward 127.0.0.2:8082 127.0.0.1:8082\n",
            "    RemoteForward 127.0.0.1:9081 127.0.0.1:8081\n",
        ] {
            assert!(zero.contains(want), "missing {want:?} in\n{zero}");
        }
        assert_eq!(zero.matches("Forward ").count(), 4, "{zero}");
        assert!(one.contains("    LocalForward 127.0.0.2:10101 127.0.0.1:10101\n"));
        assert_eq!(one.matches("Forward ").count(), 1, "{one}");
        // Both are complete, strict configs of their own.
        assert!(
            one.contains("    ExitOnForwardFailure yes\n") && one.contains("    BatchMode yes\n")
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = TunnelConfig {
            run_dir: dir.path().to_path_buf(),
            ..cfg
        };
        assert_eq!(
            write(&cfg, 0).unwrap(),
            dir.path().join("tunnel.ssh_config")
        );
        assert_eq!(
            write(&cfg, 1).unwrap(),
            dir.path().join("tunnel.1.ssh_config")
        );
    }

    #[test]
    fn file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&sample(dir.path()), 0).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Written again over itself (every start).
        write(&sample(dir.path()), 0).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("Port 2222")
        );
    }
}
