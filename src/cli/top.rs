//! `hatchery top`: a live full-screen view of the sites, redrawn from a `watch`
//! subscription (the agent pushes a snapshot every interval; this side never polls).
//!
//! Without a terminal on stdout it prints one snapshot as plain text (`--json`: as JSON)
//! and exits. On a terminal it runs one loop over one channel fed by small threads:
//! terminal input (keys, resizes), the subscription's snapshots, a `logs -f` stream for
//! the logs pane, and the answer of an action (restart, scale, deploy, rollback) run on
//! a connection of its own so the screen keeps moving while it runs. Changing views
//! (overview, one site with its workers) replaces the subscription; a lost one is
//! opened again every second. The terminal is restored on exit, on a panic, and on
//! `SIGTERM`, `SIGHUP` or `SIGINT` (blocked in every thread of `top` and read by one of
//! them, which tells the loop; `top` then exits with 128 + the signal's number).

mod draw;
pub mod rows;

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use hatchery::control::{Client, Done, ErrorReply, Reply, Request, ScaleTo, Snapshot};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};

use self::rows::{Column, Rates};

/// Why `top` could not run; the CLI maps these to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The agent could not be reached.
    #[error("cannot reach the agent at {path}")]
    Unreachable {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The agent refused the subscription.
    #[error("{}", .0.message)]
    Refused(ErrorReply),
    /// The connection or the terminal failed.
    #[error("top failed")]
    Io(#[from] io::Error),
    /// `SIGTERM`, `SIGHUP` or `SIGINT` came: the terminal was given back.
    #[error("stopped by signal {0}")]
    Signalled(i32),
}

/// The signals that end `top` with the terminal given back.
const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT];

/// What `hatchery top` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The agent's control socket.
    pub socket: PathBuf,
    /// Open on this site's view.
    pub site: Option<String>,
    /// Milliseconds between snapshots.
    pub interval_ms: u64,
    /// Print one snapshot as JSON.
    pub json: bool,
}

/// Runs `top`: the full-screen view on a terminal, else one snapshot printed.
pub fn run(opts: &Options) -> Result<(), TopError> {
    let tty =
        io::IsTerminal::is_terminal(&io::stdout()) && io::IsTerminal::is_terminal(&io::stdin());
    if opts.json || !tty {
        return once(opts);
    }
    let (tx, rx) = mpsc::channel();
    // Before any thread starts, so that every thread has them blocked and none dies of
    // one with the terminal still taken.
    watch_signals(tx.clone())?;
    let mut app = App::new(opts, tx.clone());
    // The first snapshot before the screen is taken: an agent that is not there, or
    // refuses, is said on the plain terminal.
    app.subscribe().map_err(|source| TopError::Unreachable {
        path: opts.socket.display().to_string(),
        source,
    })?;
    match first_reply(&rx)? {
        Reply::Snapshot(s) => app.take_snapshot(*s),
        Reply::Error(e) => return Err(TopError::Refused(e)),
        _ => {}
    }
    let guard = Screen::take()?;
    std::thread::spawn(move || {
        loop {
            let msg = match event::read() {
                Ok(ev) => Msg::Input(ev),
                Err(e) => Msg::InputFailed(e.to_string()),
            };
            let failed = matches!(msg, Msg::InputFailed(_));
            if tx.send(msg).is_err() || failed {
                return;
            }
        }
    });
    let result = app.run(&guard.terminal, &rx);
    drop(guard);
    result
}

/// The first answer on the subscription, or why there is none.
fn first_reply(rx: &Receiver<Msg>) -> Result<Reply, TopError> {
    loop {
        match rx.recv() {
            Ok(Msg::Stream {
                kind: StreamKind::Watch,
                reply,
                ..
            }) => return reply.map_err(|e| TopError::Io(io::Error::other(e))),
            Ok(Msg::Signal(signal)) => return Err(TopError::Signalled(signal)),
            Ok(_) => continue,
            Err(_) => return Err(TopError::Io(io::Error::other("the subscription ended"))),
        }
    }
}

