//! Command lines quoted for a POSIX shell, so a logged one can be pasted.

/// Quotes arguments for a POSIX shell where needed, so a logged command line can be pasted.
pub fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=+/.,:@%^".contains(&b));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_quotes_only_what_needs_it() {
        let args = ["qemu-nbd", "--export-name=a b", "it's", "", "/x/y.qcow2"].map(String::from);
        assert_eq!(
            shell_words(&args),
            r"qemu-nbd '--export-name=a b' 'it'\''s' '' /x/y.qcow2"
        );
    }
}
