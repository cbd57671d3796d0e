//! The HTTP side of a session: the endpoint URL checked, the API version the server announces,
//! one POST per SOAP call with the `vmware_soap_session` cookie, transport errors told apart
//! (a refused certificate names the policy and the SHA-256 seen), Login, and [`Session`], which
//! logs in again once when the server ended the session and repeats the call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use roxmltree::Node;
use sendense_shared::errors::chain;

use crate::soap::{self, child_text, elem};
use crate::{Endpoint, MoRef, TlsPolicy, VsphereError, https, tls};

/// The API version when the server does not announce one (the simulator speaks 6.5).
const DEFAULT_API_VERSION: &str = "6.5";
const SESSION_COOKIE: &str = "vmware_soap_session";

/// Login on an open transport; the session cookie lands in the transport.
async fn login(
    transport: &Transport,
    endpoint: &Endpoint,
    session_manager: &MoRef,
) -> Result<(), VsphereError> {
    let method = "Login";
    let login = format!(
        "{}{}",
        elem("userName", &endpoint.user),
        elem("password", endpoint.password.expose())
    );
    let body = transport
        .call(method, soap::envelope(method, session_manager, &login))
        .await?;
    soap::parse_response(method, &body, |_| Ok(())).map_err(|e| match e.fault() {
        Some("InvalidLogin") => VsphereError::Login {
            url: transport.url.clone(),
            user: endpoint.user.clone(),
        },
        _ => e,
    })?;
    if transport.cookie().is_none() {
        return Err(VsphereError::Protocol {
            method: method.to_string(),
            detail: format!("no {SESSION_COOKIE} cookie in the response"),
        });
    }
    Ok(())
}

/// HTTP side of a session: the connection pool, the SOAPAction, the session cookie and what TLS
/// saw.
pub(crate) struct Transport {
    pub(crate) url: String,
    http: https::Https,
    pub(crate) soap_action: String,
    /// `vmware_soap_session=<value as the server sent it>`.
    cookie: Mutex<Option<String>>,
    pub(crate) observed: Arc<tls::Observed>,
    /// The TLS policy as errors name it.
    policy: String,
}