/// One snapshot, printed (no terminal, or `--json`).
fn once(opts: &Options) -> Result<(), TopError> {
    let unreachable = |source| TopError::Unreachable {
        path: opts.socket.display().to_string(),
        source,
    };
    let mut client = Client::connect(&opts.socket).map_err(unreachable)?;
    client.send(&Request::Watch {
        interval_ms: opts.interval_ms,
        site: opts.site.clone(),
    })?;
    loop {
        match client.next_reply()? {
            Some(Reply::Snapshot(s)) => {
                let text = if opts.json {
                    let mut t = serde_json::to_string_pretty(&s).map_err(io::Error::other)?;
                    t.push('\n');
                    t
                } else {
                    rows::plain(&s, &Rates::default(), opts.site.is_some())
                };
                let printable = crate::cli::render::printable(&text);
                io::stdout().write_all(printable.as_bytes())?;
                return Ok(());
            }
            Some(Reply::Error(e)) => return Err(TopError::Refused(e)),
            Some(_) => continue,
            None => {
                return Err(TopError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection without a snapshot",
                )));
            }
        }
    }
}

/// The terminal while `top` has it: raw mode, the alternate screen, no cursor; given
/// back when dropped, and by the panic hook.
struct Screen {
    terminal: std::cell::RefCell<ratatui::Terminal<ratatui::backend::CrosstermBackend<io::Stdout>>>,
}

impl Screen {
    fn take() -> io::Result<Screen> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        terminal::enable_raw_mode()?;
        let entered = execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide);
        let terminal = entered.and_then(|()| {
            ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(io::stdout()))
        });
        match terminal {
            Ok(t) => Ok(Screen {
                terminal: std::cell::RefCell::new(t),
            }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Gives the terminal back as it was: cooked mode, the main screen, the cursor.
fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
}

/// Blocks [`STOP_SIGNALS`] in this thread (and so in every thread it starts from now on)
/// and starts a thread that reads them from a signalfd and sends them to the loop.
fn watch_signals(tx: Sender<Msg>) -> io::Result<()> {
    use hatchery::process as signals;
    let set = signals::SigSet::of(&STOP_SIGNALS);
    signals::block_signals(&set)?;
    let fd = signals::signalfd(&set)?;
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        loop {
            let mut pfd = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut pfd, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(_) => return,
            }
            match signals::read_signal(fd.as_fd()) {
                Ok(Some(signal)) => {
                    if tx.send(Msg::Signal(signal)).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(_) => return,
            }
        }
    });
    Ok(())
}

/// What the loop hears.
#[derive(Debug)]
enum Msg {
    /// One of [`STOP_SIGNALS`] came.
    Signal(i32),
    /// A key or a resize.
    Input(Event),
    /// The terminal's input failed.
    InputFailed(String),
    /// A line on a stream (`Err`: it ended, and why).
    Stream {
        kind: StreamKind,
        id: u64,
        reply: Result<Reply, String>,
    },
    /// A progress line of the action under way.
    ActionProgress(String),
    /// The action's end: the agent's answer, in words.
    ActionDone(String),
}

/// Which stream a line came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    /// The subscription.
    Watch,
    /// The logs pane.
    Logs,
}

/// A request whose answer streams in on a thread; dropped, its connection is shut down,
/// which ends the thread.
struct Stream {
    id: u64,
    conn: UnixStream,
}

impl Stream {
    fn open(
        socket: &Path,
        req: &Request,
        kind: StreamKind,
        id: u64,
        tx: Sender<Msg>,
    ) -> io::Result<Stream> {
        let mut conn = UnixStream::connect(socket)?;
        let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
        line.push(b'\n');
        conn.write_all(&line)?;
        let reader = BufReader::new(conn.try_clone()?);
        std::thread::spawn(move || {
            for line in reader.lines() {
                let reply = match line {
                    Ok(l) => serde_json::from_str::<Reply>(&l).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let end = reply.is_err();
                if tx.send(Msg::Stream { kind, id, reply }).is_err() || end {
                    return;
                }
            }
            let _ = tx.send(Msg::Stream {
                kind,
                id,
                reply: Err("the agent closed the connection".into()),
            });
        });
        Ok(Stream { id, conn })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.conn.shutdown(Shutdown::Both);
    }
}

/// An operation on a site, asked with a confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `restart`.
    Restart,
    /// `scale`.
    Scale(ScaleTo),
    /// `deploy` (the release symlink's target).
    Deploy,
    /// `rollback`.
    Rollback,
}

