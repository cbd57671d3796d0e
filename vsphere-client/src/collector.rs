//! The property collector: `RetrievePropertiesEx` specs (through a container view, or of given
//! objects), the answer's pages followed by `ContinueRetrievePropertiesEx` tokens, each object's
//! property values as [`Props`], and the container views the listings go through.

use roxmltree::Node;

use crate::soap::{self, child, child_text, children, elem, moref_xml, text};
use crate::{Client, MoRef, VsphereError};

/// The property values of one object of a RetrievePropertiesEx answer.
pub(crate) struct Props<'a, 'i> {
    values: Vec<(String, Node<'a, 'i>)>,
}

impl<'a, 'i> Props<'a, 'i> {
    pub(crate) fn get(&self, path: &str) -> Option<Node<'a, 'i>> {
        self.values
            .iter()
            .find(|(name, _)| name == path)
            .map(|(_, v)| *v)
    }

    pub(crate) fn text(&self, path: &str) -> Option<String> {
        self.get(path).map(text)
    }
}

/// One page of a RetrievePropertiesEx / ContinueRetrievePropertiesEx answer: what `per_object`
/// made of each object, and the token of the next page.
pub(crate) fn retrieve_page<T>(
    method: &str,
    body: &str,
    per_object: &mut impl FnMut(MoRef, &Props<'_, '_>) -> Result<T, VsphereError>,
) -> Result<(Vec<T>, Option<String>), VsphereError> {
    soap::parse_response(method, body, |response| {
        let Some(result) = child(response, "returnval") else {
            return Ok((Vec::new(), None));
        };
        let token = child_text(result, "token")
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let mut out = Vec::new();
        for object in children(result, "objects") {
            let obj = child(object, "obj").and_then(soap::moref).ok_or_else(|| {
                VsphereError::Protocol {
                    method: method.to_string(),
                    detail: "an object without obj reference".to_string(),
                }
            })?;
            // Without a session (or a privilege) the collector answers with a missingSet per
            // property instead of a fault; an absent property would read as "no disks".
            for missing in children(object, "missingSet") {
                let fault = child(missing, "fault")
                    .map(soap::localized_fault)
                    .map(|(fault, _)| fault)
                    .unwrap_or_default();
                if matches!(fault.as_str(), "NotAuthenticated" | "NoPermission") {
                    return Err(VsphereError::Fault {
                        method: method.to_string(),
                        message: format!(
                            "property {} of {obj} not readable",
                            child_text(missing, "path").unwrap_or_default()
                        ),
                        fault,
                    });
                }
            }
            let values = children(object, "propSet")
                .filter_map(|p| Some((child_text(p, "name")?.trim().to_string(), child(p, "val")?)))
                .collect();
            out.push(per_object(obj, &Props { values })?);
        }
        Ok((out, token))
    })
}

/// `<specSet>` selecting `properties` of objects of `kind` through a container view.
pub(crate) fn view_spec(view: &MoRef, kind: &str, properties: &[&str]) -> String {
    format!(
        concat!(
            "<specSet><propSet><type>{kind}</type>{paths}</propSet>",
            "<objectSet>{obj}<skip>true</skip>",
            r#"<selectSet xsi:type="TraversalSpec"><name>view</name><type>ContainerView</type><path>view</path><skip>false</skip></selectSet>"#,
            "</objectSet></specSet>"
        ),
        kind = soap::escape(kind),
        paths = paths(properties),
        obj = moref_xml("obj", view),
    )
}

/// `<specSet>` selecting `properties` of the given objects (all of the same kind).
pub(crate) fn objects_spec(kind: &str, objects: &[&MoRef], properties: &[&str]) -> String {
    let objects: String = objects
        .iter()
        .map(|o| {
            format!(
                "<objectSet>{}<skip>false</skip></objectSet>",
                moref_xml("obj", o)
            )
        })
        .collect();
    format!(
        "<specSet><propSet><type>{}</type>{}</propSet>{objects}</specSet>",
        soap::escape(kind),
        paths(properties)
    )
}

fn paths(properties: &[&str]) -> String {
    properties.iter().map(|p| elem("pathSet", p)).collect()
}

impl Client {
    /// RetrievePropertiesEx with `spec_set`, following ContinueRetrievePropertiesEx tokens.
    pub(crate) async fn retrieve<T>(
        &self,
        spec_set: &str,
        mut per_object: impl FnMut(MoRef, &Props<'_, '_>) -> Result<T, VsphereError>,
    ) -> Result<Vec<T>, VsphereError> {
        let collector = &self.inner.content.property_collector;
        let method = "RetrievePropertiesEx";
        let body = format!("{spec_set}<options><maxObjects>500</maxObjects></options>");
        let (mut out, mut token) = self
            .session()
            .exchange(method, soap::envelope(method, collector, &body), |r| {
                retrieve_page(method, r, &mut per_object)
            })
            .await?;
        while let Some(t) = token {
            let method = "ContinueRetrievePropertiesEx";
            let envelope = soap::envelope(method, collector, &elem("token", &t));
            let (more, next) = self
                .session()
                .exchange(method, envelope, |r| {
                    retrieve_page(method, r, &mut per_object)
                })
                .await?;
            out.extend(more);
            token = next;
        }
        Ok(out)
    }