impl Transport {
    pub(crate) fn new(endpoint: &Endpoint) -> Result<Self, VsphereError> {
        // "https://vc/sdk" is a common way to write the same endpoint.
        let trimmed = endpoint.url.trim().trim_end_matches('/');
        let url = trimmed.strip_suffix("/sdk").unwrap_or(trimmed).to_string();
        let unreachable = |detail: String| VsphereError::Unreachable {
            url: url.clone(),
            detail,
        };
        let parsed = url::Url::parse(&url).map_err(|e| unreachable(format!("not a URL: {e}")))?;
        let host = parsed
            .host_str()
            .filter(|_| parsed.scheme() == "https" && parsed.path().trim_matches('/').is_empty())
            .ok_or_else(|| unreachable("expected https://host[:port] without a path".into()))?;
        let (config, observed) =
            tls::client_config(&endpoint.tls).map_err(|detail| VsphereError::Certificate {
                url: url.clone(),
                detail,
            })?;
        if endpoint.tls == TlsPolicy::Insecure {
            tracing::warn!(url = %url, "vSphere TLS certificate is not verified (insecure = true)");
        }
        let http = https::Https::new(host, parsed.port().unwrap_or(443), config)
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Self {
            url: url.clone(),
            http,
            soap_action: format!("urn:vim25/{DEFAULT_API_VERSION}"),
            cookie: Mutex::new(None),
            observed,
            policy: tls::describe(&endpoint.tls),
        })
    }

    /// The API version the server announces in /sdk/vimServiceVersions.xml, if it does.
    pub(crate) async fn announced_version(&self) -> Result<Option<String>, VsphereError> {
        let reply = self
            .http
            .request(
                hyper::Method::GET,
                "/sdk/vimServiceVersions.xml",
                &[],
                String::new(),
            )
            .await
            .map_err(|e| self.transport_error(&*e))?;
        if reply.status != 200 {
            return Ok(None);
        }
        let Ok(doc) = roxmltree::Document::parse(&reply.body) else {
            return Ok(None);
        };
        Ok(doc
            .descendants()
            .filter(|n| n.is_element() && n.tag_name().name() == "namespace")
            .find(|n| child_text(*n, "name").as_deref().map(str::trim) == Some("urn:vim25"))
            .and_then(|n| child_text(n, "version"))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')))
    }

    /// POSTs one envelope; returns the body (faults come with status 500 and are parsed later).
    pub(crate) async fn call(
        &self,
        method: &str,
        envelope: String,
    ) -> Result<String, VsphereError> {
        let cookie = self.cookie();
        let mut headers = vec![
            ("Content-Type", "text/xml; charset=utf-8"),
            ("SOAPAction", self.soap_action.as_str()),
        ];
        if let Some(cookie) = &cookie {
            headers.push(("Cookie", cookie.as_str()));
        }
        let reply = self
            .http
            .request(hyper::Method::POST, "/sdk", &headers, envelope)
            .await
            .map_err(|e| self.transport_error(&*e))?;
        if let Some(cookie) = reply.set_cookies.iter().find_map(|c| session_cookie(c)) {
            *self.cookie.lock().unwrap_or_else(PoisonError::into_inner) = Some(cookie);
        }
        if reply.status != 200 && !is_soap_envelope(&reply.body) {
            return Err(VsphereError::Protocol {
                method: method.to_string(),
                detail: format!("HTTP {}: {}", reply.status, soap::snippet(&reply.body)),
            });
        }
        Ok(reply.body)
    }

    pub(crate) fn cookie(&self) -> Option<String> {
        self.cookie
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A refused certificate becomes `Certificate` (policy and SHA-256 seen), anything else on
    /// the way `Unreachable`.
    fn transport_error(&self, e: &(dyn std::error::Error + 'static)) -> VsphereError {
        if is_tls_error(e) {
            let detail = self.observed.take_refusal().unwrap_or_else(|| {
                // Refused after the certificate check: the handshake signature, e.g. by a key
                // that ring does not accept.
                let seen = self.observed.leaf_der().map_or_else(
                    || "no certificate".to_string(),
                    |der| format!("the server certificate sha256 {}", tls::sha256_hex(&der)),
                );
                let hint = if is_bad_signature(e) {
                    " (RSA keys under 2048 bits are refused)"
                } else {
                    ""
                };
                format!(
                    "{}: handshake with {seen} failed: {}{hint}",
                    self.policy,
                    chain(e)
                )
            });
            VsphereError::Certificate {
                url: self.url.clone(),
                detail,
            }
        } else {
            VsphereError::Unreachable {
                url: self.url.clone(),
                detail: chain(e),
            }
        }
    }
}

/// `vmware_soap_session=...` from a Set-Cookie header, the value kept as sent (vCenter quotes it).
fn session_cookie(set_cookie: &str) -> Option<String> {
    let pair = set_cookie.split(';').next()?.trim();
    let (name, value) = pair.split_once('=')?;
    (name.trim() == SESSION_COOKIE && !value.trim().is_empty())
        .then(|| format!("{SESSION_COOKIE}={}", value.trim()))
}

/// rustls errors hide below io::Error, whose `source()` skips the wrapped error itself.
fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    tls_error(e).is_some()
}

/// The rustls error somewhere in `e`'s chain (also inside an `io::Error`, where tokio-rustls
/// puts it).
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(t) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| tls_error(inner))
        {
            return Some(t);
        }
        current = err.source();
    }
    None
}

/// A handshake refused for its signature (a key ring does not accept, e.g. RSA under 2048
/// bits), as a value of rustls' error, not a word of its message.
fn is_bad_signature(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        tls_error(e),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadSignature
        ))
    )
}

/// A SOAP answer: XML whose root element is an `Envelope` (a fault comes with HTTP 500, and is
/// read by the caller); anything else with an error status is the server's or a proxy's page.
fn is_soap_envelope(body: &str) -> bool {
    roxmltree::Document::parse(body).is_ok_and(|d| d.root_element().tag_name().name() == "Envelope")
}

/// A logged-in session on a transport: sends envelopes, and when the server answers
/// `NotAuthenticated` (it ended the session) logs in again once and resends.
pub(crate) struct Session {
    pub(crate) endpoint: Endpoint,
    pub(crate) transport: Transport,
    session_manager: MoRef,
    /// Set by [`Session::end`]: no more automatic logins after that.
    logged_out: AtomicBool,
    /// One re-login at a time when an idle session has expired.
    relogin: tokio::sync::Mutex<()>,
}

