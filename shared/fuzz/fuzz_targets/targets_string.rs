#![no_main]
//! Arbitrary strings into the NBD targets string parser: no panic, and whatever it accepts
//! formats and parses back to the same list.

use libfuzzer_sys::fuzz_target;
use sendense_shared::targets::{format_targets, parse_targets};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(list) = parse_targets(s) {
        let again = parse_targets(&format_targets(&list)).expect("formatted list parses");
        assert_eq!(list, again);
    }
});