    pub(crate) async fn create_view(
        &self,
        container: &MoRef,
        kind: &str,
    ) -> Result<MoRef, VsphereError> {
        let method = "CreateContainerView";
        let body = format!(
            "{}{}<recursive>true</recursive>",
            moref_xml("container", container),
            elem("type", kind)
        );
        self.session()
            .invoke(
                method,
                &self.inner.content.view_manager,
                &body,
                |response| {
                    child(response, "returnval")
                        .and_then(soap::moref)
                        .ok_or_else(|| VsphereError::Protocol {
                            method: method.to_string(),
                            detail: "no view reference in the response".to_string(),
                        })
                },
            )
            .await
    }

    pub(crate) async fn destroy_view(&self, view: &MoRef) -> Result<(), VsphereError> {
        self.session()
            .invoke("DestroyView", view, "", |_| Ok(()))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vms::raw_vm;

    /// A page of VMs as the simulator sends it (its schema-instance prefix, a token for more).
    const PAGE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><token>tok-1</token>
<objects><obj type="VirtualMachine">vm-54</obj>
<propSet><name>config.changeTrackingEnabled</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:boolean">true</val></propSet>
<propSet><name>config.instanceUuid</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">b4689bed-97f0-5bcd-8a4c-07477cc8f06f</val></propSet>
<propSet><name>config.uuid</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">265104de-1472-547c-b873-6dc7883fb6cb</val></propSet>
<propSet><name>name</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">DC0_H0_VM0</val></propSet>
<propSet><name>runtime.powerState</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="VirtualMachinePowerState">poweredOn</val></propSet>
</objects>
<objects><obj type="VirtualMachine">vm-57</obj>
<propSet><name>config.uuid</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">u-57</val></propSet>
<propSet><name>name</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">DC0_H0_VM1</val></propSet>
<missingSet><path>snapshot</path><fault><fault xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="InvalidProperty"></fault></fault></missingSet>
</objects></returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"#;

    #[test]
    fn a_page_of_vms_with_token() {
        let (vms, token) = retrieve_page("RetrievePropertiesEx", PAGE, &mut |obj, props| {
            raw_vm("RetrievePropertiesEx", obj, props)
        })
        .expect("page");
        assert_eq!(token.as_deref(), Some("tok-1"));
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].moref, MoRef::new("VirtualMachine", "vm-54"));
        assert_eq!(vms[0].name, "DC0_H0_VM0");
        assert_eq!(vms[0].uuid, "b4689bed-97f0-5bcd-8a4c-07477cc8f06f");
        assert_eq!(vms[0].power_state, "poweredOn");
        assert!(vms[0].cbt_enabled);
        assert_eq!(vms[1].uuid, "u-57", "config.uuid without instanceUuid");
        assert!(!vms[1].cbt_enabled);
        assert!(vms[1].snapshots.is_empty() && vms[1].disks.is_empty());
    }

    #[test]
    fn a_page_without_session_is_not_authenticated() {
        let body = PAGE.replace(r#"type="InvalidProperty""#, r#"type="NotAuthenticated""#);
        let err = retrieve_page("RetrievePropertiesEx", &body, &mut |obj, _| Ok(obj))
            .expect_err("missingSet with NotAuthenticated");
        assert_eq!(err.fault(), Some("NotAuthenticated"));
        assert!(
            err.to_string().contains("snapshot of VirtualMachine:vm-57"),
            "{err}"
        );
    }

    #[test]
    fn truncated_or_mangled_answers_never_panic() {
        let cuts = (0..PAGE.len())
            .filter(|&i| PAGE.is_char_boundary(i))
            .step_by(7);
        for cut in cuts {
            let body = &PAGE[..cut];
            let _ = retrieve_page("RetrievePropertiesEx", body, &mut |obj, props| {
                raw_vm("RetrievePropertiesEx", obj, props)
            });
            let mangled = PAGE.replacen('<', "", cut % 11 + 1);
            let _ = retrieve_page("RetrievePropertiesEx", &mangled, &mut |obj, props| {
                raw_vm("RetrievePropertiesEx", obj, props)
            });
        }
    }

    #[test]
    fn an_empty_answer_has_no_objects() {
        let body = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><RetrievePropertiesExResponse xmlns="urn:vim25"></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"#;
        let (objects, token) =
            retrieve_page("RetrievePropertiesEx", body, &mut |obj, _| Ok(obj)).expect("page");
        assert!(objects.is_empty() && token.is_none());
    }
}
