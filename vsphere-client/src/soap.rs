//! SOAP envelopes out, SOAP responses in.
//!
//! Requests are format strings in which every value goes through [`escape`]. Responses are
//! parsed with roxmltree and matched by local element name (everything of vim25 lives in one
//! namespace) and, for `type` attributes of the schema-instance kind, by namespace URI: the
//! simulator calls that prefix `XMLSchema-instance`, vCenter calls it `xsi`.

use roxmltree::{Document, Node};

use super::{MoRef, VsphereError};

pub(crate) const SOAP_ENV_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
pub(crate) const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// XML text and attribute escaping.
pub(crate) fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A full request envelope around one method element; `body` is the method's already-escaped
/// children.
pub(crate) fn envelope(method: &str, this: &MoRef, body: &str) -> String {
    format!(
        concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<soapenv:Envelope xmlns:soapenv="{env}" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="{xsi}">"#,
            r#"<soapenv:Body><{method} xmlns="urn:vim25">{this}{body}</{method}></soapenv:Body></soapenv:Envelope>"#
        ),
        env = SOAP_ENV_NS,
        xsi = XSI_NS,
        method = method,
        this = moref_xml("_this", this),
        body = body
    )
}

/// `<tag type="Kind">value</tag>`, escaped.
pub(crate) fn moref_xml(tag: &str, moref: &MoRef) -> String {
    format!(
        r#"<{tag} type="{}">{}</{tag}>"#,
        escape(&moref.kind),
        escape(&moref.value)
    )
}

/// `<tag>value</tag>`, escaped.
pub(crate) fn elem(tag: &str, value: &str) -> String {
    format!("<{tag}>{}</{tag}>", escape(value))
}

/// The first element child called `name` (local name).
pub(crate) fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// Every element child called `name` (local name).
pub(crate) fn children<'a, 'i>(
    node: Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

/// The text of the child `name`, if that child exists (an empty element is "").
pub(crate) fn child_text(node: Node<'_, '_>, name: &str) -> Option<String> {
    child(node, name).map(|c| c.text().unwrap_or("").to_string())
}

/// The text of a node, trimmed ("" when empty).
pub(crate) fn text(node: Node<'_, '_>) -> String {
    node.text().unwrap_or("").trim().to_string()
}

/// The schema-instance type of an element without its prefix ("VirtualDisk"), found by namespace
/// URI, never by prefix.
pub(crate) fn xsi_type<'a>(node: Node<'a, '_>) -> Option<&'a str> {
    node.attribute((XSI_NS, "type"))
        .map(|t| t.rsplit_once(':').map_or(t, |(_, local)| local))
}

/// A managed object reference element: `type` attribute and text.
pub(crate) fn moref(node: Node<'_, '_>) -> Option<MoRef> {
    // roxmltree's `attribute("type")` also matches `xsi:type`, which a task result carries too.
    let kind = node
        .attributes()
        .find(|a| a.name() == "type" && a.namespace().is_none())?
        .value();
    let value = text(node);
    if value.is_empty() {
        return None;
    }
    Some(MoRef {
        kind: kind.to_string(),
        value,
    })
}

/// Parses `text` as the response of `method`: a fault becomes [`VsphereError::Fault`], otherwise
/// `f` sees the method's response element (`<MethodResponse>`).
pub(crate) fn parse_response<T>(
    method: &str,
    body: &str,
    f: impl FnOnce(Node<'_, '_>) -> Result<T, VsphereError>,
) -> Result<T, VsphereError> {
    let doc = Document::parse(body).map_err(|e| VsphereError::Protocol {
        method: method.to_string(),
        detail: format!("response is not XML ({e}): {}", snippet(body)),
    })?;
    let envelope = doc.root_element();
    let soap_body = envelope
        .children()
        .find(|c| c.is_element() && c.has_tag_name((SOAP_ENV_NS, "Body")))
        .ok_or_else(|| VsphereError::Protocol {
            method: method.to_string(),
            detail: format!("no SOAP Body in the response: {}", snippet(body)),
        })?;
    let first = soap_body
        .children()
        .find(|c| c.is_element())
        .ok_or_else(|| VsphereError::Protocol {
            method: method.to_string(),
            detail: "empty SOAP Body".to_string(),
        })?;
    if first.has_tag_name((SOAP_ENV_NS, "Fault")) {
        return Err(fault(method, first));
    }
    f(first)
}

/// A `soapenv:Fault` as [`VsphereError::Fault`]. The type comes from the first element under
/// `detail` that carries a schema-instance type, else from the detail's element name
/// (`InvalidLoginFault` → `InvalidLogin`), else from `faultcode`.
pub(crate) fn fault(method: &str, node: Node<'_, '_>) -> VsphereError {
    let message = child_text(node, "faultstring")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let fault = child(node, "detail")
        .and_then(|detail| {
            detail
                .descendants()
                .filter(|d| d.is_element() && *d != detail)
                .find_map(xsi_type)
                .map(str::to_string)
                .or_else(|| {
                    detail.children().find(|c| c.is_element()).map(|c| {
                        let name = c.tag_name().name();
                        name.strip_suffix("Fault").unwrap_or(name).to_string()
                    })
                })
        })
        .or_else(|| child_text(node, "faultcode").map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "UnknownFault".to_string());
    VsphereError::Fault {
        method: method.to_string(),
        fault,
        message,
    }
}

/// A `LocalizedMethodFault` (a task's `info.error`): fault type and message.
pub(crate) fn localized_fault(node: Node<'_, '_>) -> (String, String) {
    let inner = child(node, "fault");
    let fault = inner
        .and_then(xsi_type)
        .unwrap_or("UnknownFault")
        .to_string();
    let message = child_text(node, "localizedMessage")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            // Some faults carry their text only inside, e.g. faultMessage/message.
            inner.and_then(|f| {
                f.descendants()
                    .find(|d| d.is_element() && d.tag_name().name() == "message")
                    .map(text)
            })
        })
        .unwrap_or_default();
    (fault, message)
}

