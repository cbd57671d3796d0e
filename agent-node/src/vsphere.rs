//! A small vSphere (vim25 SOAP) client for the dozen calls the vSphere source driver needs:
//! session, inventory of VMs and their disks, snapshots, changed block tracking, tasks.
//!
//! # Why our own client and not `vim_rs`
//! `vim_rs` 0.7 binds the whole vSphere API: a 4 MB crate of about 935,000 lines of generated
//! Rust (`src/types/structs.rs` alone is 19 MB), 22 times this whole workspace (42,700 lines),
//! plus a proc-macro crate, `phf`, `miniserde`, `indexmap` and `env_logger`. It speaks the JSON
//! API by default (the govmomi simulator we test against, and vCenter before 8.0U1, speak only
//! SOAP; SOAP is its `xml` feature on top), and its default client turns on `reqwest/default`,
//! i.e. rustls with aws-lc-rs, which needs cmake and adds about 2 minutes to a release build
//! here. We call twelve methods and read a few dozen properties.
//!
//! What this client adds, measured by `cargo build --timings -j2` of exactly its new crates in an
//! empty project (`rustls` with `ring`, `tokio-rustls`, `rustls-platform-verifier`, `roxmltree`,
//! `sha2`, `base64`, `percent-encoding`; tokio and hyper were in the workspace already): 20 s
//! wall on 2 cores, 36 s of compile time (rustls 8.3 s, ring 7.5 s with its C build, webpki
//! 2.1 s, roxmltree 1.5 s), 116 MB of `target/debug`. The client itself is about 2,600 lines with
//! its unit tests. The price is parsing the answers ourselves: tested on the XML shapes of both
//! vCenter and the simulator (which names the schema-instance prefix differently, hence
//! namespace-aware parsing), and against the simulator itself (`tests/vsphere_client.rs`).
//!
//! # Modules
//! - [`tls`]: one rustls configuration per [`TlsPolicy`]; records the leaf certificate.
//! - `https`: HTTP/1.1 over tokio-rustls with hyper, a small connection pool.
//! - `soap`: envelopes, escaping, response and fault parsing.
//! - `inventory`: device lists (disks, controllers) and snapshot trees.
//! - `datastore`: datastore file URLs.

pub mod tls;

mod datastore;
mod https;
mod inventory;
mod soap;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use roxmltree::Node;

use soap::{child, child_text, children, elem, moref_xml, text};

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsPolicy {
    /// The system's trust store (webpki roots / platform verifier).
    System,
    /// Trust only certificates signed by the CA(s) in this PEM file.
    CaFile(PathBuf),
    /// Accept exactly the server certificate whose SHA-256 (of the DER) is this.
    Pinned([u8; 32]),
    /// No verification at all (only when configured `insecure = true`).
    Insecure,
}

/// A password or other secret: never in logs, never in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"***\")")
    }
}

/// Where and as whom to log in.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// "https://vcenter.example" or "https://127.0.0.1:8989" (no path; the client uses /sdk).
    pub url: String,
    pub user: String,
    /// Read from a file by the config layer; never logged, never in Debug output.
    pub password: Secret,
    pub tls: TlsPolicy,
}

/// A managed object reference, e.g. ("VirtualMachine", "vm-42").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

impl fmt::Display for MoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// One virtual disk of a VM or snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Device key: 2000, 2001, ...
    pub key: i32,
    /// "Hard disk 1"
    pub label: String,
    pub controller_key: i32,
    /// "SCSI controller 0"
    pub controller_label: String,
    pub unit_number: i32,
    pub capacity_bytes: u64,
    /// "[LocalDS_0] vm1/vm1.vmdk"
    pub file_name: String,
    /// Datastore name, e.g. "LocalDS_0".
    pub datastore: String,
    pub thin: Option<bool>,
    /// backing.changeId when CBT is on.
    pub change_id: Option<String>,
    /// backing.diskMode: "persistent", "independent_persistent", "independent_nonpersistent", ...
    pub mode: Option<String>,
    /// Set for a raw device mapping (`VirtualDiskRawDiskMappingVer1BackingInfo`): its
    /// compatibilityMode ("physicalMode", "virtualMode"; "" when not given).
    pub raw_mapping: Option<String>,
}

