//! Names that become path components in the repository (`repo/<vm>/<disk_key>/<backup>.qcow2`)
//! or NBD export names. One rule for all of them, so no caller can forget a case.

use thiserror::Error;

/// Why a name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is longer than {max} bytes")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} must not be \".\" or \"..\"")]
    DotName { field: &'static str },
    #[error("{field} contains {what}, which is not allowed in a name that becomes a file name")]
    BadChar { field: &'static str, what: String },
}

/// Longest accepted name; keeps `<vm>-disk-<key>` well inside NBD's 4096-byte export limit and
/// every file system's 255-byte component limit.
pub const MAX_NAME_LEN: usize = 128;

/// Accepts names made of ASCII letters, digits, `-`, `_`, `.` (not only dots), refuses
/// everything that could escape a directory or confuse a shell or URI: `/`, `\`, NUL, spaces,
/// control characters, `..`.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), NameError> {
    validate_name_up_to(field, name, MAX_NAME_LEN)
}

/// Longest NBD export name the hub gives: `<vm>-disk-<key>` for a VM name of
/// [`MAX_NAME_LEN`] bytes and any disk key (NBD itself allows 4096).
pub const MAX_EXPORT_NAME_LEN: usize = MAX_NAME_LEN + "-disk-".len() + 20;

/// [`validate_name`] with another length limit (export names, made of a name and a suffix).
pub fn validate_name_up_to(field: &'static str, name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { field });
    }
    if name.len() > max {
        return Err(NameError::TooLong { field, max });
    }
    if name == "." || name == ".." {
        return Err(NameError::DotName { field });
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        let what = match c {
            '/' => "'/'".to_string(),
            '\0' => "a NUL byte".to_string(),
            c if c.is_control() => format!("control character U+{:04X}", c as u32),
            c => format!("{c:?}"),
        };
        return Err(NameError::BadChar { field, what });
    }
    if name.contains("..") {
        return Err(NameError::DotName { field });
    }
    Ok(())
}

/// The contract's name of a QEMU VM or machine type, `^[A-Za-z0-9][A-Za-z0-9._-]{0,max-1}$`
/// (it names the VM and its overlay files on a node); the refusal says why, without the field.
pub fn check_simple_name(name: &str, max: usize) -> Result<(), String> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("must not be empty".into()),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err("must start with a letter or a digit".into());
        }
        _ => {}
    }
    if name.len() > max {
        return Err(format!("longer than {max} characters"));
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!(
            "{c:?} is not allowed (letters, digits, '.', '_', '-')"
        ));
    }
    Ok(())
}

/// A path another machine (a node) is to act on: absolute, without `..`, NUL or newline. Only
/// its spelling is checked (the file system it names is not this one's); the refusal says why.
pub fn check_plain_absolute(p: &str) -> Result<&std::path::Path, &'static str> {
    let path = std::path::Path::new(p);
    if !path.is_absolute() {
        return Err("must be absolute");
    }
    if p.contains(['\0', '\n']) {
        return Err("contains NUL or a newline");
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err("must not contain ..");
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_names_and_plain_absolute_paths() {
        for n in ["web01", "q35", "pc-q35-7.2", "a_b.c"] {
            assert_eq!(check_simple_name(n, 63), Ok(()), "{n}");
        }
        for (n, why) in [
            ("", "empty"),
            ("-x", "start"),
            ("a b", "' '"),
            ("é", "start"),
            (&"v".repeat(64), "longer"),
        ] {
            let e = check_simple_name(n, 63).unwrap_err();
            assert!(e.contains(why), "{n:?}: {e}");
        }
        assert!(check_plain_absolute("/var/lib/vm/a.qcow2").is_ok());
        for (p, why) in [
            ("rel/a", "absolute"),
            ("/a/../b", ".."),
            ("/a\nb", "NUL or a newline"),
            ("/a\0b", "NUL or a newline"),
        ] {
            let e = check_plain_absolute(p).unwrap_err();
            assert!(e.contains(why), "{p:?}: {e}");
        }
    }

    #[test]
    fn an_export_name_of_the_longest_vm_name_and_any_disk_key_fits() {
        let vm = "v".repeat(MAX_NAME_LEN);
        let export = format!("{vm}-disk-{}", i64::MIN);
        assert_eq!(
            validate_name_up_to("export_name", &export, MAX_EXPORT_NAME_LEN),
            Ok(())
        );
        assert!(validate_name("export_name", &export).is_err());
    }

    #[test]
    fn accepts_ordinary_names() {
        for n in ["pgtest1", "web-01", "db_2.prod", "a"] {
            assert_eq!(validate_name("vm_name", n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_escaping_names() {
        for n in [
            "", ".", "..", "../etc", "a/b", "a\0b", "a b", "x..y", "a\\b", "é",
        ] {
            assert!(validate_name("vm_name", n).is_err(), "{n:?} accepted");
        }
        let e = validate_name("vm_name", "a/b").unwrap_err();
        assert!(e.to_string().contains("vm_name"), "{e}");
        assert!(e.to_string().contains("'/'"), "{e}");
    }
}
