//! [`Client`]: one logged-in session (service content, login, logout, keepalive, what nbdkit
//! needs of the session). The calls themselves are in [`crate::vms`], [`crate::tasks`],
//! [`crate::cbt`] and [`crate::collector`].

use std::fmt;
use std::sync::Arc;

use crate::collector::{objects_spec, retrieve_page};
use crate::soap::{self, child};
use crate::transport::{Session, Transport};
use crate::{Endpoint, MoRef, VsphereError, datastore, tls};

/// One logged-in session. Cheap to clone (Arc inside). Safe to use from many tasks.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.session.transport.url)
            .field("user", &self.inner.session.endpoint.user)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) session: Session,
    pub(crate) content: ServiceContent,
}

/// The managed objects every call starts from.
#[derive(Debug, Clone)]
pub(crate) struct ServiceContent {
    pub(crate) root_folder: MoRef,
    pub(crate) property_collector: MoRef,
    pub(crate) view_manager: MoRef,
    pub(crate) session_manager: MoRef,
}

impl Client {
    /// RetrieveServiceContent + Login.
    pub async fn connect(endpoint: &Endpoint) -> Result<Client, VsphereError> {
        let mut transport = Transport::new(endpoint)?;
        if let Some(version) = transport.announced_version().await? {
            transport.soap_action = format!("urn:vim25/{version}");
        }
        let service_instance = MoRef::new("ServiceInstance", "ServiceInstance");
        let method = "RetrieveServiceContent";
        let body = transport
            .call(method, soap::envelope(method, &service_instance, ""))
            .await?;
        let content = soap::parse_response(method, &body, |response| {
            let result = child(response, "returnval").ok_or_else(|| VsphereError::Protocol {
                method: method.to_string(),
                detail: "no returnval".to_string(),
            })?;
            let get = |name: &str| {
                child(result, name)
                    .and_then(soap::moref)
                    .ok_or_else(|| VsphereError::Protocol {
                        method: method.to_string(),
                        detail: format!("service content without {name}"),
                    })
            };
            Ok(ServiceContent {
                root_folder: get("rootFolder")?,
                property_collector: get("propertyCollector")?,
                view_manager: get("viewManager")?,
                session_manager: get("sessionManager")?,
            })
        })?;
        let session = Session::login(endpoint, transport, content.session_manager.clone()).await?;
        let transport = &session.transport;
        tracing::debug!(url = %transport.url, user = %endpoint.user, action = %transport.soap_action, "vSphere session open");
        Ok(Client {
            inner: Arc::new(Inner { session, content }),
        })
    }

    pub async fn logout(&self) -> Result<(), VsphereError> {
        // No automatic login after this, whatever Logout answers.
        self.session().end();
        let method = "Logout";
        self.session()
            .invoke(method, &self.inner.content.session_manager, "", |_| Ok(()))
            .await
    }

    /// Touches the session so that the server's idle timeout starts again, and checks it is
    /// still logged in: reads `SessionManager.currentSession` (vCenter answers without it, or
    /// with a `NotAuthenticated` fault, when the session is gone), logging in again when not.
    /// Afterwards [`Client::session_cookie`] is the live session's.
    pub async fn keep_alive(&self) -> Result<(), VsphereError> {
        let method = "RetrievePropertiesEx";
        let manager = &self.inner.content.session_manager;
        let body = format!(
            "{}<options><maxObjects>1</maxObjects></options>",
            objects_spec("SessionManager", &[manager], &["currentSession"])
        );
        let envelope = soap::envelope(method, &self.inner.content.property_collector, &body);
        self.session()
            .exchange(method, envelope, |response| {
                let (sessions, _) = retrieve_page(method, response, &mut |_, props| {
                    Ok(props.get("currentSession").is_some())
                })?;
                if sessions.contains(&true) {
                    Ok(())
                } else {
                    Err(VsphereError::Fault {
                        method: method.to_string(),
                        fault: "NotAuthenticated".to_string(),
                        message: "the session has no currentSession (logged out or expired)"
                            .to_string(),
                    })
                }
            })
            .await
    }

    /// The Cookie header value of the session, e.g. `vmware_soap_session="52a0..."` (for nbdkit).
    pub fn session_cookie(&self) -> String {
        self.session().transport.cookie().unwrap_or_default()
    }

    /// The server's leaf certificate as PEM, as seen during the handshake (for nbdkit's cainfo
    /// when the policy is Pinned). None when not captured.
    pub fn server_certificate_pem(&self) -> Option<String> {
        self.session()
            .transport
            .observed
            .leaf_der()
            .map(|der| tls::der_to_pem(&der))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.session().endpoint
    }

    /// The HTTPS URL of a disk's data file on the datastore:
    /// `"[ds] dir/name.vmdk"` -> `"<url>/folder/dir/name-flat.vmdk?dcPath=<dc>&dsName=<ds>"`
    /// (URL-encoded). A file name already ending in "-flat.vmdk" is kept.
    pub fn datastore_file_url(
        &self,
        datacenter: &str,
        file_name: &str,
    ) -> Result<String, VsphereError> {
        datastore::file_url(&self.session().transport.url, datacenter, file_name)
    }

    pub(crate) fn session(&self) -> &Session {
        &self.inner.session
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver runs these calls in spawned tasks: every future must be Send (checked when
    /// this compiles; never called).
    #[allow(dead_code)]
    fn futures_are_send(client: &Client, endpoint: &Endpoint, m: &MoRef) {
        fn send<T: Send>(_: T) {}
        fn shared<T: Send + Sync + Clone>(_: &T) {}
        shared(client);
        send(Client::connect(endpoint));
        send(client.logout());
        send(client.list_vms());
        send(client.find_vm("x"));
        send(client.vm(m));
        send(client.create_snapshot(m, "n", "d", false));
        send(client.remove_snapshot(m));
        send(client.snapshot_disks(m));
        send(client.query_changed_disk_areas(m, m, 2000, 0, "*"));
        send(client.enable_change_tracking(m));
        send(client.keep_alive());
    }
}
