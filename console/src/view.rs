//! The views of the main screen. A low module of its own: the key tables name views
//! (`1` goes to Jobs) and the app holds one state per view, and neither depends on the other.

use crate::strings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    Jobs,
    Vms,
    Ports,
    Tunnel,
    Processes,
    Events,
    Policies,
}

impl View {
    /// In tab order (the header draws them so).
    pub const ALL: [View; 7] = [
        View::Jobs,
        View::Vms,
        View::Ports,
        View::Tunnel,
        View::Processes,
        View::Events,
        View::Policies,
    ];

    /// Place in [`View::ALL`]. A match, not a search, so a new view does not compile until it
    /// has a place (and the test below checks `ALL` agrees).
    pub fn index(self) -> usize {
        match self {
            View::Jobs => 0,
            View::Vms => 1,
            View::Ports => 2,
            View::Tunnel => 3,
            View::Processes => 4,
            View::Events => 5,
            View::Policies => 6,
        }
    }

    /// The view after this one (Tab), wrapping around.
    pub fn next(self) -> View {
        View::ALL[(self.index() + 1) % View::ALL.len()]
    }

    /// The view before this one (Shift-Tab), wrapping around.
    pub fn prev(self) -> View {
        View::ALL[(self.index() + View::ALL.len() - 1) % View::ALL.len()]
    }

    pub fn title(self) -> &'static str {
        match self {
            View::Jobs => strings::VIEW_JOBS,
            View::Vms => strings::VIEW_VMS,
            View::Ports => strings::VIEW_PORTS,
            View::Tunnel => strings::VIEW_TUNNEL,
            View::Processes => strings::VIEW_PROCESSES,
            View::Events => strings::VIEW_EVENTS,
            View::Policies => strings::VIEW_POLICIES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_view_once_at_its_index() {
        for (i, v) in View::ALL.iter().enumerate() {
            assert_eq!(v.index(), i, "{v:?}");
        }
        assert_eq!(View::Jobs.prev(), View::Policies);
        assert_eq!(View::Policies.next(), View::Jobs);
    }
}
