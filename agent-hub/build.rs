//! `sqlx::migrate!` embeds the files of `migrations/{sqlite,mysql}` but does not watch the
//! folders: without this, a NEW migration file would not rebuild the hub, which would then
//! run an old schema.

fn main() {
    println!("cargo:rerun-if-changed=../migrations/sqlite");
    println!("cargo:rerun-if-changed=../migrations/mysql");
}
