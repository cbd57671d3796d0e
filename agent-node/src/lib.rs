//! `sendense-node`: the agent next to the hypervisor.