impl DiskInfo {
    /// Why a VM snapshot does not freeze this disk (so a backup of it would not be
    /// consistent), or `None` when it does.
    pub fn not_frozen_by_snapshots(&self) -> Option<String> {
        if let Some(compat) = &self.raw_mapping {
            return Some(match compat.as_str() {
                "physicalMode" => "a raw device mapping in physical compatibility mode: VM snapshots leave it out, the guest writes straight to the LUN".to_string(),
                c => format!(
                    "a raw device mapping ({}): its data lives on a LUN, not in a datastore file a snapshot freezes for this node to read",
                    if c.is_empty() { "compatibility mode not given" } else { c }
                ),
            });
        }
        match self.mode.as_deref() {
            Some(m @ ("independent_persistent" | "independent_nonpersistent")) => Some(format!(
                "in disk mode {m}: VM snapshots leave independent disks out, the guest keeps writing to it"
            )),
            _ => None,
        }
    }
}

/// One snapshot of a VM's snapshot tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub moref: MoRef,
    pub name: String,
    pub description: String,
}

/// A VM with what a backup needs to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub moref: MoRef,
    pub name: String,
    /// config.instanceUuid, else config.uuid.
    pub uuid: String,
    /// Datacenter name (for dcPath=).
    pub datacenter: String,
    /// "poweredOn", ...
    pub power_state: String,
    /// config.changeTrackingEnabled
    pub cbt_enabled: bool,
    /// Sorted by key.
    pub disks: Vec<DiskInfo>,
    /// The whole tree, flattened, parents before children.
    pub snapshots: Vec<SnapshotInfo>,
}

/// The answer of one QueryChangedDiskAreas call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedAreas {
    pub start_offset: u64,
    /// The call covered [start_offset, start_offset+length).
    pub length: u64,
    /// (offset, length), sorted.
    pub areas: Vec<(u64, u64)>,
}

/// Everything that can go wrong talking to vSphere.
#[derive(Debug, thiserror::Error)]
pub enum VsphereError {
    #[error("cannot reach vSphere at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("TLS certificate of {url} refused: {detail}")]
    Certificate { url: String, detail: String },
    #[error(
        "vSphere at {url} refused the login of user {user:?} (InvalidLogin: wrong user name or password)"
    )]
    Login { url: String, user: String },
    #[error("vSphere call {method} failed: {fault}: {message}")]
    Fault {
        method: String,
        fault: String,
        message: String,
    },
    #[error("{what} failed: {fault}: {message}")]
    Task {
        what: String,
        fault: String,
        message: String,
    },
    #[error("{what}: task {task} still running after {waited_secs} s")]
    TaskTimeout {
        what: String,
        task: String,
        waited_secs: u64,
    },
    #[error("vSphere call {method}: unexpected response: {detail}")]
    Protocol { method: String, detail: String },
}

impl VsphereError {
    /// The SOAP/task fault type, if any ("ManagedObjectNotFound", "FileFault", ...).
    pub fn fault(&self) -> Option<&str> {
        match self {
            Self::Fault { fault, .. } | Self::Task { fault, .. } => Some(fault),
            _ => None,
        }
    }
}

/// The API version when the server does not announce one (the simulator speaks 6.5).
const DEFAULT_API_VERSION: &str = "6.5";
const SESSION_COOKIE: &str = "vmware_soap_session";
/// Snapshot removal with consolidation of a big disk can take long on real storage.
const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
const VM_PROPERTIES: &[&str] = &[
    "name",
    "config.instanceUuid",
    "config.uuid",
    "config.changeTrackingEnabled",
    "config.hardware.device",
    "runtime.powerState",
    "snapshot",
];

/// One logged-in session. Cheap to clone (Arc inside). Safe to use from many tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    task_timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.transport.url)
            .field("user", &self.inner.endpoint.user)
            .finish_non_exhaustive()
    }
}

struct Inner {
    endpoint: Endpoint,
    transport: Transport,
    content: ServiceContent,
    /// Set by [`Client::logout`]: no more automatic logins after that.
    logged_out: AtomicBool,
    /// One re-login at a time when an idle session has expired.
    relogin: tokio::sync::Mutex<()>,
}

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

#[derive(Debug, Clone)]
struct ServiceContent {
    root_folder: MoRef,
    property_collector: MoRef,
    view_manager: MoRef,
    session_manager: MoRef,
}