impl Session {
    /// Logs in on `transport`.
    pub(crate) async fn login(
        endpoint: &Endpoint,
        transport: Transport,
        session_manager: MoRef,
    ) -> Result<Session, VsphereError> {
        login(&transport, endpoint, &session_manager).await?;
        Ok(Session {
            endpoint: endpoint.clone(),
            transport,
            session_manager,
            logged_out: AtomicBool::new(false),
            relogin: tokio::sync::Mutex::new(()),
        })
    }

    /// Marks the session as ended by us: a `NotAuthenticated` answer after this is final.
    pub(crate) fn end(&self) {
        self.logged_out.store(true, Ordering::SeqCst);
    }

    /// Sends one envelope and parses the answer with `parse`. When the session has expired
    /// (vCenter ends idle sessions after 30 minutes; a node waits longer than that between
    /// backups), logs in again once and resends.
    pub(crate) async fn exchange<T>(
        &self,
        method: &str,
        envelope: String,
        mut parse: impl FnMut(&str) -> Result<T, VsphereError>,
    ) -> Result<T, VsphereError> {
        let transport = &self.transport;
        let used = transport.cookie();
        let response = transport.call(method, envelope.clone()).await?;
        match parse(&response) {
            Err(e)
                if e.fault() == Some("NotAuthenticated")
                    && !self.logged_out.load(Ordering::SeqCst) => {}
            parsed => return parsed,
        }
        {
            let _one = self.relogin.lock().await;
            // Another task may have logged in again meanwhile.
            if transport.cookie() == used {
                tracing::info!(url = %transport.url, user = %self.endpoint.user, "vSphere session expired; logging in again");
                login(transport, &self.endpoint, &self.session_manager).await?;
            }
        }
        parse(&transport.call(method, envelope).await?)
    }

    /// One SOAP call on `this`; `f` reads the response element.
    pub(crate) async fn invoke<T>(
        &self,
        method: &str,
        this: &MoRef,
        body: &str,
        mut f: impl FnMut(Node<'_, '_>) -> Result<T, VsphereError>,
    ) -> Result<T, VsphereError> {
        self.exchange(method, soap::envelope(method, this, body), |response| {
            soap::parse_response(method, response, &mut f)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;

    #[test]
    fn endpoint_urls_are_checked_before_connecting() {
        let with = |url: &str| Endpoint {
            url: url.to_string(),
            user: "root".into(),
            password: Secret::new("pw".into()),
            tls: TlsPolicy::Insecure,
        };
        for good in [
            "https://vc.example",
            "https://vc.example/",
            "https://127.0.0.1:8989/sdk",
        ] {
            let t = Transport::new(&with(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert!(
                !t.url.ends_with('/') && !t.url.ends_with("/sdk"),
                "{}",
                t.url
            );
        }
        for bad in [
            "vc.example",
            "http://vc.example",
            "https://vc.example/ui",
            "https://",
        ] {
            match Transport::new(&with(bad)) {
                Err(VsphereError::Unreachable { url, detail }) => {
                    assert!(
                        bad.starts_with(url.as_str()) || url == bad,
                        "{url} vs {bad}"
                    );
                    assert!(!detail.is_empty());
                }
                Err(other) => panic!("{bad}: {other:?}"),
                Ok(_) => panic!("{bad} accepted"),
            }
        }
    }

    #[test]
    fn session_cookie_is_taken_as_sent() {
        assert_eq!(
            session_cookie(r#"vmware_soap_session="52a0c1f3"; Path=/; HttpOnly; Secure;"#)
                .as_deref(),
            Some(r#"vmware_soap_session="52a0c1f3""#)
        );
        assert_eq!(
            session_cookie("vmware_soap_session=abc; HttpOnly").as_deref(),
            Some("vmware_soap_session=abc")
        );
        assert_eq!(session_cookie("other=1; Path=/"), None);
        assert_eq!(session_cookie("vmware_soap_session=; Path=/"), None);
    }

    #[test]
    fn tls_errors_are_found_below_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(is_tls_error(&io));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!is_tls_error(&plain));
    }
}
