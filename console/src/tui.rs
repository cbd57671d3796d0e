//! The terminal loop: one `tokio::select!` over a one-second tick (the clock), key and resize
//! events, hub updates and SIGTERM/SIGHUP. The screen is redrawn only when something changed,
//! so an idle console costs next to nothing. The terminal is restored on every exit path:
//! normal quit, error, signal, and panic (ratatui's init installs a hook that restores first).

use crate::app::{Action, App, Update};
use crate::sse::{self, cause};
use crate::{strings, ui};
use chrono::Utc;
use crossterm::event::{Event, EventStream, KeyEventKind};
use futures_util::StreamExt;
use sendense_shared::api::HubEvent;
use sendense_shared::client::HubClient;
use std::io::IsTerminal;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

mod files;
mod policies;

#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error(
        "the console needs a terminal on stdin and stdout; for scripts use a subcommand (e.g. `sendense-console backups list --json`)"
    )]
    NoTerminal,
    #[error("terminal setup failed")]
    Terminal(#[source] std::io::Error),
    #[error("cannot listen for {signal}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Open the TUI against `client` until the operator quits or a signal arrives.
pub async fn run(client: HubClient) -> Result<(), TuiError> {
    // EventStream panics without a terminal ("reader source not set"): check first.
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return Err(TuiError::NoTerminal);
    }
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| TuiError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|source| TuiError::Signal {
        signal: "SIGHUP",
        source,
    })?;
    let mut terminal = ratatui::try_init().map_err(TuiError::Terminal)?;

    let (tx, mut rx) = mpsc::channel::<Update>(256);
    let feed = tokio::spawn(sse::run(client.clone(), tx.clone()));
    let mut app = App::new(client.base_url(), Utc::now());
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut dirty = true;

    let result = loop {
        if dirty {
            app.now = Utc::now();
            if let Err(e) = terminal.draw(|frame| ui::render(&app, frame)) {
                break Err(TuiError::Terminal(e));
            }
            dirty = false;
        }
        tokio::select! {
            _ = tick.tick() => dirty = true,
            update = rx.recv() => {
                if let Some(update) = update {
                    let reload = app.reload_on(&update);
                    app.apply(update, Utc::now());
                    if let Some(action) = reload {
                        perform(&client, action, tx.clone());
                    }
                    dirty = true;
                }
            }
            event = keys.next() => match event {
                Some(Ok(Event::Key(key))) if key.kind == KeyEventKind::Press => {
                    app.now = Utc::now();
                    match app.on_key(key) {
                        Some(Action::Quit) => break Ok(()),
                        Some(action) => perform(&client, action, tx.clone()),
                        None => {}
                    }
                    dirty = true;
                }
                Some(Ok(Event::Resize(..))) => dirty = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(TuiError::Terminal(e)),
                None => break Ok(()),
            },
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: restoring the terminal and exiting");
                break Ok(());
            }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: the session is gone, exiting");
                break Ok(());
            }
        }
    };
    feed.abort();
    ratatui::restore();
    result
}

/// Carry out a start or a cancel (of a backup or a restore) in the background; its outcome comes back as an update.
fn perform(client: &HubClient, action: Action, tx: mpsc::Sender<Update>) {
    let client = client.clone();
    tokio::spawn(async move {
        let updates = match action {
            Action::Start(req) => match client.start_backup(&req).await {
                Ok(backup) => vec![
                    Update::ActionDone {
                        message: strings::notice_started(&backup.backup_id.0, &backup.vm_name),
                    },
                    Update::Event(HubEvent::Backup { backup }),
                ],
                Err(e) => vec![Update::ActionFailed {
                    message: strings::notice_action_failed(strings::START_TITLE, &cause(&e)),
                }],
            },
            Action::Cancel(id) => match client.cancel_backup(&id).await {
                Ok(backup) => vec![
                    Update::ActionDone {
                        message: strings::notice_cancelled(
                            &backup.backup_id.0,
                            backup.status.as_str(),
                        ),
                    },
                    Update::Event(HubEvent::Backup { backup }),
                ],
                Err(e) => vec![Update::ActionFailed {
                    message: strings::notice_action_failed(&format!("Cancel of {id}"), &cause(&e)),
                }],
            },
            Action::CancelRestore(id) => match client.cancel_restore(&id).await {
                Ok(restore) => vec![
                    Update::ActionDone {
                        message: strings::notice_cancelled(
                            &restore.restore_id,
                            restore.status.as_str(),
                        ),
                    },
                    Update::Event(HubEvent::Restore { restore }),
                ],
                Err(e) => vec![Update::ActionFailed {
                    message: strings::notice_action_failed(&format!("Cancel of {id}"), &cause(&e)),
                }],
            },
            Action::CancelRecovery(id) => match client.cancel_recovery(&id).await {
                Ok(recovery) => vec![
                    Update::ActionDone {
                        message: strings::notice_recovery_cancelled(
                            &recovery.recovery_id,
                            &recovery.vm_name,
                            recovery.status.as_str(),
                        ),
                    },
                    Update::Recovery(Box::new(recovery)),
                ],
                Err(e) => vec![Update::ActionFailed {
                    message: strings::notice_action_failed(&format!("Cancel of {id}"), &cause(&e)),
                }],
            },
            Action::ListFiles {
                seq,
                backup_id,
                target,
            } => vec![files::list(&client, seq, &backup_id, &target).await],
            Action::GetFiles {
                backup_id,
                target,
                what,
                dest,
            } => vec![files::get(&client, &backup_id, &target, &what, &dest, &tx).await],
            Action::Quit => vec![],
            other => crate::tui::policies::perform(&client, other).await,
        };
        for u in updates {
            let _ = tx.send(u).await;
        }
    });
}
