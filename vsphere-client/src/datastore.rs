//! HTTPS access to datastore files: `/folder/<path>?dcPath=<dc>&dsName=<ds>`.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::VsphereError;
use super::inventory::bracketed_datastore;

/// Everything but RFC 3986's unreserved characters is encoded, in path segments and query values.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// "[ds] dir/name.vmdk" → "<base>/folder/dir/name-flat.vmdk?dcPath=<dc>&dsName=<ds>": the
/// descriptor names the data file `-flat.vmdk` beside it, and that file is what a reader wants.
pub(crate) fn file_url(
    base: &str,
    datacenter: &str,
    file_name: &str,
) -> Result<String, VsphereError> {
    let bad = |why: &str| VsphereError::Protocol {
        method: "datastore_file_url".to_string(),
        detail: format!("file name {file_name:?} {why}"),
    };
    let datastore = bracketed_datastore(file_name)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| bad("is not of the form \"[datastore] path\""))?;
    let (_, path) = file_name.split_once(']').ok_or_else(|| bad("has no ']'"))?;
    let path = path.trim().trim_start_matches('/');
    if path.is_empty() || path.split('/').any(|s| s.is_empty() || s == "..") {
        return Err(bad("has an empty or '..' path segment"));
    }
    let data_file = match path.strip_suffix(".vmdk") {
        Some(stem) if !stem.ends_with("-flat") => format!("{stem}-flat.vmdk"),
        _ => path.to_string(),
    };
    let encoded: Vec<String> = data_file
        .split('/')
        .map(|segment| utf8_percent_encode(segment, ENCODE).to_string())
        .collect();
    Ok(format!(
        "{}/folder/{}?dcPath={}&dsName={}",
        base.trim_end_matches('/'),
        encoded.join("/"),
        utf8_percent_encode(datacenter, ENCODE),
        utf8_percent_encode(&datastore, ENCODE)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_becomes_its_flat_file() {
        assert_eq!(
            file_url(
                "https://127.0.0.1:8989/",
                "DC0",
                "[LocalDS_0] DC0_H0_VM0/disk1.vmdk"
            )
            .expect("url"),
            "https://127.0.0.1:8989/folder/DC0_H0_VM0/disk1-flat.vmdk?dcPath=DC0&dsName=LocalDS_0"
        );
    }

    #[test]
    fn flat_file_and_other_files_are_kept() {
        assert_eq!(
            file_url("https://vc", "DC0", "[ds] a/b-flat.vmdk").expect("url"),
            "https://vc/folder/a/b-flat.vmdk?dcPath=DC0&dsName=ds"
        );
        assert_eq!(
            file_url("https://vc", "DC0", "[ds] a/b.iso").expect("url"),
            "https://vc/folder/a/b.iso?dcPath=DC0&dsName=ds"
        );
    }

    #[test]
    fn path_and_query_values_are_percent_encoded() {
        assert_eq!(
            file_url("https://vc", "Data Center/Sub&1", "[ds #1] my vm/ä+b.vmdk").expect("url"),
            "https://vc/folder/my%20vm/%C3%A4%2Bb-flat.vmdk?dcPath=Data%20Center%2FSub%261&dsName=ds%20%231"
        );
    }

    #[test]
    fn malformed_names_are_refused_with_the_name() {
        for name in [
            "vm/a.vmdk",
            "[] a.vmdk",
            "[ds]",
            "[ds] ",
            "[ds] a/../../etc/passwd",
            "[ds] a//b.vmdk",
        ] {
            let err = file_url("https://vc", "DC0", name).expect_err(name);
            assert!(
                err.to_string().contains(&format!("{name:?}")),
                "{name}: {err}"
            );
        }
    }
}