impl Action {
    /// The question asked before it.
    fn question(&self, site: &str) -> String {
        match self {
            Action::Restart => format!("Restart every worker of {site}?"),
            Action::Scale(ScaleTo::Count(n)) => format!("Scale {site} to {n} workers?"),
            Action::Scale(ScaleTo::Auto) => format!("Let {site}'s load decide its workers?"),
            Action::Deploy => format!("Deploy a new generation of {site}?"),
            Action::Rollback => format!("Roll {site} back?"),
        }
    }

    /// Its name.
    fn verb(&self) -> &'static str {
        match self {
            Action::Restart => "restart",
            Action::Scale(_) => "scale",
            Action::Deploy => "deploy",
            Action::Rollback => "rollback",
        }
    }

    /// Its request.
    fn request(&self, site: &str) -> Request {
        let site = site.to_string();
        match self {
            Action::Restart => Request::Restart { site },
            Action::Scale(workers) => Request::Scale {
                site,
                workers: *workers,
            },
            Action::Deploy => Request::Deploy {
                site,
                release: None,
                canary: None,
            },
            Action::Rollback => Request::Rollback { site },
        }
    }
}

/// What keys do now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Navigation and commands.
    Normal,
    /// Typing the filter.
    Filter,
    /// Typing a number of workers.
    Scale(String),
    /// Waiting for y or n.
    Confirm(String, Action),
    /// The help over everything.
    Help,
}

/// Which view.
#[derive(Debug, Clone, PartialEq, Eq)]
enum View {
    /// Every site.
    Overview,
    /// One site and its workers.
    Site(String),
}

/// The logs pane: a site's last lines, followed.
struct Logs {
    site: String,
    lines: VecDeque<String>,
    stream: Option<Stream>,
}

/// Lines the logs pane keeps.
const LOG_LINES: usize = 500;

/// The state of the screen.
struct App {
    socket: PathBuf,
    interval_ms: u64,
    tx: Sender<Msg>,
    view: View,
    snapshot: Option<Snapshot>,
    rates: Rates,
    sort: Column,
    reverse: bool,
    filter: String,
    mode: Mode,
    /// The worker selected in a site's view.
    selected: usize,
    /// The site selected in the overview, kept across re-sorting.
    selected_site: Option<String>,
    message: Option<String>,
    /// An action is under way.
    acting: Option<(String, Action)>,
    logs: Option<Logs>,
    watch: Option<Stream>,
    next_stream: u64,
    /// When a lost subscription is tried again.
    reconnect_at: Option<Instant>,
    quit: bool,
}

impl App {
    fn new(opts: &Options, tx: Sender<Msg>) -> App {
        App {
            socket: opts.socket.clone(),
            interval_ms: opts.interval_ms,
            tx,
            view: opts.site.clone().map_or(View::Overview, View::Site),
            snapshot: None,
            rates: Rates::default(),
            sort: Column::Site,
            reverse: false,
            filter: String::new(),
            mode: Mode::Normal,
            selected: 0,
            selected_site: None,
            message: None,
            acting: None,
            logs: None,
            watch: None,
            next_stream: 0,
            reconnect_at: None,
            quit: false,
        }
    }

    /// Opens the subscription of the current view, in place of the previous one.
    fn subscribe(&mut self) -> io::Result<()> {
        self.watch = None;
        self.next_stream += 1;
        let site = match &self.view {
            View::Overview => None,
            View::Site(s) => Some(s.clone()),
        };
        let req = Request::Watch {
            interval_ms: self.interval_ms,
            site,
        };
        let stream = Stream::open(
            &self.socket,
            &req,
            StreamKind::Watch,
            self.next_stream,
            self.tx.clone(),
        )?;
        self.watch = Some(stream);
        Ok(())
    }

