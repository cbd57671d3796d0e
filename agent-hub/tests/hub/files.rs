//! What the hub creates is its own: the data directory 0700, the SQLite catalog 0600, the
//! token 0600 (checked on the real binary's fresh data directory, whatever the umask).

use super::env::Env;
use std::os::unix::fs::PermissionsExt;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_directory_database_and_token_are_private() {
    let env = Env::start();
    let data = &env.hub.opts.data_dir;
    assert_eq!(mode(data), 0o700, "{}", data.display());
    assert_eq!(mode(&data.join("hub.db")), 0o600);
    assert_eq!(mode(&data.join("token")), 0o600);
    // The hub works on them.
    let h = env.api.get_ok("/health").await;
    assert_eq!(h["database"]["ok"], true, "{h}");
}
