//! The vSphere simulator harness ([`sendense_tests::vcsim`]) checked on its own with raw SOAP
//! calls through curl (so a fault in the launcher shows here, not as a mystery in the node).

use sendense_tests::vcsim::{Vcsim, VcsimOptions};
use std::os::unix::fs::PermissionsExt;

const MIB: u64 = 1 << 20;

fn vm_ref(sim: &Vcsim) -> String {
    format!(r#"<_this type="VirtualMachine">{}</_this>"#, sim.vm.moref)
}

/// Runs a call that returns a Task; the simulator completes tasks before answering, so the
/// task's state is read right away: Ok(()) or the fault's text.
fn run_task(sim: &Vcsim, cookie: &str, call: &str) -> Result<(), String> {
    let (status, _, body) = sim.soap_call(Some(cookie), call).expect("SOAP call");
    assert_eq!(status, 200, "{call} -> {body}");
    let task = between(&body, r#"type="Task">"#, "<").expect("a task reference");
    let (_, _, info) = sim
        .soap_call(
            Some(cookie),
            &format!(
                concat!(
                    r#"<RetrieveProperties xmlns="urn:vim25"><_this type="PropertyCollector">propertyCollector</_this>"#,
                    r#"<specSet><propSet><type>Task</type><pathSet>info.state</pathSet><pathSet>info.error</pathSet></propSet>"#,
                    r#"<objectSet><obj type="Task">{}</obj></objectSet></specSet></RetrieveProperties>"#
                ),
                task
            ),
        )
        .expect("task info");
    if info.contains(">success<") {
        Ok(())
    } else {
        Err(info)
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(&s[i..j])
}

fn create_snapshot(sim: &Vcsim, cookie: &str, name: &str, description: &str) -> String {
    run_task(
        sim,
        cookie,
        &format!(
            r#"<CreateSnapshot_Task xmlns="urn:vim25">{}<name>{name}</name><description>{description}</description><memory>false</memory><quiesce>false</quiesce></CreateSnapshot_Task>"#,
            vm_ref(sim)
        ),
    )
    .expect("CreateSnapshot_Task");
    let state = sim.state().unwrap().unwrap();
    state
        .all_snapshots()
        .into_iter()
        .find(|s| s.name == name)
        .expect("the new snapshot in the tree")
        .moref
        .clone()
}

fn remove_snapshot(sim: &Vcsim, cookie: &str, moref: &str) {
    run_task(
        sim,
        cookie,
        &format!(
            r#"<RemoveSnapshot_Task xmlns="urn:vim25"><_this type="VirtualMachineSnapshot">{moref}</_this><removeChildren>false</removeChildren><consolidate>true</consolidate></RemoveSnapshot_Task>"#
        ),
    )
    .expect("RemoveSnapshot_Task");
}

/// QueryChangedDiskAreas: Ok(list of (start, length)) or Err(fault text).
fn changed_areas(
    sim: &Vcsim,
    cookie: &str,
    snapshot: &str,
    key: i32,
    start: u64,
    change_id: &str,
) -> Result<(u64, Vec<(u64, u64)>), String> {
    let (status, _, body) = sim
        .soap_call(
            Some(cookie),
            &format!(
                r#"<QueryChangedDiskAreas xmlns="urn:vim25">{}<snapshot type="VirtualMachineSnapshot">{snapshot}</snapshot><deviceKey>{key}</deviceKey><startOffset>{start}</startOffset><changeId>{change_id}</changeId></QueryChangedDiskAreas>"#,
                vm_ref(sim)
            ),
        )
        .expect("SOAP call");
    if status != 200 {
        return Err(body);
    }
    let ret = between(&body, "<returnval>", "</returnval>").expect("returnval");
    let mut areas = Vec::new();
    let mut rest = ret;
    while let Some(i) = rest.find("<changedArea>") {
        let area = between(&rest[i..], "<changedArea>", "</changedArea>").unwrap();
        let s: u64 = between(area, "<start>", "<").unwrap().parse().unwrap();
        let l: u64 = between(area, "<length>", "<").unwrap().parse().unwrap();
        areas.push((s, l));
        rest = &rest[i + "<changedArea>".len()..];
    }
    let after_areas = ret.rsplit("</changedArea>").next().unwrap_or(ret);
    let length: u64 = between(after_areas, "<length>", "<")
        .or_else(|| between(ret, "<length>", "<"))
        .unwrap()
        .parse()
        .unwrap();
    Ok((length, areas))
}

fn pattern(byte: u8, len: u64) -> Vec<u8> {
    vec![byte; len as usize]
}

/// The harness's own guarantees, which the vSphere backup tests build on.
#[test]
fn vcsim_harness_serves_a_vm_whose_snapshots_freeze_data_and_track_changes() {
    let sim = Vcsim::start(VcsimOptions::default()).expect("simulator");
    let pid = sim.pid();
    let host_port = sim.host_port().to_string();

    // Two disks, distinct keys and units, full-size files.
    let keys: Vec<i32> = sim.vm.disks.iter().map(|d| d.key).collect();
    assert_eq!(keys, [2000, 2001]);
    let units: Vec<i32> = sim.vm.disks.iter().map(|d| d.unit_number).collect();
    assert_eq!(units, [0, 1]);
    for (d, size) in sim.vm.disks.iter().zip([64 * MIB, 32 * MIB]) {
        assert_eq!(d.capacity_bytes, size);
        assert_eq!(
            std::fs::metadata(&d.path_on_disk).unwrap().len(),
            size,
            "{d:?}"
        );
    }
    let mode = std::fs::metadata(sim.password_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(sim.password_file()).unwrap(),
        sim.password
    );
    assert_eq!(sim.cert_sha256.len(), 64);

    // One login only.
    let refused = sim
        .login_cookie(&sim.user, "wrong")
        .unwrap_err()
        .to_string();
    assert!(refused.contains("InvalidLogin"), "{refused}");
    let refused = sim
        .login_cookie("someone-else", &sim.password)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("InvalidLogin"), "{refused}");
    let cookie = sim.login_cookie(&sim.user, &sim.password).expect("login");

    // The datastore wants the session cookie; Range GETs return what the guest wrote.
    let a = pattern(0xa1, 128 * 1024);
    sim.write_disk(2000, MIB, &a).unwrap();
    let url0 = sim.datastore_file_url(&sim.vm.disks[0].file_name);
    assert!(url0.contains("/folder/vm1/vm1-flat.vmdk?dcPath="), "{url0}");
    let (status, _) = sim.range_get(&url0, None, MIB, 4096).unwrap();
    assert_eq!(status, 401, "no cookie");
    let (status, body) = sim
        .range_get(&url0, Some(&cookie), MIB, a.len() as u64)
        .unwrap();
    assert_eq!(status, 206);
    assert!(body == a, "the Range GET returns the bytes written");

    // CBT on: change ids on every disk.
    run_task(
        &sim,
        &cookie,
        &format!(
            r#"<ReconfigVM_Task xmlns="urn:vim25">{}<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec></ReconfigVM_Task>"#,
            vm_ref(&sim)
        ),
    )
    .expect("ReconfigVM_Task");
    let state = sim.state().unwrap().unwrap();
    assert!(state.cbt_enabled);
    assert!(
        state.disks.iter().all(|d| d.change_id.ends_with("/0")),
        "{state:?}"
    );

    // A snapshot freezes the files; the VM writes into new ones.
    let s1 = create_snapshot(&sim, &cookie, "s1", "first");
    let state = sim.state().unwrap().unwrap();
    assert_eq!(state.snapshot_count, 1);
    let snap = &state.all_snapshots()[0];
    assert_eq!(
        (snap.name.as_str(), snap.description.as_str()),
        ("s1", "first")
    );
    for (frozen, d) in snap.disks.iter().zip(&sim.vm.disks) {
        assert_eq!(frozen.path_on_disk, d.path_on_disk);
        assert!(frozen.change_id.ends_with("/1"), "{frozen:?}");
    }
    for (running, d) in state.disks.iter().zip(&sim.vm.disks) {
        assert_ne!(running.path_on_disk, d.path_on_disk);
        assert!(running.path_on_disk.exists());
    }
    let b = pattern(0xb2, 64 * 1024);
    sim.write_disk(2000, MIB, &b).unwrap();
    let (_, body) = sim
        .range_get(&url0, Some(&cookie), MIB, a.len() as u64)
        .unwrap();
    assert!(
        body == a,
        "the snapshot's file keeps the data of the snapshot instant"
    );
    assert!(sim.read_disk(2000, MIB, b.len()).unwrap() == b);

    // Changed areas: "*" = the allocated blocks; the snapshot's own id = nothing.
    let (len, areas) = changed_areas(&sim, &cookie, &s1, 2000, 0, "*").unwrap();
    assert_eq!((len, areas), (64 * MIB, vec![(MIB, 128 * 1024)]));
    let (_, areas) = changed_areas(&sim, &cookie, &s1, 2001, 0, "*").unwrap();
    assert!(areas.is_empty());
    let (len, areas) = changed_areas(&sim, &cookie, &s1, 2000, 2 * MIB, "*").unwrap();
    assert_eq!((len, areas), (62 * MIB, vec![]));
    let id1 = snap.disks[0].change_id.clone();
    let (_, areas) = changed_areas(&sim, &cookie, &s1, 2000, 0, &id1).unwrap();
    assert!(areas.is_empty());

    // A second snapshot: against s1's change id only the block written since.
    let s2 = create_snapshot(&sim, &cookie, "s2", "second");
    let (_, areas) = changed_areas(&sim, &cookie, &s2, 2000, 0, &id1).unwrap();
    assert_eq!(areas, vec![(MIB, 64 * 1024)]);
    let tree = sim.state().unwrap().unwrap();
    assert_eq!(tree.snapshots.as_ref().unwrap()[0].children[0].name, "s2");

    // CBT reset: the old id faults (the driver falls back to a full backup).
    sim.reset_cbt().unwrap();
    let fault = changed_areas(&sim, &cookie, &s2, 2000, 0, &id1).unwrap_err();
    assert!(fault.contains("FileFault"), "{fault}");

    // Removal consolidates: the base files hold the latest data, no delta file is left.
    remove_snapshot(&sim, &cookie, &s2);
    remove_snapshot(&sim, &cookie, &s1);
    let state = sim.state().unwrap().unwrap();
    assert_eq!(state.snapshot_count, 0);
    assert!(sim.snapshot_names().unwrap().is_empty());
    for (running, d) in state.disks.iter().zip(&sim.vm.disks) {
        assert_eq!(running.path_on_disk, d.path_on_disk);
    }
    assert!(sim.read_disk(2000, MIB, b.len()).unwrap() == b);
    let vm_dir = sim.datastore_dir.join("vm1");
    let mut files: Vec<String> = std::fs::read_dir(&vm_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("vmdk"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["vm1-flat.vmdk", "vm1.vmdk", "vm1_1-flat.vmdk", "vm1_1.vmdk"]
    );

    // Destroyed: gone from the inventory with its files.
    sim.destroy_vm().unwrap();
    assert!(sim.state().unwrap().is_none());
    assert!(!vm_dir.exists());

    drop(sim);
    assert!(
        !sendense_tests::pid_alive(pid),
        "launcher {pid} still alive"
    );
    assert!(
        std::net::TcpStream::connect(&host_port).is_err(),
        "{host_port} still accepts connections"
    );
}
