//! The NBD port allocator against real databases (SQLite file, MariaDB) and real sockets on
//! 127.0.0.1.

mod db_support;

use agent_hub::ports::{PortAllocator, PortError, PortRange};
use db_support::{TestDb, on_each_dialect};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, TcpListener};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A window of `n` consecutive ports free on 127.0.0.1 and reserved for this test process.
fn free_window(n: u16) -> PortRange {
    let (first, last) = sendense_tests::net::free_port_range(n);
    PortRange::new(first, last).unwrap()
}

fn keys(n: i64) -> Vec<DiskKey> {
    (0..n).map(|i| DiskKey(2000 + i)).collect()
}

async fn held(a: &PortAllocator) -> Vec<(u16, String, i64)> {
    a.view()
        .await
        .unwrap()
        .allocations
        .into_iter()
        .map(|p| (p.port.0, p.backup_id.0, p.disk_key.0))
        .collect()
}

/// Two allocators on two pools (two hub processes) share one database; 20 jobs of 3 disks ask
/// at once from a 101-port range. Every job gets 3 ports and no port is handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hubs_allocating_at_once_never_share_a_port() {
    on_each_dialect("ports_concurrent", |t: TestDb| async move {
        let range = free_window(101);
        let a = PortAllocator::new(t.db.clone(), range, LOOPBACK);
        let b = PortAllocator::new(t.another_pool().await, range, LOOPBACK);
        let mut tasks = Vec::new();
        for i in 0..20 {
            let alloc = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let id = BackupId(format!("job-{i}"));
                let got = alloc.allocate(&id, &keys(3)).await;
                (id, got)
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            let (id, got) = task.await.unwrap();
            let got = got.unwrap_or_else(|e| panic!("{}: {id} got no ports: {e}", t.dialect));
            assert_eq!(got.iter().map(|(k, _)| *k).collect::<Vec<_>>(), keys(3));
            assert!(
                got.iter().all(|(_, p)| range.contains(p.0)),
                "{got:?} outside {range}"
            );
            all.extend(got.into_iter().map(|(k, p)| (p.0, id.0.clone(), k.0)));
        }
        let ports: BTreeSet<u16> = all.iter().map(|(p, _, _)| *p).collect();
        assert_eq!(
            ports.len(),
            60,
            "{}: a port was handed out twice",
            t.dialect
        );
        all.sort();
        assert_eq!(
            held(&a).await,
            all,
            "the database holds exactly what was handed out"
        );
        assert_eq!(held(&b).await, all);

        for i in 0..20 {
            let alloc = if i % 2 == 0 { &a } else { &b };
            assert_eq!(
                alloc.release(&BackupId(format!("job-{i}"))).await.unwrap(),
                3
            );
        }
        assert!(held(&a).await.is_empty());
    })
    .await;
}

/// More demand than supply, concurrently: the jobs that got ports hold exactly 3 each, the
/// others got `Exhausted` and hold nothing, and no port is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contended_exhaustion_is_all_or_nothing() {
    on_each_dialect("ports_contended", |t: TestDb| async move {
        let range = free_window(20);
        let a = PortAllocator::new(t.db.clone(), range, LOOPBACK);
        let b = PortAllocator::new(t.another_pool().await, range, LOOPBACK);
        let mut tasks = Vec::new();
        for i in 0..12 {
            let alloc = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let id = BackupId(format!("job-{i}"));
                let got = alloc.allocate(&id, &keys(3)).await;
                (id, got)
            }));
        }
        let mut winners = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for task in tasks {
            let (id, got) = task.await.unwrap();
            match got {
                Ok(got) => {
                    for (_, p) in &got {
                        assert!(
                            ports.insert(p.0),
                            "{}: port {p} handed out twice",
                            t.dialect
                        );
                    }
                    winners.insert(id.0);
                }
                Err(PortError::Exhausted {
                    range: r,
                    requested,
                    ..
                }) => {
                    assert_eq!((r, requested), (range, 3));
                }
                Err(e) => panic!("{}: {id}: unexpected error {e}", t.dialect),
            }
        }
        assert!(winners.len() <= 6, "20 ports hold at most 6 jobs of 3");
        assert!(!winners.is_empty());
        let rows = held(&a).await;
        assert_eq!(
            rows.len(),
            winners.len() * 3,
            "{}: a refused job left ports held",
            t.dialect
        );
        assert!(rows.iter().all(|(_, job, _)| winners.contains(job)));
    })
    .await;
}

