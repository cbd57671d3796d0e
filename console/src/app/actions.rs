//! What the operator pressed: a key becomes a [`Command`] through the key tables, and the
//! command changes the state of the current mode and view, sometimes returning an [`Action`]
//! for the terminal loop (start, cancel, quit).

use super::{Action, App, JobRef, JobRow, Mode, NoticeLevel, StartForm};
use crate::keys::{self, Command};
use crate::strings;
use crate::view::View;
use crossterm::event::KeyEvent;
use sendense_shared::api::{BackupRequest, BackupType};

impl App {
    /// The open job, else the selected row of the Jobs list.
    pub(super) fn selected_job(&self) -> Option<JobRow<'_>> {
        if let Some(b) = self.detail_backup() {
            return Some(JobRow::Backup(b));
        }
        if let Some(r) = self.detail_restore() {
            return Some(JobRow::Restore(r));
        }
        if let Some(r) = self.detail_recovery() {
            return Some(JobRow::Recovery(r));
        }
        let list = self.visible_jobs();
        list.get(self.selected(View::Jobs)).copied()
    }

    // ----- what the operator pressed -----

    /// Handle one key press. Returns what the terminal loop must do, if anything.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Action> {
        let command = keys::command(self.mode.keymap(), key)?;
        self.on_command(command)
    }

    pub fn on_command(&mut self, command: Command) -> Option<Action> {
        if command == Command::Quit {
            return Some(Action::Quit);
        }
        match self.mode.clone() {
            Mode::Normal => self.normal(command),
            Mode::Filter => {
                let f = &mut self.views.list_mut(self.view).filter;
                match command {
                    Command::Type(c) => f.push(c),
                    Command::Erase => {
                        f.pop();
                    }
                    Command::KeepFilter => self.mode = Mode::Normal,
                    Command::ClearFilter => {
                        f.clear();
                        self.mode = Mode::Normal;
                    }
                    _ => {}
                }
                self.views.list_mut(self.view).selected = 0;
                None
            }
            Mode::Help => {
                if command == Command::Close {
                    self.mode = Mode::Normal;
                }
                None
            }
            Mode::ConfirmCancel { backup_id, .. } => match command {
                Command::Yes => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::notice_cancel_sent(&backup_id.0),
                        self.now,
                    );
                    Some(Action::Cancel(backup_id))
                }
                Command::No => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::NOTICE_CANCEL_ABORTED.into(),
                        self.now,
                    );
                    None
                }
                _ => None,
            },
            Mode::ConfirmCancelRestore { restore_id, .. } => match command {
                Command::Yes => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::notice_cancel_sent(&restore_id),
                        self.now,
                    );
                    Some(Action::CancelRestore(restore_id))
                }
                Command::No => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::NOTICE_CANCEL_ABORTED.into(),
                        self.now,
                    );
                    None
                }
                _ => None,
            },
            Mode::ConfirmCancelRecovery { recovery_id, .. } => match command {
                Command::Yes => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::notice_cancel_sent(&recovery_id),
                        self.now,
                    );
                    Some(Action::CancelRecovery(recovery_id))
                }
                Command::No => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::NOTICE_CANCEL_ABORTED.into(),
                        self.now,
                    );
                    None
                }
                _ => None,
            },
            Mode::Start(mut form) => {
                match command {
                    Command::Full => form.backup_type = BackupType::Full,
                    Command::Incremental => form.backup_type = BackupType::Incremental,
                    Command::ToggleType => {
                        form.backup_type = match form.backup_type {
                            BackupType::Full => BackupType::Incremental,
                            BackupType::Incremental => BackupType::Full,
                        }
                    }
                    Command::Up => form.repository = form.repository.saturating_sub(1),
                    Command::Down => {
                        form.repository =
                            (form.repository + 1).min(self.repositories.len().saturating_sub(1))
                    }
                    Command::Enter => {
                        self.mode = Mode::ConfirmStart(form);
                        return None;
                    }
                    Command::Close => {
                        self.mode = Mode::Normal;
                        return None;
                    }
                    _ => {}
                }
                self.mode = Mode::Start(form);
                None
            }
            Mode::ConfirmPolicy { action, .. } => self.confirm_policy(action, command),
            Mode::Files => self.files_command(command),
            Mode::FilesPrompt { input } => self.files_prompt(input, command),
            Mode::PrunePreview(plan) => self.prune_dialog(&plan, command),
            Mode::ConfirmStart(form) => match command {
                Command::Yes => {
                    self.mode = Mode::Normal;
                    let repository_id = self.repositories.get(form.repository)?.id.clone();
                    self.notify(
                        NoticeLevel::Info,
                        strings::notice_start_sent(form.backup_type.as_str(), &form.vm_name),
                        self.now,
                    );
                    Some(Action::Start(BackupRequest {
                        vm_name: form.vm_name,
                        repository_id,
                        backup_type: form.backup_type,
                        require_application_consistency: false,
                    }))
                }
                Command::No => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::NOTICE_START_ABORTED.into(),
                        self.now,
                    );
                    None
                }
                _ => None,
            },
        }
    }

    fn move_selection(&mut self, to: impl FnOnce(usize, usize) -> usize) {
        if self.view == View::Policies && self.views.policies.detail.is_some() {
            let n = self.detail_points().len();
            let cur = self.selected_point();
            self.views.policies.point = to(cur, n).min(n.saturating_sub(1));
            return;
        }
        if self.view == View::Jobs && self.detail().is_some() {
            let disks = match (
                self.detail_backup(),
                self.detail_restore(),
                self.detail_recovery(),
            ) {
                (Some(b), _, _) => b.disk_results.len(),
                // A restore writes one disk.
                (None, Some(_), _) => 1,
                (None, None, Some(r)) => r.disks.len(),
                (None, None, None) => 0,
            };
            let jobs = &mut self.views.jobs;
            jobs.detail_scroll = to(jobs.detail_scroll, disks).min(disks.saturating_sub(1));
            return;
        }
        let len = self.row_count(self.view);
        let cur = self.selected(self.view);
        self.views.list_mut(self.view).selected = to(cur, len).min(len.saturating_sub(1));
    }

    fn switch(&mut self, view: View) {
        self.view = view;
        self.open_detail(None);
        self.views.policies.detail = None;
    }

    fn open_detail(&mut self, job: Option<JobRef>) {
        self.views.jobs.detail = job;
        self.views.jobs.detail_scroll = 0;
    }

    fn normal(&mut self, command: Command) -> Option<Action> {
        match command {
            Command::NextView => self.switch(self.view.next()),
            Command::PrevView => self.switch(self.view.prev()),
            Command::Go(v) => self.switch(v),
            Command::Up => self.move_selection(|cur, _| cur.saturating_sub(1)),
            Command::Down => self.move_selection(|cur, _| cur + 1),
            Command::Top => self.move_selection(|_, _| 0),
            Command::Bottom => self.move_selection(|_, len| len.saturating_sub(1)),
            Command::Enter => match self.view {
                View::Jobs if self.detail().is_none() => {
                    let job = self.selected_job().map(|j| j.job_ref());
                    self.open_detail(job);
                }
                View::Events => {
                    let id = self
                        .visible_events()
                        .get(self.selected(View::Events))
                        .map(|e| e.backup_id.clone());
                    if let Some(id) = id {
                        // The log names a restore by its id in the same field.
                        let job = if self.restores.iter().any(|r| r.restore_id == id.0)
                            && !self.backups.iter().any(|b| b.backup_id == id)
                        {
                            JobRef::Restore(id.0)
                        } else {
                            JobRef::Backup(id)
                        };
                        self.view = View::Jobs;
                        self.open_detail(Some(job));
                    }
                }
                View::Policies if self.views.policies.detail.is_none() => {
                    return self.open_policy();
                }
                _ => {}
            },
            Command::Back => {
                if self.view == View::Policies && self.views.policies.detail.is_some() {
                    self.views.policies.detail = None;
                } else if self.detail().is_some() {
                    self.views.jobs.detail = None;
                } else {
                    self.views.list_mut(self.view).filter.clear();
                }
            }
            Command::Filter => self.mode = Mode::Filter,
            Command::Help => self.mode = Mode::Help,
            Command::Start => self.open_start(),
            Command::Cancel => self.open_cancel(),
            Command::Browse => return self.open_browser(),
            // h/l mean nothing elsewhere: no notice for them.
            Command::PrevItem | Command::NextItem if self.view != View::Policies => {}
            Command::RunNow
            | Command::ToggleEnabled
            | Command::Protect
            | Command::PrunePreview
            | Command::PrevItem
            | Command::NextItem => return self.policy_command(command),
            _ => {}
        }
        None
    }

    fn open_start(&mut self) {
        if self.view != View::Vms {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_START_ONLY_VMS.into(),
                self.now,
            );
            return;
        }
        if self.repositories.is_empty() {
            self.notify(
                NoticeLevel::Error,
                strings::NOTICE_NO_REPOSITORY.into(),
                self.now,
            );
            return;
        }
        let Some(vm) = self.visible_vms().get(self.selected(View::Vms)).copied() else {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_NOTHING_SELECTED.into(),
                self.now,
            );
            return;
        };
        let has_previous = vm.last_backup_id.is_some();
        self.mode = Mode::Start(StartForm {
            vm_name: vm.vm_name.clone(),
            backup_type: if has_previous {
                BackupType::Incremental
            } else {
                BackupType::Full
            },
            repository: 0,
            has_previous,
        });
    }

    fn open_cancel(&mut self) {
        if self.view != View::Jobs {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_CANCEL_ONLY_JOBS.into(),
                self.now,
            );
            return;
        }
        let Some(job) = self.selected_job() else {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_NOTHING_SELECTED.into(),
                self.now,
            );
            return;
        };
        if job.status().is_terminal() {
            let text = strings::notice_already_terminal(job.id(), job.status().as_str());
            self.notify(NoticeLevel::Info, text, self.now);
            return;
        }
        self.mode = match job {
            JobRow::Backup(b) => Mode::ConfirmCancel {
                backup_id: b.backup_id.clone(),
                vm_name: b.vm_name.clone(),
                status: b.status,
            },
            JobRow::Restore(r) => Mode::ConfirmCancelRestore {
                restore_id: r.restore_id.clone(),
                vm_name: r.vm_name.clone(),
                status: r.status,
            },
            JobRow::Recovery(r) => Mode::ConfirmCancelRecovery {
                recovery_id: r.recovery_id.clone(),
                vm_name: r.vm_name.clone(),
                node: r.node.clone(),
                status: r.status,
            },
        };
    }
}
