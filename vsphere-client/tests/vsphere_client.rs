//! The vSphere client against govmomi's simulator (`sendense_tests::vcsim`): TLS policies,
//! login errors, inventory, snapshots, changed block tracking, datastore file URLs; and its TLS
//! policies against a local server with certificates made for the test.

#[path = "vsphere_client/tls.rs"]
mod tls;

use sendense_tests::vcsim::{Vcsim, VcsimOptions};
use sendense_vsphere::{Client, Endpoint, MoRef, Secret, TlsPolicy, VsphereError};

async fn simulator() -> Vcsim {
    tokio::task::spawn_blocking(|| Vcsim::start(VcsimOptions::default()))
        .await
        .expect("join")
        .expect("simulator starts")
}

/// Drops the simulator off the runtime: its `Drop` waits for the launcher to exit.
async fn stop(sim: Vcsim) {
    tokio::task::spawn_blocking(move || drop(sim))
        .await
        .expect("join");
}

fn endpoint(sim: &Vcsim, tls: TlsPolicy) -> Endpoint {
    Endpoint {
        url: sim.url.clone(),
        user: sim.user.clone(),
        password: Secret::new(sim.password.clone()),
        tls,
    }
}

fn pin_of(hex: &str) -> [u8; 32] {
    let mut pin = [0u8; 32];
    for (i, b) in pin.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    pin
}

async fn connect(sim: &Vcsim) -> Client {
    Client::connect(&endpoint(sim, TlsPolicy::CaFile(sim.cert_pem.clone())))
        .await
        .expect("connects with the CA file")
}

fn vm_ref(sim: &Vcsim) -> MoRef {
    MoRef::new("VirtualMachine", sim.vm.moref.clone())
}