/// HTTP side of a session: the connection pool, the SOAPAction, the session cookie and what TLS
/// saw.
struct Transport {
    url: String,
    http: https::Https,
    soap_action: String,
    /// `vmware_soap_session=<value as the server sent it>`.
    cookie: Mutex<Option<String>>,
    observed: Arc<tls::Observed>,
    /// The TLS policy as errors name it.
    policy: String,
}

impl Transport {
    fn new(endpoint: &Endpoint) -> Result<Self, VsphereError> {
        // "https://vc/sdk" is a common way to write the same endpoint.
        let trimmed = endpoint.url.trim().trim_end_matches('/');
        let url = trimmed.strip_suffix("/sdk").unwrap_or(trimmed).to_string();
        let unreachable = |detail: String| VsphereError::Unreachable {
            url: url.clone(),
            detail,
        };
        let parsed =
            reqwest::Url::parse(&url).map_err(|e| unreachable(format!("not a URL: {e}")))?;
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
    async fn announced_version(&self) -> Result<Option<String>, VsphereError> {
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
    async fn call(&self, method: &str, envelope: String) -> Result<String, VsphereError> {
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
        if reply.status != 200 && !reply.body.contains("Envelope") {
            return Err(VsphereError::Protocol {
                method: method.to_string(),
                detail: format!("HTTP {}: {}", reply.status, soap::snippet(&reply.body)),
            });
        }
        Ok(reply.body)
    }

    fn cookie(&self) -> Option<String> {
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
                let hint = if chain(e).contains("BadSignature") {
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
    let mut current = Some(e);
    while let Some(err) = current {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && is_tls_error(inner)
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// An error and its sources on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut current = e.source();
    while let Some(err) = current {
        let s = err.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        current = err.source();
    }
    out
}

/// The property values of one object of a RetrievePropertiesEx answer.
struct Props<'a, 'i> {
    values: Vec<(String, Node<'a, 'i>)>,
}

impl<'a, 'i> Props<'a, 'i> {
    fn get(&self, path: &str) -> Option<Node<'a, 'i>> {
        self.values
            .iter()
            .find(|(name, _)| name == path)
            .map(|(_, v)| *v)
    }

    fn text(&self, path: &str) -> Option<String> {
        self.get(path).map(text)
    }
}

/// One page of a RetrievePropertiesEx / ContinueRetrievePropertiesEx answer: what `per_object`
/// made of each object, and the token of the next page.
fn retrieve_page<T>(
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
fn view_spec(view: &MoRef, kind: &str, properties: &[&str]) -> String {
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
fn objects_spec(kind: &str, objects: &[&MoRef], properties: &[&str]) -> String {
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

/// A VM's properties before its datastores are resolved.
struct RawVm {
    moref: MoRef,
    name: String,
    uuid: String,
    power_state: String,
    cbt_enabled: bool,
    disks: Vec<inventory::RawDisk>,
    snapshots: Vec<SnapshotInfo>,
}

fn raw_vm(method: &str, moref: MoRef, props: &Props<'_, '_>) -> Result<RawVm, VsphereError> {
    let disks = match props.get("config.hardware.device") {
        Some(devices) => inventory::disks(method, devices)?,
        None => Vec::new(),
    };
    Ok(RawVm {
        name: props.text("name").unwrap_or_default(),
        uuid: props
            .text("config.instanceUuid")
            .filter(|u| !u.is_empty())
            .or_else(|| props.text("config.uuid"))
            .unwrap_or_default(),
        power_state: props.text("runtime.powerState").unwrap_or_default(),
        cbt_enabled: props
            .text("config.changeTrackingEnabled")
            .and_then(|b| inventory::parse_bool(&b))
            .unwrap_or(false),
        snapshots: props
            .get("snapshot")
            .map(inventory::snapshots)
            .unwrap_or_default(),
        disks,
        moref,
    })
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
        login(&transport, endpoint, &content.session_manager).await?;
        tracing::debug!(url = %transport.url, user = %endpoint.user, action = %transport.soap_action, "vSphere session open");
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint: endpoint.clone(),
                transport,
                content,
                logged_out: AtomicBool::new(false),
                relogin: tokio::sync::Mutex::new(()),
            }),
            task_timeout: DEFAULT_TASK_TIMEOUT,
        })
    }

    pub async fn logout(&self) -> Result<(), VsphereError> {
        self.inner.logged_out.store(true, Ordering::SeqCst);
        let method = "Logout";
        self.invoke(method, &self.inner.content.session_manager, "", |_| Ok(()))
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
        self.exchange(method, envelope, |response| {
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
        self.inner.transport.cookie().unwrap_or_default()
    }

    /// The server's leaf certificate as PEM, as seen during the handshake (for nbdkit's cainfo
    /// when the policy is Pinned). None when not captured.
    pub fn server_certificate_pem(&self) -> Option<String> {
        self.inner
            .transport
            .observed
            .leaf_der()
            .map(|der| tls::der_to_pem(&der))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// Every VM of every datacenter.
    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, VsphereError> {
        let mut vms = Vec::new();
        for (datacenter, name) in self.datacenters().await? {
            let view = self.create_view(&datacenter, "VirtualMachine").await?;
            let listed = self
                .retrieve(
                    &view_spec(&view, "VirtualMachine", VM_PROPERTIES),
                    |obj, props| raw_vm("RetrievePropertiesEx", obj, props),
                )
                .await;
            // The view is session state on the server: destroy it whatever the listing did.
            let destroyed = self.destroy_view(&view).await;
            let listed = listed?;
            destroyed?;
            vms.extend(self.finish_vms(listed, &name).await?);
        }
        Ok(vms)
    }

    /// One VM by name; Ok(None) when there is none. Only the names of the inventory are
    /// retrieved, then the properties of the one VM (a backup asks several times; listing every
    /// VM's devices and datastores each time was the cost of the whole inventory).
    pub async fn find_vm(&self, name: &str) -> Result<Option<VmInfo>, VsphereError> {
        for (datacenter, datacenter_name) in self.datacenters().await? {
            let view = self.create_view(&datacenter, "VirtualMachine").await?;
            let named = self
                .retrieve(
                    &view_spec(&view, "VirtualMachine", &["name"]),
                    |obj, props| Ok((obj, props.text("name").unwrap_or_default())),
                )
                .await;
            // The view is session state on the server: destroy it whatever the listing did.
            let destroyed = self.destroy_view(&view).await;
            let named = named?;
            destroyed?;
            if let Some((vm, _)) = named.into_iter().find(|(_, n)| n == name) {
                return match self.vm_in(&vm, Some(&datacenter_name)).await {
                    // Deleted between the two calls.
                    Err(e) if e.fault() == Some("ManagedObjectNotFound") => Ok(None),
                    found => found.map(Some),
                };
            }
        }
        Ok(None)
    }

    /// One VM by reference (ManagedObjectNotFound fault when it is gone).
    pub async fn vm(&self, vm: &MoRef) -> Result<VmInfo, VsphereError> {
        self.vm_in(vm, None).await
    }

    /// One VM by reference, in the datacenter named `datacenter` (looked up when not known).
    async fn vm_in(&self, vm: &MoRef, datacenter: Option<&str>) -> Result<VmInfo, VsphereError> {
        let raw = self
            .retrieve(
                &objects_spec("VirtualMachine", &[vm], VM_PROPERTIES),
                |obj, props| raw_vm("RetrievePropertiesEx", obj, props),
            )
            .await?;
        let datacenter = match datacenter {
            Some(name) => name.to_string(),
            None => self.datacenter_of(vm).await?,
        };
        self.finish_vms(raw, &datacenter)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| VsphereError::Fault {
                method: "RetrievePropertiesEx".to_string(),
                fault: "ManagedObjectNotFound".to_string(),
                message: format!("{vm} is not in the inventory"),
            })
    }

    /// CreateSnapshot_Task (memory=false) and wait for it; returns the snapshot.
    pub async fn create_snapshot(
        &self,
        vm: &MoRef,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<MoRef, VsphereError> {
        let method = "CreateSnapshot_Task";
        let body = format!(
            "{}{}<memory>false</memory><quiesce>{quiesce}</quiesce>",
            elem("name", name),
            elem("description", description)
        );
        let task = self.start_task(method, vm, &body).await?;
        let what = format!("{method} {name:?} of {vm}");
        self.wait_task(&task, &what)
            .await?
            .ok_or_else(|| VsphereError::Protocol {
                method: method.to_string(),
                detail: format!("task {} succeeded without a snapshot reference", task.value),
            })
    }

    /// RemoveSnapshot_Task (removeChildren=false, consolidate=true) and wait for it.
    pub async fn remove_snapshot(&self, snapshot: &MoRef) -> Result<(), VsphereError> {
        let method = "RemoveSnapshot_Task";
        let body = "<removeChildren>false</removeChildren><consolidate>true</consolidate>";
        let task = self.start_task(method, snapshot, body).await?;
        self.wait_task(&task, &format!("{method} of {snapshot}"))
            .await
            .map(|_| ())
    }

    /// The disks as the snapshot froze them (snapshot's config.hardware.device).
    pub async fn snapshot_disks(&self, snapshot: &MoRef) -> Result<Vec<DiskInfo>, VsphereError> {
        let method = "RetrievePropertiesEx";
        let raw = self
            .retrieve(
                &objects_spec(
                    "VirtualMachineSnapshot",
                    &[snapshot],
                    &["config.hardware.device"],
                ),
                |_, props| match props.get("config.hardware.device") {
                    Some(devices) => inventory::disks(method, devices),
                    None => Ok(Vec::new()),
                },
            )
            .await?
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
        let names = self
            .datastore_names(raw.iter().filter_map(|d| d.datastore_ref.clone()).collect())
            .await?;
        Ok(inventory::resolve_datastores(raw, &names))
    }

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
        self.invoke(method, vm, &body, |response| {
            changed_areas(method, response)
        })
        .await
    }

    /// ReconfigVM_Task with changeTrackingEnabled=true, and wait.
    pub async fn enable_change_tracking(&self, vm: &MoRef) -> Result<(), VsphereError> {
        let method = "ReconfigVM_Task";
        let body = "<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>";
        let task = self.start_task(method, vm, body).await?;
        self.wait_task(&task, &format!("{method} (enable change tracking) of {vm}"))
            .await
            .map(|_| ())
    }

    /// The HTTPS URL of a disk's data file on the datastore:
    /// "[ds] dir/name.vmdk" -> "<url>/folder/dir/name-flat.vmdk?dcPath=<dc>&dsName=<ds>"
    /// (URL-encoded). A file name already ending in "-flat.vmdk" is kept.
    pub fn datastore_file_url(
        &self,
        datacenter: &str,
        file_name: &str,
    ) -> Result<String, VsphereError> {
        datastore::file_url(&self.inner.transport.url, datacenter, file_name)
    }

    /// Sends one envelope and parses the answer with `parse`. When the session has expired
    /// (vCenter ends idle sessions after 30 minutes; a node waits longer than that between
    /// backups), logs in again once and resends.
    async fn exchange<T>(
        &self,
        method: &str,
        envelope: String,
        mut parse: impl FnMut(&str) -> Result<T, VsphereError>,
    ) -> Result<T, VsphereError> {
        let transport = &self.inner.transport;
        let used = transport.cookie();
        let response = transport.call(method, envelope.clone()).await?;
        match parse(&response) {
            Err(e)
                if e.fault() == Some("NotAuthenticated")
                    && !self.inner.logged_out.load(Ordering::SeqCst) => {}
            parsed => return parsed,
        }
        {
            let _one = self.inner.relogin.lock().await;
            // Another task may have logged in again meanwhile.
            if transport.cookie() == used {
                tracing::info!(url = %transport.url, user = %self.inner.endpoint.user, "vSphere session expired; logging in again");
                login(
                    transport,
                    &self.inner.endpoint,
                    &self.inner.content.session_manager,
                )
                .await?;
            }
        }
        parse(&transport.call(method, envelope).await?)
    }

    /// One SOAP call on `this`; `f` reads the response element.
    async fn invoke<T>(
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

    /// RetrievePropertiesEx with `spec_set`, following ContinueRetrievePropertiesEx tokens.
    async fn retrieve<T>(
        &self,
        spec_set: &str,
        mut per_object: impl FnMut(MoRef, &Props<'_, '_>) -> Result<T, VsphereError>,
    ) -> Result<Vec<T>, VsphereError> {
        let collector = &self.inner.content.property_collector;
        let method = "RetrievePropertiesEx";
        let body = format!("{spec_set}<options><maxObjects>500</maxObjects></options>");
        let (mut out, mut token) = self
            .exchange(method, soap::envelope(method, collector, &body), |r| {
                retrieve_page(method, r, &mut per_object)
            })
            .await?;
        while let Some(t) = token {
            let method = "ContinueRetrievePropertiesEx";
            let envelope = soap::envelope(method, collector, &elem("token", &t));
            let (more, next) = self
                .exchange(method, envelope, |r| {
                    retrieve_page(method, r, &mut per_object)
                })
                .await?;
            out.extend(more);
            token = next;
        }
        Ok(out)
    }

    /// Every datacenter, with its name.
    async fn datacenters(&self) -> Result<Vec<(MoRef, String)>, VsphereError> {
        let root = self.inner.content.root_folder.clone();
        let view = self.create_view(&root, "Datacenter").await?;
        let listed = self
            .retrieve(&view_spec(&view, "Datacenter", &["name"]), |obj, props| {
                Ok((obj, props.text("name").unwrap_or_default()))
            })
            .await;
        let destroyed = self.destroy_view(&view).await;
        let listed = listed?;
        destroyed?;
        Ok(listed)
    }

    async fn create_view(&self, container: &MoRef, kind: &str) -> Result<MoRef, VsphereError> {
        let method = "CreateContainerView";
        let body = format!(
            "{}{}<recursive>true</recursive>",
            moref_xml("container", container),
            elem("type", kind)
        );
        self.invoke(
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

    async fn destroy_view(&self, view: &MoRef) -> Result<(), VsphereError> {
        self.invoke("DestroyView", view, "", |_| Ok(())).await
    }

    /// The name of the datacenter `entity` lives in, by walking up `parent` (VMs in a vApp have
    /// `parentVApp` instead).
    async fn datacenter_of(&self, entity: &MoRef) -> Result<String, VsphereError> {
        let mut current = entity.clone();
        // Inventory trees are shallow; the bound only guards against a server answering in a loop.
        for _ in 0..64 {
            let parents = self
                .retrieve(
                    &objects_spec(&current.kind, &[&current], &["name", "parent"]),
                    |_, props| {
                        let parent = props.get("parent").and_then(soap::moref);
                        Ok((props.text("name").unwrap_or_default(), parent))
                    },
                )
                .await?;
            let (name, parent) = parents.into_iter().next().unwrap_or_default();
            if current.kind == "Datacenter" {
                return Ok(name);
            }
            current = match parent {
                Some(parent) => parent,
                None if current.kind == "VirtualMachine" => {
                    let vapp = self
                        .retrieve(
                            &objects_spec("VirtualMachine", &[&current], &["parentVApp"]),
                            |_, props| Ok(props.get("parentVApp").and_then(soap::moref)),
                        )
                        .await?;
                    vapp.into_iter()
                        .flatten()
                        .next()
                        .ok_or_else(|| no_datacenter(entity))?
                }
                None => return Err(no_datacenter(entity)),
            };
        }
        Err(no_datacenter(entity))
    }

    /// Names of the given datastores.
    /// (A Vec, not an iterator of references: a borrowing closure held across the await would
    /// make the future not Send.)
    async fn datastore_names(
        &self,
        mut datastores: Vec<MoRef>,
    ) -> Result<HashMap<MoRef, String>, VsphereError> {
        datastores.sort_by(|a, b| a.value.cmp(&b.value));
        datastores.dedup();
        let unique: Vec<&MoRef> = datastores.iter().collect();
        if unique.is_empty() {
            return Ok(HashMap::new());
        }
        let names = self
            .retrieve(
                &objects_spec("Datastore", &unique, &["name"]),
                |obj, props| Ok((obj, props.text("name").unwrap_or_default())),
            )
            .await?;
        Ok(names.into_iter().filter(|(_, n)| !n.is_empty()).collect())
    }

    async fn finish_vms(
        &self,
        raw: Vec<RawVm>,
        datacenter: &str,
    ) -> Result<Vec<VmInfo>, VsphereError> {
        let names = self
            .datastore_names(
                raw.iter()
                    .flat_map(|vm| vm.disks.iter().filter_map(|d| d.datastore_ref.clone()))
                    .collect(),
            )
            .await?;
        Ok(raw
            .into_iter()
            .map(|vm| VmInfo {
                disks: inventory::resolve_datastores(vm.disks, &names),
                moref: vm.moref,
                name: vm.name,
                uuid: vm.uuid,
                datacenter: datacenter.to_string(),
                power_state: vm.power_state,
                cbt_enabled: vm.cbt_enabled,
                snapshots: vm.snapshots,
            })
            .collect())
    }

    async fn start_task(
        &self,
        method: &str,
        this: &MoRef,
        body: &str,
    ) -> Result<MoRef, VsphereError> {
        self.invoke(method, this, body, |response| {
            child(response, "returnval")
                .and_then(soap::moref)
                .ok_or_else(|| VsphereError::Protocol {
                    method: method.to_string(),
                    detail: "no task reference in the response".to_string(),
                })
        })
        .await
    }

    /// Polls the task's `info` with a growing pause until it ends; returns its result when that
    /// is a reference (CreateSnapshot_Task's snapshot).
    async fn wait_task(&self, task: &MoRef, what: &str) -> Result<Option<MoRef>, VsphereError> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let states = self
                .retrieve(&objects_spec("Task", &[task], &["info"]), |_, props| {
                    Ok(props
                        .get("info")
                        .map(task_state)
                        .unwrap_or(TaskState::Running))
                })
                .await?;
            match states.into_iter().next().unwrap_or(TaskState::Running) {
                TaskState::Success(result) => return Ok(result),
                TaskState::Error { fault, message } => {
                    return Err(VsphereError::Task {
                        what: what.to_string(),
                        fault,
                        message,
                    });
                }
                TaskState::Running => {}
            }
            if started.elapsed() >= self.task_timeout {
                return Err(VsphereError::TaskTimeout {
                    what: what.to_string(),
                    task: task.value.clone(),
                    waited_secs: started.elapsed().as_secs(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

fn no_datacenter(entity: &MoRef) -> VsphereError {
    VsphereError::Protocol {
        method: "RetrievePropertiesEx".to_string(),
        detail: format!("no datacenter above {entity}"),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum TaskState {
    Running,
    Success(Option<MoRef>),
    Error { fault: String, message: String },
}

/// A `TaskInfo` value.
fn task_state(info: Node<'_, '_>) -> TaskState {
    match child_text(info, "state").as_deref().map(str::trim) {
        Some("success") => TaskState::Success(child(info, "result").and_then(soap::moref)),
        Some("error") => {
            let (fault, message) = child(info, "error")
                .map(soap::localized_fault)
                .unwrap_or_else(|| ("UnknownFault".to_string(), String::new()));
            TaskState::Error { fault, message }
        }
        _ => TaskState::Running,
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

    #[test]
    fn secret_never_shows_in_debug() {
        let endpoint = Endpoint {
            url: "https://127.0.0.1:1".into(),
            user: "root".into(),
            password: Secret::new("hunter2".into()),
            tls: TlsPolicy::Insecure,
        };
        let debug = format!("{endpoint:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("root"), "{debug}");
        assert_eq!(endpoint.password.expose(), "hunter2");
    }

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

    fn task_info(xml: &str) -> TaskState {
        let doc = roxmltree::Document::parse(xml).expect("xml");
        task_state(doc.root_element())
    }

    #[test]
    fn task_states() {
        let ns = r#"xmlns="urn:vim25" xmlns:x="http://www.w3.org/2001/XMLSchema-instance""#;
        assert_eq!(
            task_info(&format!(
                "<info {ns}><key>task-1</key><state>running</state><progress>40</progress></info>"
            )),
            TaskState::Running
        );
        assert_eq!(
            task_info(&format!(
                r#"<info {ns}><state>success</state><result x:type="ManagedObjectReference" type="VirtualMachineSnapshot">snapshot-9</result></info>"#
            )),
            TaskState::Success(Some(MoRef::new("VirtualMachineSnapshot", "snapshot-9")))
        );
        assert_eq!(
            task_info(&format!("<info {ns}><state>success</state></info>")),
            TaskState::Success(None)
        );
        assert_eq!(
            task_info(&format!(r#"<info {ns}><state>error</state><error><fault x:type="InvalidPowerState"><requestedState>poweredOn</requestedState></fault><localizedMessage>The attempted operation cannot be performed in the current state (Powered off).</localizedMessage></error></info>"#)),
            TaskState::Error {
                fault: "InvalidPowerState".into(),
                message: "The attempted operation cannot be performed in the current state (Powered off).".into()
            }
        );
    }

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

    #[test]
    fn tls_errors_are_found_below_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(is_tls_error(&io));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!is_tls_error(&plain));
    }

    #[test]
    fn fault_type_is_exposed() {
        let e = VsphereError::Task {
            what: "x".into(),
            fault: "FileFault".into(),
            message: "m".into(),
        };
        assert_eq!(e.fault(), Some("FileFault"));
        let e = VsphereError::Unreachable {
            url: "u".into(),
            detail: "d".into(),
        };
        assert_eq!(e.fault(), None);
    }
}
