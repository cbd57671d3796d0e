//! Every key binding of the console, one table per mode. Lookups and the help overlay both
//! read these tables, so the help can never list a key that does not work, or miss one.

use crate::strings;
use crate::view::View;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// What a key asks for. The app decides what it means in the current view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Quit,
    NextView,
    PrevView,
    Go(View),
    Up,
    Down,
    Top,
    Bottom,
    Enter,
    Back,
    Start,
    Cancel,
    Filter,
    Help,
    /// Browse the files of the selected point.
    Browse,
    // File browser.
    Get,
    // Policies view.
    RunNow,
    ToggleEnabled,
    Protect,
    PrunePreview,
    PrevItem,
    NextItem,
    // Filter input.
    Type(char),
    Erase,
    KeepFilter,
    ClearFilter,
    // Start dialog.
    Full,
    Incremental,
    ToggleType,
    // Confirmations and closing dialogs.
    Yes,
    No,
    Close,
}

/// One line of the help: the keys, what they do, and the command they send.
#[derive(Debug)]
pub struct Binding {
    pub keys: &'static [KeyCode],
    pub command: Command,
    pub help: &'static str,
}

const fn b(keys: &'static [KeyCode], command: Command, help: &'static str) -> Binding {
    Binding {
        keys,
        command,
        help,
    }
}

/// Keys of the main screen (every view).
pub static MAIN: &[Binding] = &[
    b(&[KeyCode::Tab], Command::NextView, strings::HELP_NEXT_VIEW),
    b(
        &[KeyCode::BackTab],
        Command::PrevView,
        strings::HELP_PREV_VIEW,
    ),
    b(
        &[KeyCode::Char('1')],
        Command::Go(View::Jobs),
        strings::VIEW_JOBS,
    ),
    b(
        &[KeyCode::Char('2')],
        Command::Go(View::Vms),
        strings::VIEW_VMS,
    ),
    b(
        &[KeyCode::Char('3')],
        Command::Go(View::Ports),
        strings::VIEW_PORTS,
    ),
    b(
        &[KeyCode::Char('4')],
        Command::Go(View::Tunnel),
        strings::VIEW_TUNNEL,
    ),
    b(
        &[KeyCode::Char('5')],
        Command::Go(View::Processes),
        strings::VIEW_PROCESSES,
    ),
    b(
        &[KeyCode::Char('6')],
        Command::Go(View::Events),
        strings::VIEW_EVENTS,
    ),
    b(
        &[KeyCode::Char('7')],
        Command::Go(View::Policies),
        strings::VIEW_POLICIES,
    ),
    b(
        &[KeyCode::Char('k'), KeyCode::Up],
        Command::Up,
        strings::HELP_UP,
    ),
    b(
        &[KeyCode::Char('j'), KeyCode::Down],
        Command::Down,
        strings::HELP_DOWN,
    ),
    b(
        &[KeyCode::Char('g'), KeyCode::Home],
        Command::Top,
        strings::HELP_TOP,
    ),
    b(
        &[KeyCode::Char('G'), KeyCode::End],
        Command::Bottom,
        strings::HELP_BOTTOM,
    ),
    b(&[KeyCode::Enter], Command::Enter, strings::HELP_ENTER),
    b(&[KeyCode::Esc], Command::Back, strings::HELP_BACK),
    b(&[KeyCode::Char('s')], Command::Start, strings::HELP_START),
    b(&[KeyCode::Char('c')], Command::Cancel, strings::HELP_CANCEL),
    b(&[KeyCode::Char('f')], Command::Browse, strings::HELP_BROWSE),
    b(&[KeyCode::Char('/')], Command::Filter, strings::HELP_FILTER),
    b(&[KeyCode::Char('?')], Command::Help, strings::HELP_HELP),
    b(&[KeyCode::Char('q')], Command::Quit, strings::HELP_QUIT),
];

/// Keys of the Policies view and its detail, looked up with [`MAIN`] (one table of the main
/// screen, listed in a section of its own in the help).
pub static POLICIES: &[Binding] = &[
    b(
        &[KeyCode::Char('r')],
        Command::RunNow,
        strings::HELP_RUN_NOW,
    ),
    b(
        &[KeyCode::Char('e')],
        Command::ToggleEnabled,
        strings::HELP_TOGGLE_ENABLED,
    ),
    b(
        &[KeyCode::Char('h'), KeyCode::Char('l')],
        Command::NextItem,
        strings::HELP_PREV_NEXT_VM,
    ),
    b(
        &[KeyCode::Char('p')],
        Command::Protect,
        strings::HELP_PROTECT,
    ),
    b(
        &[KeyCode::Char('x')],
        Command::PrunePreview,
        strings::HELP_PRUNE,
    ),
];