/// The start of a body for error messages (bodies can be megabytes).
pub(crate) fn snippet(body: &str) -> String {
    let mut end = body.len().min(300);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    let s = &body[..end];
    if end < body.len() {
        format!("{s}…")
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_the_five_entities() {
        assert_eq!(escape(r#"a&b<c>d"e'f"#), "a&amp;b&lt;c&gt;d&quot;e&apos;f");
    }

    #[test]
    fn envelope_escapes_this_and_parses_back() {
        let this = MoRef::new("SessionManager", "a<b");
        let env = envelope("Login", &this, &elem("userName", "root&co"));
        let doc = Document::parse(&env).expect("well-formed");
        let login = doc
            .descendants()
            .find(|n| n.has_tag_name(("urn:vim25", "Login")))
            .expect("Login element");
        assert_eq!(moref(child(login, "_this").expect("_this")), Some(this));
        assert_eq!(child_text(login, "userName").as_deref(), Some("root&co"));
    }

    // The shape govmomi's simulator sends: its own prefix for the schema-instance namespace and a
    // nested Fault element.
    const SIM_FAULT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Login failure</faultstring><detail><Fault xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="InvalidLogin"></Fault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;

    // The shape vCenter sends.
    const VC_FAULT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body>
<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>The object &apos;vim.VirtualMachine:vm-99&apos; has already been deleted or has not been completely created</faultstring><detail><ManagedObjectNotFoundFault xmlns="urn:vim25" xsi:type="ManagedObjectNotFound"><obj type="VirtualMachine">vm-99</obj></ManagedObjectNotFoundFault></detail></soapenv:Fault>
</soapenv:Body>
</soapenv:Envelope>"#;

    #[test]
    fn simulator_fault_with_other_prefix_names_its_type() {
        let err = parse_response("Login", SIM_FAULT, |_| Ok(())).expect_err("fault");
        match err {
            VsphereError::Fault {
                method,
                fault,
                message,
            } => {
                assert_eq!(method, "Login");
                assert_eq!(fault, "InvalidLogin");
                assert_eq!(message, "Login failure");
            }
            other => panic!("expected a fault, got {other:?}"),
        }
    }

    #[test]
    fn vcenter_fault_names_its_type_and_message() {
        let err = parse_response("RetrievePropertiesEx", VC_FAULT, |_| Ok(())).expect_err("fault");
        assert_eq!(err.fault(), Some("ManagedObjectNotFound"));
        assert!(err.to_string().contains("vm-99"), "{err}");
    }

    #[test]
    fn fault_without_schema_type_uses_the_element_name() {
        let body = VC_FAULT.replace(r#" xsi:type="ManagedObjectNotFound""#, "");
        let err = parse_response("X", &body, |_| Ok(())).expect_err("fault");
        assert_eq!(err.fault(), Some("ManagedObjectNotFound"));
    }

    #[test]
    fn bad_bodies_are_protocol_errors_not_panics() {
        for body in [
            "",
            "<html>502 Bad Gateway</html>",
            "<a><b></a>",
            "<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\"/>",
            "<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\"><soapenv:Body/></soapenv:Envelope>",
            "<!DOCTYPE x [<!ENTITY a \"aaaa\">]><x>&a;</x>",
        ] {
            let err = parse_response("Login", body, |_| Ok(())).expect_err(body);
            assert!(
                matches!(err, VsphereError::Protocol { ref method, .. } if method == "Login"),
                "{body}: {err:?}"
            );
        }
    }

    #[test]
    fn xsi_type_is_resolved_by_namespace_not_prefix() {
        let doc = Document::parse(
            r#"<r xmlns:q="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsi="urn:not-xsi"><a q:type="vim25:VirtualDisk"/><b xsi:type="Impostor"/></r>"#,
        )
        .expect("xml");
        let root = doc.root_element();
        assert_eq!(xsi_type(child(root, "a").expect("a")), Some("VirtualDisk"));
        assert_eq!(xsi_type(child(root, "b").expect("b")), None);
    }

    #[test]
    fn localized_fault_of_a_task() {
        let doc = Document::parse(
            r#"<error xmlns:x="http://www.w3.org/2001/XMLSchema-instance"><fault x:type="FileFault"><file>[ds] a.vmdk</file></fault><localizedMessage>Unable to access file [ds] a.vmdk</localizedMessage></error>"#,
        )
        .expect("xml");
        let (fault, message) = localized_fault(doc.root_element());
        assert_eq!(fault, "FileFault");
        assert_eq!(message, "Unable to access file [ds] a.vmdk");
    }

    #[test]
    fn snippet_cuts_on_a_char_boundary() {
        let long = "é".repeat(400);
        let s = snippet(&long);
        assert!(s.ends_with('…'));
        assert!(s.len() < 310);
    }
}
