//! Runs of removed points become the right steps.

use super::*;
use crate::retention::Verdict;

fn chain(n: usize) -> Vec<ChainPoint> {
    // Newest first: p{n-1} .. p0 (the full).
    (0..n)
        .rev()
        .map(|i| ChainPoint {
            backup_id: BackupId(format!("p{i}")),
            backup_type: if i == 0 {
                BackupType::Full
            } else {
                BackupType::Incremental
            },
            created_at: DateTime::from_timestamp(1_700_000_000 + i as i64 * 86_400, 0).unwrap(),
            protected: false,
            corrupt: false,
            disks: vec![PointDisk {
                disk_key: DiskKey(2000),
                image: PathBuf::from(format!("/r/vm/2000/p{i}.qcow2")),
                parent: (i > 0).then(|| BackupId(format!("p{}", i - 1))),
            }],
            bytes_used: 100 + i as u64,
        })
        .collect()
}

fn verdicts(points: &[ChainPoint], kept: &[usize]) -> Vec<Verdict<BackupId>> {
    points
        .iter()
        .map(|p| Verdict {
            key: p.backup_id.clone(),
            at: p.created_at,
            kept_by: kept
                .iter()
                .any(|k| p.backup_id.0 == format!("p{k}"))
                .then_some(KeepReason::Last),
        })
        .collect()
}

fn actions(p: &Planned) -> Vec<(String, PruneAction)> {
    p.points
        .iter()
        .map(|x| (x.backup_id.0.clone(), x.action))
        .collect()
}

#[test]
fn base_run_merges_middle_run_rebases_top_run_deletes() {
    // p0 F, p1..p6; keep p5 and p2: p6 top (deleted), p4 p3 rebased past, p1 p0 merged into p2.
    let pts = chain(7);
    let plan = build(&pts, &verdicts(&pts, &[5, 2]), true).unwrap();
    use PruneAction::*;
    assert_eq!(
        actions(&plan),
        vec![
            ("p6".into(), Delete),
            ("p5".into(), Keep),
            ("p4".into(), RebaseChild),
            ("p3".into(), Delete),
            ("p2".into(), Keep),
            ("p1".into(), Delete),
            ("p0".into(), MergeIntoChild),
        ]
    );
    assert_eq!(plan.steps.len(), 3);
    match &plan.steps[1] {
        Step::Rebase {
            child, drop, disks, ..
        } => {
            assert_eq!(child.0, "p5");
            assert_eq!(drop, &[BackupId::from("p4"), BackupId::from("p3")]);
            assert_eq!(disks[0].new_backing.as_deref(), Some("p2.qcow2"));
            assert_eq!(disks[0].old_backing.as_deref(), Some("p4.qcow2"));
            assert_eq!(disks[0].new_parent, Some(BackupId::from("p2")));
        }
        s => panic!("{s:?}"),
    }
    match &plan.steps[2] {
        Step::Merge {
            child,
            disks,
            files,
            ..
        } => {
            assert_eq!(child.0, "p2");
            assert_eq!(disks[0].base, PathBuf::from("/r/vm/2000/p0.qcow2"));
            // The base image is renamed, not deleted; its sidecar and p1's files are.
            assert!(!files.contains(&disks[0].base));
            assert!(files.contains(&PathBuf::from("/r/vm/2000/p0.qcow2.sums")));
            assert!(files.contains(&PathBuf::from("/r/vm/2000/p1.qcow2")));
        }
        s => panic!("{s:?}"),
    }
    assert_eq!(plan.points[0].bytes_freed, 106);
}

#[test]
fn nothing_removed_without_rules_and_branches_are_refused() {
    let pts = chain(3);
    let plan = build(&pts, &verdicts(&pts, &[]), false).unwrap();
    assert!(plan.steps.is_empty());
    assert!(plan.points.iter().all(|p| p.action == PruneAction::Keep));
    let mut pts = chain(3);
    let mut twin = pts[0].clone();
    twin.backup_id = BackupId::from("twin");
    pts.insert(0, twin);
    let e = build(&pts, &verdicts(&pts, &[2]), true).unwrap_err();
    assert!(e.to_string().contains("branches"), "{e}");
}