/// Keys while typing a filter (any other character is typed into it).
pub static FILTER: &[Binding] = &[
    b(
        &[KeyCode::Enter],
        Command::KeepFilter,
        strings::HELP_FILTER_KEEP,
    ),
    b(
        &[KeyCode::Esc],
        Command::ClearFilter,
        strings::HELP_FILTER_CLEAR,
    ),
    b(
        &[KeyCode::Backspace],
        Command::Erase,
        strings::HELP_BACKSPACE,
    ),
];

/// Keys of the start dialog.
pub static START: &[Binding] = &[
    b(&[KeyCode::Char('f')], Command::Full, strings::HELP_FULL),
    b(
        &[KeyCode::Char('i')],
        Command::Incremental,
        strings::HELP_INCREMENTAL,
    ),
    b(
        &[KeyCode::Char('t'), KeyCode::Left, KeyCode::Right],
        Command::ToggleType,
        strings::HELP_TOGGLE,
    ),
    b(
        &[
            KeyCode::Char('j'),
            KeyCode::Char('k'),
            KeyCode::Down,
            KeyCode::Up,
        ],
        Command::Down,
        strings::HELP_REPO,
    ),
    b(&[KeyCode::Enter], Command::Enter, strings::HELP_NEXT),
    b(
        &[KeyCode::Esc, KeyCode::Char('q')],
        Command::Close,
        strings::HELP_CLOSE,
    ),
];

/// Keys of the file browser (its status line is drawn from this table).
pub static FILES: &[Binding] = &[
    b(&[KeyCode::Enter], Command::Enter, strings::HELP_FILES_OPEN),
    b(
        &[KeyCode::Backspace],
        Command::Erase,
        strings::HELP_FILES_UP,
    ),
    b(&[KeyCode::Char('g')], Command::Get, strings::HELP_FILES_GET),
    b(
        &[KeyCode::Char('j'), KeyCode::Down],
        Command::Down,
        strings::HELP_DOWN,
    ),
    b(
        &[KeyCode::Char('k'), KeyCode::Up],
        Command::Up,
        strings::HELP_UP,
    ),
    b(&[KeyCode::Home], Command::Top, strings::HELP_TOP),
    b(&[KeyCode::End], Command::Bottom, strings::HELP_BOTTOM),
    b(
        &[KeyCode::Esc, KeyCode::Char('q')],
        Command::Close,
        strings::HELP_FILES_CLOSE,
    ),
];

/// Keys of a one-line prompt (any other character is typed into it).
pub static PROMPT: &[Binding] = &[
    b(&[KeyCode::Enter], Command::Enter, strings::HELP_PROMPT_OK),
    b(&[KeyCode::Esc], Command::Close, strings::HELP_PROMPT_CANCEL),
    b(
        &[KeyCode::Backspace],
        Command::Erase,
        strings::HELP_BACKSPACE,
    ),
];

/// Keys of a y/n confirmation.
pub static CONFIRM: &[Binding] = &[
    b(
        &[KeyCode::Char('y'), KeyCode::Char('Y')],
        Command::Yes,
        strings::HELP_YES,
    ),
    b(
        &[KeyCode::Char('n'), KeyCode::Char('N'), KeyCode::Esc],
        Command::No,
        strings::HELP_NO,
    ),
];

/// Keys of the help overlay.
pub static HELP: &[Binding] = &[b(
    &[KeyCode::Char('?'), KeyCode::Esc, KeyCode::Char('q')],
    Command::Close,
    strings::HELP_CLOSE,
)];

/// Which table applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keymap {
    Main,
    Filter,
    Start,
    Confirm,
    Help,
    Files,
    Prompt,
}

impl Keymap {
    /// Every table the keys of this map are looked up in.
    pub fn tables(self) -> &'static [&'static [Binding]] {
        static MAIN_TABLES: [&[Binding]; 2] = [MAIN, POLICIES];
        static FILTER_TABLES: [&[Binding]; 1] = [FILTER];
        static START_TABLES: [&[Binding]; 1] = [START];
        static CONFIRM_TABLES: [&[Binding]; 1] = [CONFIRM];
        static HELP_TABLES: [&[Binding]; 1] = [HELP];
        static FILES_TABLES: [&[Binding]; 1] = [FILES];
        static PROMPT_TABLES: [&[Binding]; 1] = [PROMPT];
        match self {
            Keymap::Main => &MAIN_TABLES,
            Keymap::Filter => &FILTER_TABLES,
            Keymap::Start => &START_TABLES,
            Keymap::Confirm => &CONFIRM_TABLES,
            Keymap::Help => &HELP_TABLES,
            Keymap::Files => &FILES_TABLES,
            Keymap::Prompt => &PROMPT_TABLES,
        }
    }

    /// The first table of the map (the help lists [`POLICIES`] in a section of its own).
    pub fn bindings(self) -> &'static [Binding] {
        match self {
            Keymap::Main => MAIN,
            Keymap::Filter => FILTER,
            Keymap::Start => START,
            Keymap::Confirm => CONFIRM,
            Keymap::Help => HELP,
            Keymap::Files => FILES,
            Keymap::Prompt => PROMPT,
        }
    }
}