#[tokio::test]
async fn exhaustion_names_range_and_counts_and_holds_nothing() {
    on_each_dialect("ports_exhausted", |t: TestDb| async move {
        let range = free_window(4);
        let alloc = PortAllocator::new(t.db.clone(), range, LOOPBACK);
        let first = alloc
            .allocate(&BackupId::from("a"), &keys(2))
            .await
            .unwrap();
        assert_eq!(
            first,
            [
                (DiskKey(2000), NbdPort(range.first)),
                (DiskKey(2001), NbdPort(range.first + 1))
            ]
        );

        let e = alloc
            .allocate(&BackupId::from("b"), &keys(3))
            .await
            .unwrap_err();
        match &e {
            PortError::Exhausted {
                range: r,
                requested,
                in_use,
                squatted,
            } => {
                assert_eq!((*r, *requested, *in_use), (range, 3, 2));
                assert!(squatted.is_empty());
            }
            other => panic!("expected Exhausted, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&range.to_string()) && msg.contains("3 disks") && msg.contains("2 held"),
            "{msg}"
        );
        let rows = held(&alloc).await;
        assert_eq!(rows.len(), 2, "the refused request holds nothing: {rows:?}");
        assert!(rows.iter().all(|(_, job, _)| job == "a"));

        // The two ports still free are really free: a 2-disk job gets them.
        let second = alloc
            .allocate(&BackupId::from("c"), &keys(2))
            .await
            .unwrap();
        assert_eq!(second[1].1, NbdPort(range.last));
        assert_eq!(alloc.release(&BackupId::from("a")).await.unwrap(), 2);
        alloc.release_port(second[0].1).await.unwrap();
        assert_eq!(held(&alloc).await, [(range.last, "c".to_string(), 2001)]);
        assert_eq!(alloc.release(&BackupId::from("nothing")).await.unwrap(), 0);
    })
    .await;
}

/// A foreign listener inside the range: its port is skipped, reported as squatted, and handed
/// out again once the squatter is gone.
#[tokio::test]
async fn a_squatted_port_is_skipped_and_reported() {
    on_each_dialect("ports_squatted", |t: TestDb| async move {
        let range = free_window(3);
        let middle = range.first + 1;
        let squatter = TcpListener::bind((LOOPBACK, middle)).expect("test squats a port");
        let alloc = PortAllocator::new(t.db.clone(), range, LOOPBACK);

        let got = alloc
            .allocate(&BackupId::from("a"), &keys(2))
            .await
            .unwrap();
        assert_eq!(
            got,
            [
                (DiskKey(2000), NbdPort(range.first)),
                (DiskKey(2001), NbdPort(range.last))
            ]
        );
        let view = alloc.view().await.unwrap();
        assert_eq!(view.range, [range.first, range.last]);
        assert_eq!(view.squatted.len(), 1);
        assert_eq!(view.squatted[0].port, NbdPort(middle));
        assert!(
            view.squatted[0].detail.to_lowercase().contains("in use"),
            "{}",
            view.squatted[0].detail
        );
        assert!(
            view.allocations.iter().all(|p| p.port.0 != middle),
            "the squatted port is not held"
        );

        let e = alloc
            .allocate(&BackupId::from("b"), &keys(1))
            .await
            .unwrap_err();
        match &e {
            PortError::Exhausted {
                in_use, squatted, ..
            } => {
                assert_eq!((*in_use, squatted.as_slice()), (2, &[middle][..]));
            }
            other => panic!("expected Exhausted, got {other:?}"),
        }
        assert!(e.to_string().contains(&format!("({middle})")), "{e}");

        drop(squatter);
        let got = alloc
            .allocate(&BackupId::from("b"), &keys(1))
            .await
            .unwrap();
        assert_eq!(got, [(DiskKey(2000), NbdPort(middle))]);
        assert!(
            alloc.view().await.unwrap().squatted.is_empty(),
            "a free port is no longer reported"
        );
    })
    .await;
}

/// A port taken by a foreign process after its bind test: the disk moves to the next free port
/// (never the taken one), the taken one is let go and reported; with nowhere to move, the
/// taken port stays held by the job (its unwinding frees it) and the answer says the range.
#[tokio::test]
async fn a_port_taken_after_its_bind_test_is_replaced() {
    on_each_dialect("ports_taken", |t: TestDb| async move {
        let range = free_window(3);
        let alloc = PortAllocator::new(t.db.clone(), range, LOOPBACK);
        let a = BackupId::from("a");
        let got = alloc.allocate(&a, &keys(2)).await.unwrap();
        let taken = got[0].1;
        let thief = TcpListener::bind((LOOPBACK, taken.0)).expect("test takes the port");
        let next = alloc
            .replace_taken(&a, DiskKey(2000), taken, "qemu-nbd: in use".into())
            .await
            .unwrap();
        assert_eq!(next, NbdPort(range.last));
        assert_eq!(
            held(&alloc).await,
            [
                (range.first + 1, "a".to_string(), 2001),
                (range.last, "a".to_string(), 2000)
            ]
        );
        let view = alloc.view().await.unwrap();
        assert_eq!(view.squatted.len(), 1);
        assert_eq!(view.squatted[0].port, taken);
        assert_eq!(view.squatted[0].detail, "qemu-nbd: in use");

        // Nowhere left: refused, and the disk keeps the port it had.
        let e = alloc
            .replace_taken(&a, DiskKey(2000), next, "again".into())
            .await
            .unwrap_err();
        assert!(matches!(e, PortError::Exhausted { .. }), "{e:?}");
        assert!(e.to_string().contains(&range.to_string()), "{e}");
        assert!(
            held(&alloc)
                .await
                .contains(&(range.last, "a".to_string(), 2000))
        );
        drop(thief);
        assert_eq!(alloc.release(&a).await.unwrap(), 2);
    })
    .await;
}

#[tokio::test]
async fn a_duplicate_disk_key_is_refused() {
    on_each_dialect("ports_dup_key", |t: TestDb| async move {
        let alloc = PortAllocator::new(t.db.clone(), free_window(4), LOOPBACK);
        let e = alloc
            .allocate(&BackupId::from("a"), &[DiskKey(2000), DiskKey(2000)])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("disk key appears twice"), "{e}");
        assert!(held(&alloc).await.is_empty());
        assert!(
            alloc
                .allocate(&BackupId::from("a"), &[])
                .await
                .unwrap()
                .is_empty()
        );
    })
    .await;
}
