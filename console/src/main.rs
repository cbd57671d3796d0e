fn main() {
    println!(
        "{}",
        sendense_shared::identity::long_version("sendense-console")
    );
}