/// A simulator, a client connected to it over its CA file, and its VM.
async fn session() -> (Vcsim, Client, MoRef) {
    let sim = simulator().await;
    let client = connect(&sim).await;
    let vm = vm_ref(&sim);
    (sim, client, vm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_over_a_ca_file_shows_the_two_disk_vm() {
    let sim = simulator().await;
    let client = connect(&sim).await;

    let vms = client.list_vms().await.expect("list_vms");
    let vm = vms
        .iter()
        .find(|v| v.name == sim.vm.name)
        .unwrap_or_else(|| panic!("{} not in {vms:?}", sim.vm.name));
    assert_eq!(vm.moref, vm_ref(&sim));
    assert_eq!(vm.uuid, sim.vm.uuid);
    assert_eq!(vm.datacenter, sim.datacenter);
    assert!(!vm.cbt_enabled);
    assert!(vm.snapshots.is_empty());
    let keys: Vec<i32> = vm.disks.iter().map(|d| d.key).collect();
    assert_eq!(keys, vec![2000, 2001]);
    assert_ne!(vm.disks[0].unit_number, vm.disks[1].unit_number);
    assert_eq!(vm.disks[0].controller_key, vm.disks[1].controller_key);
    for (disk, want) in vm.disks.iter().zip(&sim.vm.disks) {
        assert_eq!(disk.key, want.key);
        assert_eq!(disk.label, want.label);
        assert_eq!(disk.unit_number, want.unit_number);
        assert_eq!(disk.capacity_bytes, want.capacity_bytes);
        assert_eq!(disk.file_name, want.file_name);
        assert_eq!(disk.datastore, sim.datastore);
        assert!(
            disk.controller_label.starts_with("SCSI controller"),
            "{disk:?}"
        );
        assert!(disk.change_id.is_none(), "CBT is off: {disk:?}");
    }
    assert_eq!(vms.iter().filter(|v| v.name == sim.vm.name).count(), 1);

    // The same VM by reference and by name; an unknown name is None.
    assert_eq!(&client.vm(&vm.moref).await.expect("vm"), vm);
    assert_eq!(
        client.find_vm(&sim.vm.name).await.expect("find").as_ref(),
        Some(vm)
    );
    assert_eq!(client.find_vm("no-such-vm").await.expect("find"), None);

    // The certificate seen is the simulator's.
    let pem = client.server_certificate_pem().expect("leaf captured");
    let der = pem_der(&pem);
    assert_eq!(sendense_vsphere::tls::sha256_hex(&der), sim.cert_sha256);

    // The data file URL reads the disk with the session cookie.
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    sim.write_disk(2001, 1 << 20, &data).expect("write disk");
    let url = client
        .datastore_file_url(&vm.datacenter, &vm.disks[1].file_name)
        .expect("url");
    assert_eq!(url, sim.datastore_file_url(&vm.disks[1].file_name));
    let cookie = client.session_cookie();
    let value = cookie
        .strip_prefix("vmware_soap_session=")
        .unwrap_or_else(|| panic!("cookie {cookie:?}"))
        .trim_matches('"')
        .to_string();
    let (status, body) = sim
        .range_get(&url, Some(&value), 1 << 20, data.len() as u64)
        .expect("range get");
    assert_eq!(status, 206);
    assert_eq!(body, data);

    // After logout the session is gone for good.
    client.logout().await.expect("logout");
    let err = client.list_vms().await.expect_err("logged out");
    assert_eq!(err.fault(), Some("NotAuthenticated"), "{err}");
    stop(sim).await;
}

fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_certificate_connects_and_a_wrong_pin_names_the_certificate_seen() {
    let sim = simulator().await;
    let pinned = Client::connect(&endpoint(&sim, TlsPolicy::Pinned(pin_of(&sim.cert_sha256))))
        .await
        .expect("the right pin connects");
    assert!(!pinned.list_vms().await.expect("list").is_empty());
    let pem = pinned.server_certificate_pem().expect("leaf captured");
    assert_eq!(
        sendense_vsphere::tls::sha256_hex(&pem_der(&pem)),
        sim.cert_sha256
    );

    let wrong = [0x5a; 32];
    let err = Client::connect(&endpoint(&sim, TlsPolicy::Pinned(wrong)))
        .await
        .expect_err("a wrong pin is refused");
    assert!(matches!(err, VsphereError::Certificate { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&sim.cert_sha256),
        "names the sha256 seen: {msg}"
    );
    assert!(msg.contains(&"5a".repeat(32)), "names the pin: {msg}");
    assert!(msg.contains(&sim.url), "names the URL: {msg}");

    // A self-signed certificate is not in the system's trust store.
    let err = Client::connect(&endpoint(&sim, TlsPolicy::System))
        .await
        .expect_err("not trusted by the system");
    assert!(matches!(err, VsphereError::Certificate { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&sim.cert_sha256) && msg.contains("system"),
        "{msg}"
    );

    // Insecure accepts it.
    let insecure = Client::connect(&endpoint(&sim, TlsPolicy::Insecure))
        .await
        .expect("insecure connects");
    insecure.logout().await.expect("logout");
    stop(sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_login_error_naming_the_user() {
    let sim = simulator().await;
    let mut ep = endpoint(&sim, TlsPolicy::CaFile(sim.cert_pem.clone()));
    ep.password = Secret::new("not-the-password-42".into());
    let err = Client::connect(&ep).await.expect_err("wrong password");
    match &err {
        VsphereError::Login { url, user } => {
            assert_eq!(url, &sim.url);
            assert_eq!(user, &sim.user);
        }
        other => panic!("expected Login, got {other:?}"),
    }
    let shown = format!("{err} {err:?}");
    assert!(shown.contains(&sim.user), "{shown}");
    assert!(!shown.contains("not-the-password-42"), "{shown}");
    stop(sim).await;
}

#[tokio::test]
async fn unreachable_port_names_the_url() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("https://127.0.0.1:{port}");
    let err = Client::connect(&Endpoint {
        url: url.clone(),
        user: "root".into(),
        password: Secret::new("pw".into()),
        tls: TlsPolicy::Insecure,
    })
    .await
    .expect_err("nothing listens");
    match &err {
        VsphereError::Unreachable { url: u, .. } => assert_eq!(u, &url),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_appear_in_the_tree_freeze_the_disks_and_go_away() {
    let (sim, client, vm) = session().await;

    let first = client
        .create_snapshot(&vm, "sendense-1", "backup 1 <&> \"quoted\"", false)
        .await
        .expect("create");
    assert_eq!(first.kind, "VirtualMachineSnapshot");
    let second = client
        .create_snapshot(&vm, "sendense-2", "", false)
        .await
        .expect("create a child");

    let info = client.vm(&vm).await.expect("vm");
    let tree: Vec<(MoRef, String, String)> = info
        .snapshots
        .iter()
        .map(|s| (s.moref.clone(), s.name.clone(), s.description.clone()))
        .collect();
    assert_eq!(
        tree,
        vec![
            (
                first.clone(),
                "sendense-1".into(),
                "backup 1 <&> \"quoted\"".into()
            ),
            (second.clone(), "sendense-2".into(), String::new()),
        ]
    );
    let state = sim.state().expect("state").expect("vm exists");
    let sim_tree: Vec<(String, String)> = state
        .all_snapshots()
        .iter()
        .map(|s| (s.moref.clone(), s.name.clone()))
        .collect();
    assert_eq!(
        sim_tree,
        vec![
            (first.value.clone(), "sendense-1".into()),
            (second.value.clone(), "sendense-2".into()),
        ]
    );
    assert_eq!(
        state.all_snapshots()[1].moref,
        state.snapshots.as_ref().expect("tree")[0].children[0].moref
    );

    // The snapshot's disks are the frozen files; the VM writes to new ones.
    let frozen = client.snapshot_disks(&first).await.expect("snapshot disks");
    let sim_first = &state.all_snapshots()[0];
    assert_eq!(
        frozen.iter().map(|d| d.key).collect::<Vec<_>>(),
        vec![2000, 2001]
    );
    for disk in &frozen {
        let want = sim_first
            .disks
            .iter()
            .find(|d| d.key == disk.key)
            .expect("key");
        assert_eq!(disk.file_name, want.file_name);
        assert_eq!(disk.capacity_bytes, want.capacity_bytes);
        assert_eq!(disk.datastore, sim.datastore);
        let running = info.disks.iter().find(|d| d.key == disk.key).expect("key");
        assert_ne!(
            running.file_name, disk.file_name,
            "the VM moved onto a new file"
        );
    }

    client.remove_snapshot(&second).await.expect("remove child");
    client.remove_snapshot(&first).await.expect("remove root");
    assert!(client.vm(&vm).await.expect("vm").snapshots.is_empty());
    assert!(sim.snapshot_names().expect("names").is_empty());

    let err = client
        .remove_snapshot(&first)
        .await
        .expect_err("already gone");
    assert_eq!(err.fault(), Some("ManagedObjectNotFound"), "{err}");
    stop(sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_tracking_gives_change_ids_and_changed_areas() {
    let (sim, client, vm) = session().await;

    client
        .enable_change_tracking(&vm)
        .await
        .expect("enable CBT");
    assert!(client.vm(&vm).await.expect("vm").cbt_enabled);
    assert!(sim.state().expect("state").expect("vm").cbt_enabled);

    let base = client
        .create_snapshot(&vm, "base", "", false)
        .await
        .expect("base");
    let base_disks = client.snapshot_disks(&base).await.expect("disks");
    let change_id = base_disks[0]
        .change_id
        .clone()
        .expect("a change id with CBT on");
    let capacity = base_disks[0].capacity_bytes;

    let offset = 3 << 20;
    sim.write_disk(2000, offset, &[0xab; 4096]).expect("write");
    let next = client
        .create_snapshot(&vm, "next", "", false)
        .await
        .expect("next");

    let changed = client
        .query_changed_disk_areas(&vm, &next, 2000, 0, &change_id)
        .await
        .expect("changed areas");
    assert_eq!(changed.start_offset, 0);
    assert!(
        changed.length > 0 && changed.length <= capacity,
        "{changed:?}"
    );
    assert!(
        changed
            .areas
            .iter()
            .any(|&(start, len)| start <= offset && offset + 4096 <= start + len),
        "the write at {offset} is in {changed:?}"
    );
    let total: u64 = changed.areas.iter().map(|a| a.1).sum();
    assert!(total < capacity, "only the changed blocks: {changed:?}");

    // A reset change tracking makes the old id a fault naming its cause.
    sim.reset_cbt().expect("reset");
    let err = client
        .query_changed_disk_areas(&vm, &next, 2000, 0, &change_id)
        .await
        .expect_err("old change id");
    assert_eq!(err.fault(), Some("FileFault"), "{err}");
    assert!(err.to_string().contains("QueryChangedDiskAreas"), "{err}");

    client.remove_snapshot(&next).await.expect("remove");
    client.remove_snapshot(&base).await.expect("remove");
    stop(sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_vm_is_not_found_and_an_expired_session_logs_in_again() {
    let (sim, client, vm) = session().await;

    // The session ends behind the client's back (as an idle timeout would).
    let cookie = client.session_cookie();
    let value = cookie
        .trim_start_matches("vmware_soap_session=")
        .trim_matches('"');
    let (status, _, body) = sim
        .soap_call(
            Some(value),
            r#"<Logout xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this></Logout>"#,
        )
        .expect("logout behind the client's back");
    assert_eq!(status, 200, "{body}");
    if let Err(e) = client.vm(&vm).await {
        panic!("logged in again: {e:?}");
    }
    assert_ne!(client.session_cookie(), cookie, "a new session");

    sim.destroy_vm().expect("destroy");
    let err = client.vm(&vm).await.expect_err("gone");
    assert_eq!(err.fault(), Some("ManagedObjectNotFound"), "{err}");
    assert_eq!(client.find_vm(&sim.vm.name).await.expect("find"), None);
    stop(sim).await;
}