/// The command a key sends in `map`, if any. Ctrl-C quits from anywhere.
pub fn command(map: Keymap, key: KeyEvent) -> Option<Command> {
    if key.modifiers.contains(KeyModifiers::CONTROL) {
        return (key.code == KeyCode::Char('c')).then_some(Command::Quit);
    }
    if map == Keymap::Start {
        // j/Down and k/Up share a help line but move in opposite directions.
        match key.code {
            KeyCode::Char('k') | KeyCode::Up => return Some(Command::Up),
            KeyCode::Char('j') | KeyCode::Down => return Some(Command::Down),
            _ => {}
        }
    }
    if map == Keymap::Main {
        // h and l share a help line but go opposite ways.
        if key.code == KeyCode::Char('h') {
            return Some(Command::PrevItem);
        }
    }
    let found = map
        .tables()
        .iter()
        .flat_map(|t| t.iter())
        .find(|b| b.keys.contains(&key.code))
        .map(|b| b.command);
    match (found, map, key.code) {
        (None, Keymap::Filter | Keymap::Prompt, KeyCode::Char(c)) => Some(Command::Type(c)),
        (found, _, _) => found,
    }
}

/// How a key is written in the help: `Tab`, `↑`, `j`.
pub fn label(code: &KeyCode) -> String {
    match code {
        KeyCode::Char(c) => c.to_string(),
        KeyCode::Tab => "Tab".into(),
        KeyCode::BackTab => "S-Tab".into(),
        KeyCode::Up => "↑".into(),
        KeyCode::Down => "↓".into(),
        KeyCode::Left => "←".into(),
        KeyCode::Right => "→".into(),
        KeyCode::Home => "Home".into(),
        KeyCode::End => "End".into(),
        KeyCode::Enter => "Enter".into(),
        KeyCode::Esc => "Esc".into(),
        KeyCode::Backspace => "Bksp".into(),
        other => format!("{other:?}"),
    }
}

/// All keys of a binding, e.g. `k/↑`.
pub fn keys_label(binding: &Binding) -> String {
    binding.keys.iter().map(label).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn no_key_is_bound_twice_in_one_table() {
        for map in [
            Keymap::Main,
            Keymap::Filter,
            Keymap::Start,
            Keymap::Confirm,
            Keymap::Help,
            Keymap::Files,
            Keymap::Prompt,
        ] {
            let mut seen = Vec::new();
            for binding in map.tables().iter().flat_map(|t| t.iter()) {
                for k in binding.keys {
                    assert!(!seen.contains(k), "{map:?}: {k:?} bound twice");
                    seen.push(*k);
                }
            }
        }
    }

    #[test]
    fn filter_types_letters_that_are_commands_elsewhere() {
        assert_eq!(
            command(Keymap::Filter, key(KeyCode::Char('q'))),
            Some(Command::Type('q'))
        );
        assert_eq!(
            command(Keymap::Main, key(KeyCode::Char('q'))),
            Some(Command::Quit)
        );
        assert_eq!(
            command(
                Keymap::Filter,
                KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)
            ),
            Some(Command::Quit)
        );
    }

    #[test]
    fn policies_keys_work_from_the_main_screen_and_h_l_go_both_ways() {
        assert_eq!(
            command(Keymap::Main, key(KeyCode::Char('x'))),
            Some(Command::PrunePreview)
        );
        assert_eq!(
            command(Keymap::Main, key(KeyCode::Char('h'))),
            Some(Command::PrevItem)
        );
        assert_eq!(
            command(Keymap::Main, key(KeyCode::Char('l'))),
            Some(Command::NextItem)
        );
        assert_eq!(
            command(Keymap::Main, key(KeyCode::Char('7'))),
            Some(Command::Go(View::Policies))
        );
    }

    #[test]
    fn start_dialog_moves_both_ways() {
        assert_eq!(
            command(Keymap::Start, key(KeyCode::Char('k'))),
            Some(Command::Up)
        );
        assert_eq!(
            command(Keymap::Start, key(KeyCode::Down)),
            Some(Command::Down)
        );
    }
}
