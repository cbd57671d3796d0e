//! Which VMs a policy's slot backs up, and which it skips because another policy owns them.
//!
//! The rule (also in [`sendense_shared::api::VmSelector`]'s doc): a VM named explicitly by a
//! policy belongs to it (two policies naming one VM is refused at create/update, 409). A VM
//! that policies reach only through patterns or nodes belongs to the enabled one with the
//! highest `priority`, ties going to the one created first (then the smaller id). A VM named
//! explicitly by one policy and reached by another's pattern belongs to the one naming it.
//! Disabled policies own nothing.

use super::validate::glob_match;
use sendense_shared::api::{Policy, Vm};

/// How a policy reaches a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    Pattern,
    Node,
    Explicit,
}

/// `Some` when `p` covers `vm`, with the strongest way it does.
pub fn reach(p: &Policy, vm_name: &str, node: Option<&str>) -> Option<Reach> {
    if p.vms.names.iter().any(|n| n == vm_name) {
        return Some(Reach::Explicit);
    }
    if let Some(n) = node
        && p.vms.nodes.iter().any(|x| x == n)
    {
        return Some(Reach::Node);
    }
    p.vms
        .patterns
        .iter()
        .any(|g| glob_match(g, vm_name))
        .then_some(Reach::Pattern)
}

/// One VM of a slot: run it, or skip it and say why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub vm_name: String,
    pub skip: Option<String>,
}

/// `q` wins a VM that both reach without naming it over `p`.
fn outranks(q: &Policy, p: &Policy) -> bool {
    (q.priority, std::cmp::Reverse((q.created_at, &q.id)))
        > (p.priority, std::cmp::Reverse((p.created_at, &p.id)))
}

/// The VMs of `p` among the registered `vms` (and its explicit names that are not registered,
/// skipped), in name order, with `others` the other policies.
pub fn targets(p: &Policy, others: &[Policy], vms: &[Vm]) -> Vec<Target> {
    let mut out = Vec::new();
    for vm in vms {
        let Some(how) = reach(p, &vm.vm_name, vm.node.as_deref()) else {
            continue;
        };
        let skip = if how == Reach::Explicit {
            None
        } else {
            others
                .iter()
                .filter(|q| q.id != p.id && q.enabled)
                .filter_map(|q| reach(q, &vm.vm_name, vm.node.as_deref()).map(|r| (q, r)))
                .find(|(q, r)| *r == Reach::Explicit || outranks(q, p))
                .map(|(q, r)| {
                    if r == Reach::Explicit {
                        format!(
                            "VM {} is named by policy {:?} ({}); this policy reaches it only \
                             through a pattern or node",
                            vm.vm_name, q.name, q.id
                        )
                    } else {
                        format!(
                            "VM {} belongs to policy {:?} ({}): priority {} against {} (ties go \
                             to the older policy)",
                            vm.vm_name, q.name, q.id, q.priority, p.priority
                        )
                    }
                })
        };
        out.push(Target {
            vm_name: vm.vm_name.clone(),
            skip,
        });
    }
    for n in &p.vms.names {
        if !vms.iter().any(|v| &v.vm_name == n) {
            out.push(Target {
                vm_name: n.clone(),
                skip: Some(format!("VM {n} is not registered (any more)")),
            });
        }
    }
    out.sort_by(|a, b| a.vm_name.cmp(&b.vm_name));
    out
}
