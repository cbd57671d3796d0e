//! Changed block tracking: one `QueryChangedDiskAreas` call and its `DiskChangeInfo` answer.

use roxmltree::Node;

use crate::soap::{child, child_text, children, elem, moref_xml};
use crate::{Client, MoRef, VsphereError};

/// The answer of one QueryChangedDiskAreas call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedAreas {
    pub start_offset: u64,
    /// The call covered [start_offset, start_offset+length).
    pub length: u64,
    /// (offset, length), sorted.
    pub areas: Vec<(u64, u64)>,
}

impl Client {
    /// QueryChangedDiskAreas (one call; the caller loops while start+length < capacity).
    pub async fn query_changed_disk_areas(
        &self,
        vm: &MoRef,
        snapshot: &MoRef,
        device_key: i32,
        start_offset: u64,
        change_id: &str,
    ) -> Result<ChangedAreas, VsphereError> {
        let method = "QueryChangedDiskAreas";
        let body = format!(
            "{}<deviceKey>{device_key}</deviceKey><startOffset>{start_offset}</startOffset>{}",
            moref_xml("snapshot", snapshot),
            elem("changeId", change_id)
        );
        self.session()
            .invoke(method, vm, &body, |response| {
                changed_areas(method, response)
            })
            .await
    }
}

/// A `DiskChangeInfo` answer.
fn changed_areas(method: &str, response: Node<'_, '_>) -> Result<ChangedAreas, VsphereError> {
    let bad = |detail: String| VsphereError::Protocol {
        method: method.to_string(),
        detail,
    };
    let info = child(response, "returnval").ok_or_else(|| bad("no returnval".to_string()))?;
    let number = |node: Node<'_, '_>, name: &str| -> Result<u64, VsphereError> {
        let value = child_text(node, name).ok_or_else(|| bad(format!("no {name}")))?;
        value
            .trim()
            .parse()
            .map_err(|_| bad(format!("{name} {value:?} is not a number")))
    };
    let mut areas = children(info, "changedArea")
        .map(|a| Ok((number(a, "start")?, number(a, "length")?)))
        .collect::<Result<Vec<_>, VsphereError>>()?;
    areas.sort_unstable();
    Ok(ChangedAreas {
        start_offset: number(info, "startOffset")?,
        length: number(info, "length")?,
        areas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soap;

    #[test]
    fn changed_areas_sorted_and_checked() {
        let body = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>0</startOffset><length>10737418240</length><changedArea><start>1048576</start><length>65536</length></changedArea><changedArea><start>0</start><length>4096</length></changedArea></returnval></QueryChangedDiskAreasResponse></soapenv:Body></soapenv:Envelope>"#;
        let areas = soap::parse_response("QueryChangedDiskAreas", body, |r| {
            changed_areas("QueryChangedDiskAreas", r)
        })
        .expect("areas");
        assert_eq!(
            areas,
            ChangedAreas {
                start_offset: 0,
                length: 10 << 30,
                areas: vec![(0, 4096), (1048576, 65536)],
            }
        );
        let broken = body.replace("<length>65536</length>", "<length>-1</length>");
        let err = soap::parse_response("QueryChangedDiskAreas", &broken, |r| {
            changed_areas("QueryChangedDiskAreas", r)
        })
        .expect_err("negative length");
        assert!(err.to_string().contains("length \"-1\""), "{err}");
    }
}