    /// Subscribes again (after a change of view, or a lost connection); a failure is
    /// said and tried again in a second.
    fn resubscribe(&mut self) {
        self.reconnect_at = None;
        if let Err(e) = self.subscribe() {
            self.message = Some(format!(
                "cannot reach the agent at {}: {e}; trying again",
                self.socket.display()
            ));
            self.reconnect_at = Some(Instant::now() + Duration::from_secs(1));
        }
    }

    fn take_snapshot(&mut self, snap: Snapshot) {
        self.rates.update(&snap);
        self.snapshot = Some(snap);
        self.clamp_selection();
    }

    /// The loop: draw, wait for something, handle it, until `q`.
    fn run(
        &mut self,
        terminal: &std::cell::RefCell<
            ratatui::Terminal<ratatui::backend::CrosstermBackend<io::Stdout>>,
        >,
        rx: &Receiver<Msg>,
    ) -> Result<(), TopError> {
        loop {
            terminal.borrow_mut().draw(|f| draw::draw(f, self))?;
            let msg = match self.reconnect_at {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                },
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return Ok(()),
                },
            };
            match msg {
                None => self.resubscribe(),
                Some(Msg::InputFailed(e)) => {
                    return Err(TopError::Io(io::Error::other(format!(
                        "failed to read the terminal: {e}"
                    ))));
                }
                Some(Msg::Signal(signal)) => return Err(TopError::Signalled(signal)),
                Some(m) => self.handle(m),
            }
            if self.quit {
                return Ok(());
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Input(Event::Key(key)) if key.kind == KeyEventKind::Press => self.key(key),
            // A resize (or anything else) only redraws; a signal ended the loop before.
            Msg::Input(_) | Msg::InputFailed(_) | Msg::Signal(_) => {}
            Msg::Stream {
                kind: StreamKind::Watch,
                id,
                reply,
            } => {
                if self.watch.as_ref().is_none_or(|w| w.id != id) {
                    return;
                }
                match reply {
                    Ok(Reply::Snapshot(s)) => self.take_snapshot(*s),
                    Ok(Reply::Error(e)) => {
                        self.watch = None;
                        if let View::Site(site) = &self.view {
                            self.message = Some(format!("{site}: {}", e.message));
                            self.view = View::Overview;
                            self.snapshot = None;
                            self.resubscribe();
                        } else {
                            self.message = Some(format!("the agent refused: {}", e.message));
                            self.reconnect_at = Some(Instant::now() + Duration::from_secs(5));
                        }
                    }
                    Ok(_) => {}
                    Err(why) => {
                        self.watch = None;
                        self.message =
                            Some(format!("lost the agent ({why}); trying again every second"));
                        self.reconnect_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            Msg::Stream {
                kind: StreamKind::Logs,
                id,
                reply,
            } => {
                let Some(logs) = self
                    .logs
                    .as_mut()
                    .filter(|l| l.stream.as_ref().is_some_and(|s| s.id == id))
                else {
                    return;
                };
                let line = match reply {
                    Ok(Reply::Line(l)) => l,
                    Ok(Reply::Error(e)) => format!("-- {}", e.message),
                    Ok(_) => return,
                    Err(why) => {
                        logs.stream = None;
                        format!("-- {why}")
                    }
                };
                logs.lines.push_back(line);
                while logs.lines.len() > LOG_LINES {
                    logs.lines.pop_front();
                }
            }
            Msg::ActionProgress(line) => {
                if let Some((site, action)) = &self.acting {
                    self.message = Some(format!("{} {site}: {line}", action.verb()));
                }
            }
            Msg::ActionDone(text) => {
                self.acting = None;
                self.message = Some(text);
            }
        }
    }

    /// The site actions apply to: the one on view, or the one selected.
    fn target(&self) -> Option<String> {
        match &self.view {
            View::Site(s) => Some(s.clone()),
            View::Overview => self.selected_site.clone(),
        }
    }

    fn key(&mut self, key: KeyEvent) {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return;
        }
        match self.mode.clone() {
            Mode::Help => self.mode = Mode::Normal,
            Mode::Filter => match key.code {
                KeyCode::Enter => self.mode = Mode::Normal,
                KeyCode::Esc => {
                    self.filter.clear();
                    self.mode = Mode::Normal;
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) if !c.is_control() => self.filter.push(c),
                _ => {}
            },
            Mode::Scale(mut text) => match key.code {
                KeyCode::Esc => self.mode = Mode::Normal,
                KeyCode::Backspace => {
                    text.pop();
                    self.mode = Mode::Scale(text);
                }
                KeyCode::Char(c) if c.is_ascii_alphanumeric() && text.len() < 8 => {
                    text.push(c);
                    self.mode = Mode::Scale(text);
                }
                KeyCode::Enter => match (text.parse::<ScaleTo>(), self.target()) {
                    (Ok(n), Some(site)) => self.mode = Mode::Confirm(site, Action::Scale(n)),
                    (Err(why), _) => {
                        self.message = Some(why);
                        self.mode = Mode::Normal;
                    }
                    (_, None) => self.mode = Mode::Normal,
                },
                _ => {}
            },
            Mode::Confirm(site, action) => match key.code {
                KeyCode::Char('y' | 'Y') => {
                    self.mode = Mode::Normal;
                    self.act(site, action);
                }
                KeyCode::Char('n' | 'N') | KeyCode::Esc => {
                    self.mode = Mode::Normal;
                    self.message = Some(format!("{} {site}: not done", action.verb()));
                }
                _ => {}
            },
            Mode::Normal => self.normal_key(key),
        }
        self.clamp_selection();
    }

    fn normal_key(&mut self, key: KeyEvent) {
        let ask = |app: &mut App, action: Action| {
            if app.acting.is_some() {
                app.message = Some("an action is under way: wait for its answer".into());
            } else if let Some(site) = app.target() {
                app.mode = Mode::Confirm(site, action);
            } else {
                app.message = Some("no site selected".into());
            }
        };
        match key.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('?') => self.mode = Mode::Help,
            KeyCode::Esc => {
                if self.logs.is_some() {
                    self.logs = None;
                } else if self.view != View::Overview {
                    self.view = View::Overview;
                    self.selected = 0;
                    self.snapshot = None;
                    self.resubscribe();
                } else if !self.filter.is_empty() {
                    self.filter.clear();
                } else {
                    self.message = None;
                }
            }
            KeyCode::Enter => {
                if let (View::Overview, Some(site)) = (&self.view, self.selected_site.clone()) {
                    self.view = View::Site(site);
                    self.selected = 0;
                    self.snapshot = None;
                    self.resubscribe();
                }
            }
            KeyCode::Up | KeyCode::Char('k') => self.move_by(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_by(1),
            KeyCode::PageUp => self.move_by(-10),
            KeyCode::PageDown => self.move_by(10),
            KeyCode::Home | KeyCode::Char('g') => self.move_by(i64::MIN / 2),
            KeyCode::End | KeyCode::Char('G') => self.move_by(i64::MAX / 2),
            KeyCode::Char('s') => self.sort = self.sort.next_sort(),
            KeyCode::Char('S') => self.reverse = !self.reverse,
            KeyCode::Char('/') if self.view == View::Overview => self.mode = Mode::Filter,
            KeyCode::Char('r') => ask(self, Action::Restart),
            KeyCode::Char('d') => ask(self, Action::Deploy),
            KeyCode::Char('b') => ask(self, Action::Rollback),
            KeyCode::Char('n') => {
                if self.acting.is_some() {
                    self.message = Some("an action is under way: wait for its answer".into());
                } else if self.target().is_some() {
                    self.mode = Mode::Scale(String::new());
                }
            }
            KeyCode::Char('l') => self.toggle_logs(),
            _ => {}
        }
    }

    /// Opens the logs pane on the target site (its last lines, then new ones), or
    /// closes it.
    fn toggle_logs(&mut self) {
        if self.logs.take().is_some() {
            return;
        }
        let Some(site) = self.target() else {
            return;
        };
        self.next_stream += 1;
        let req = Request::Logs {
            site: site.clone(),
            lines: 100,
            follow: true,
        };
        let stream = Stream::open(
            &self.socket,
            &req,
            StreamKind::Logs,
            self.next_stream,
            self.tx.clone(),
        );
        let mut lines = VecDeque::new();
        let stream = match stream {
            Ok(s) => Some(s),
            Err(e) => {
                lines.push_back(format!("-- cannot reach the agent: {e}"));
                None
            }
        };
        self.logs = Some(Logs {
            site,
            lines,
            stream,
        });
    }

    /// Runs `action` on `site` on a connection of its own; its progress and answer come
    /// back as messages.
    fn act(&mut self, site: String, action: Action) {
        let req = action.request(&site);
        let socket = self.socket.clone();
        let tx = self.tx.clone();
        let verb = action.verb();
        self.message = Some(format!("{verb} {site}: asked the agent"));
        self.acting = Some((site.clone(), action));
        std::thread::spawn(move || {
            let answer = Client::connect(&socket).and_then(|mut c| {
                c.call(&req, |r| {
                    if let Reply::Event(e) = r {
                        let _ = tx.send(Msg::ActionProgress(e.clone()));
                    }
                })
            });
            let text = match answer {
                Ok(Reply::Ok(v)) => match serde_json::from_value::<Done>(v.clone()) {
                    Ok(done) => format!("{}: {}", done.site, done.message),
                    Err(_) => format!("{verb} {site}: {v}"),
                },
                Ok(Reply::Error(e)) => format!("{verb} {site} failed: {}", e.message),
                Ok(other) => format!("{verb} {site}: {other:?}"),
                Err(e) => format!("{verb} {site}: lost the agent: {e}"),
            };
            let _ = tx.send(Msg::ActionDone(text));
        });
    }

    /// The overview's rows now.
    fn site_rows(&self) -> Vec<rows::SiteRow> {
        self.snapshot.as_ref().map_or_else(Vec::new, |s| {
            rows::site_rows(s, &self.rates, self.sort, self.reverse, &self.filter)
        })
    }

    /// The row selected in the overview (the selected site's).
    fn overview_index(&self, rows: &[rows::SiteRow]) -> usize {
        self.selected_site
            .as_ref()
            .and_then(|n| rows.iter().position(|r| &r.name == n))
            .unwrap_or(0)
    }

    /// Moves the selection `delta` rows, within the rows there are.
    fn move_by(&mut self, delta: i64) {
        let step = |from: usize, len: usize| {
            let to = i64::try_from(from).unwrap_or(0).saturating_add(delta);
            usize::try_from(to.max(0))
                .unwrap_or(0)
                .min(len.saturating_sub(1))
        };
        match &self.view {
            View::Overview => {
                let rows = self.site_rows();
                let to = step(self.overview_index(&rows), rows.len());
                self.selected_site = rows.get(to).map(|r| r.name.clone());
            }
            View::Site(_) => {
                self.selected = step(self.selected, self.worker_count());
            }
        }
    }

    /// Workers in the site view.
    fn worker_count(&self) -> usize {
        self.snapshot
            .as_ref()
            .and_then(|s| s.status.sites.first())
            .map_or(0, |s| s.workers.len())
    }

    /// Keeps the selection on a row that exists: in the overview on the same site
    /// whatever the order (the first one if it is gone).
    fn clamp_selection(&mut self) {
        match &self.view {
            View::Overview => {
                let rows = self.site_rows();
                let i = self.overview_index(&rows);
                self.selected_site = rows.get(i).map(|r| r.name.clone());
            }
            View::Site(_) => {
                self.selected = self.selected.min(self.worker_count().saturating_sub(1));
            }
        }
    }
}
