//! Drawing `top`'s screen with ratatui: a header line, the overview's table or a site's
//! view (its figures, generations and workers), the logs pane when open, a message or
//! prompt line, and the keys; the help over everything.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Row, Table, TableState};

use super::rows::{self, Column, WORKER_COLUMNS};
use super::{App, Mode, View};
use crate::cli::render::printable;

/// The keys, one line each, for the help.
const HELP: &[(&str, &str)] = &[
    ("↑ ↓ j k", "select a row (PgUp PgDn g G: further)"),
    ("Enter", "the selected site's view: generations and workers"),
    (
        "Esc",
        "back (closes the logs pane first; clears the filter)",
    ),
    ("s / S", "sort by the next column / reverse the order"),
    ("/", "filter sites by name (Enter keeps it, Esc clears it)"),
    ("r", "restart the site's workers (asks y/n)"),
    (
        "n",
        "scale: type a number of workers or auto, Enter (asks y/n)",
    ),
    ("d", "deploy a new generation from the release (asks y/n)"),
    ("b", "roll back (asks y/n)"),
    ("l", "the site's log, followed (l again closes it)"),
    ("q Ctrl-C", "quit"),
    ("?", "this help (any key closes it)"),
];

/// The key reminder at the bottom.
const KEYS: &str = "q quit  ? help  Enter site  Esc back  s sort  / filter  r restart  n scale  d deploy  b rollback  l logs";

/// Draws the whole screen.
pub(super) fn draw(f: &mut Frame<'_>, app: &App) {
    let logs_height = if app.logs.is_some() { 12 } else { 0 };
    let [header, body, logs, message, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(logs_height),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(header_line(app)).style(reversed()), header);
    match &app.view {
        View::Overview => overview(f, app, body),
        View::Site(site) => site_view(f, app, site, body),
    }
    if let Some(l) = &app.logs {
        let height = usize::from(logs.height.saturating_sub(2));
        let skip = l.lines.len().saturating_sub(height);
        let text: Vec<Line<'_>> = l
            .lines
            .iter()
            .skip(skip)
            .map(|s| Line::raw(printable(s).into_owned()))
            .collect();
        let title = format!(" log of {} (l closes) ", l.site);
        f.render_widget(
            Paragraph::new(text).block(Block::default().borders(Borders::TOP).title(title)),
            logs,
        );
    }
    let prompt = match &app.mode {
        Mode::Filter => Some(format!("filter: {}_", app.filter)),
        Mode::Scale(text) => Some(format!(
            "workers for {} (a number, or auto; Enter, Esc cancels): {text}_",
            app.target().unwrap_or_default()
        )),
        Mode::Confirm(site, action) => Some(format!("{} (y/n)", action.question(site))),
        Mode::Normal | Mode::Help => None,
    };
    match prompt {
        Some(p) => f.render_widget(Paragraph::new(p).style(reversed()), message),
        None => {
            let text = app.message.as_deref().map(printable).unwrap_or_default();
            f.render_widget(Paragraph::new(text.into_owned()), message);
        }
    }
    f.render_widget(
        Paragraph::new(KEYS).style(Style::default().add_modifier(Modifier::DIM)),
        keys,
    );
    if app.mode == Mode::Help {
        help(f);
    }
}

fn reversed() -> Style {
    Style::default().add_modifier(Modifier::REVERSED)
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

/// The first line: the agent, the view, the sort and the filter.
fn header_line(app: &App) -> String {
    let Some(snap) = &app.snapshot else {
        return " hatchery top: waiting for the agent".into();
    };
    let a = &snap.status.agent;
    let every = if snap.interval_ms % 1000 == 0 {
        format!("{}s", snap.interval_ms / 1000)
    } else {
        format!("{}ms", snap.interval_ms)
    };
    let mut line = format!(
        " hatchery top · agent {} pid {} · every {every}",
        a.version, a.pid
    );
    match &app.view {
        View::Overview => {
            let workers: u32 = snap.summaries.iter().map(|s| s.workers).sum();
            line.push_str(&format!(
                " · {} sites, {workers} workers · sort {} {}",
                snap.status.sites.len(),
                app.sort.title(),
                if app.reverse == app.sort.numeric() {
                    "▲"
                } else {
                    "▼"
                }
            ));
            if !app.filter.is_empty() {
                line.push_str(&format!(" · filter \"{}\"", app.filter));
            }
        }
        View::Site(site) => line.push_str(&format!(" · site {site}")),
    }
    printable(&line).into_owned()
}

/// Column widths from the cells (the last one takes the rest).
fn widths(heads: &[&str], cells: &[Vec<String>]) -> Vec<Constraint> {
    let n = heads.len();
    (0..n)
        .map(|i| {
            if i + 1 == n {
                return Constraint::Fill(1);
            }
            let w = cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([heads[i].chars().count()])
                .max()
                .unwrap_or(0);
            Constraint::Length(u16::try_from(w).unwrap_or(u16::MAX))
        })
        .collect()
}

/// A table of `cells` under `heads`, numbers to the right, the row `selected` marked.
fn table(
    f: &mut Frame<'_>,
    area: Rect,
    heads: &[&str],
    numeric: &[bool],
    cells: Vec<Vec<String>>,
    selected: Option<usize>,
) {
    let constraints = widths(heads, &cells);
    let align = |i: usize, text: &str| {
        let line = Line::raw(printable(text).into_owned());
        if numeric.get(i).copied().unwrap_or(false) {
            line.right_aligned()
        } else {
            line
        }
    };
    let head = Row::new(heads.iter().enumerate().map(|(i, h)| align(i, h))).style(bold());
    let body: Vec<Row<'_>> = cells
        .iter()
        .map(|r| Row::new(r.iter().enumerate().map(|(i, c)| align(i, c))))
        .collect();
    let mut state = TableState::default().with_selected(selected);
    f.render_stateful_widget(
        Table::new(body, constraints)
            .header(head)
            .column_spacing(2)
            .row_highlight_style(reversed()),
        area,
        &mut state,
    );
}

/// Every site.
fn overview(f: &mut Frame<'_>, app: &App, area: Rect) {
    let rows = app.site_rows();
    let selected = (!rows.is_empty()).then(|| app.overview_index(&rows));
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| Column::ALL.iter().map(|c| r.cell(*c, false)).collect())
        .collect();
    let heads: Vec<&str> = Column::ALL
        .iter()
        .map(|c| {
            // The sort column's heading is marked.
            if *c == app.sort {
                sorted_title(*c)
            } else {
                c.title()
            }
        })
        .collect();
    let numeric: Vec<bool> = Column::ALL.iter().map(|c| c.numeric()).collect();
    if cells.is_empty() && app.snapshot.is_some() {
        let text = if app.filter.is_empty() {
            "no site to show".to_string()
        } else {
            format!("no site matches \"{}\"", app.filter)
        };
        let [t, rest] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
        table(f, t, &heads, &numeric, Vec::new(), None);
        f.render_widget(Paragraph::new(printable(&text).into_owned()), rest);
        return;
    }
    table(f, area, &heads, &numeric, cells, selected);
}

/// A heading marked as the sort column.
fn sorted_title(c: Column) -> &'static str {
    match c {
        Column::Site => "SITE*",
        Column::State => "STATE*",
        Column::Gen => "GEN*",
        Column::Deploy => "DEPLOY*",
        Column::Ready => "READY*",
        Column::Memory => "MEMORY*",
        Column::Oom => "OOM*",
        Column::Restarts => "RESTARTS*",
        Column::Cpu => "CPU%*",
        Column::Pids => "PIDS*",
        Column::Busy => "BUSY*",
        Column::Queue => "QUEUE*",
        Column::Last => "LAST EVENT*",
    }
}

/// One site: its figures, its generations, its workers.
fn site_view(f: &mut Frame<'_>, app: &App, name: &str, area: Rect) {
    let Some(snap) = &app.snapshot else {
        f.render_widget(
            Paragraph::new(format!("site {name}: waiting for the agent")),
            area,
        );
        return;
    };
    let Some(s) = snap.status.sites.first() else {
        f.render_widget(
            Paragraph::new(format!("site {name} is gone (Esc: back to every site)")),
            area,
        );
        return;
    };
    let summary = snap.summaries.first();
    let row = rows::SiteRow::new(s, summary, &app.rates);
    let mut lines = vec![Line::styled(
        format!(
            "{}  {}  gen {}  ready {}/{} (requested {}{})  steering {}",
            s.name,
            row.state,
            row.cell(Column::Gen, false),
            s.ready,
            s.desired,
            s.requested,
            s.capacity
                .as_ref()
                .map(|c| format!(", cap {}", c.workers))
                .unwrap_or_default(),
            s.steering.as_deref().unwrap_or("-"),
        ),
        bold(),
    )];
    lines.push(Line::raw(format!(
        "memory {}  cpu {}%  pids {}  oom kills {}  restarts {}  busy {}  queue {}",
        row.cell(Column::Memory, false),
        row.cell(Column::Cpu, false),
        row.cell(Column::Pids, false),
        row.cell(Column::Oom, false),
        row.cell(Column::Restarts, false),
        row.cell(Column::Busy, false),
        row.cell(Column::Queue, false),
    )));
    if let Some(r) = &s.release {
        lines.push(Line::raw(format!("release {}", r.display())));
    }
    if let Some(d) = &s.deploy {
        lines.push(Line::raw(format!(
            "deploy gen-{} → gen-{}: {} (target {}{}){}",
            d.from,
            d.to,
            d.stage,
            d.target,
            d.cap.map(|c| format!(", cap {c}")).unwrap_or_default(),
            d.canary
                .as_ref()
                .map(|c| format!(", canary {c}"))
                .unwrap_or_default()
        )));
    } else if !row.last.is_empty() {
        lines.push(Line::raw(format!("last event: {}", row.last)));
    }
    if let Some(c) = &s.capacity {
        lines.push(Line::raw(format!("cap: {}", c.derivation)));
    }
    if let Some(e) = &s.error {
        lines.push(Line::raw(format!("error: {e}")));
    }
    let info_height = u16::try_from(lines.len()).unwrap_or(1);
    let gens_height = u16::try_from(s.generations.len() + 1).unwrap_or(2);
    let [info, gens, _, workers] = Layout::vertical([
        Constraint::Length(info_height),
        Constraint::Length(gens_height),
        Constraint::Length(1),
        Constraint::Min(2),
    ])
    .areas(area);
    let lines: Vec<Line<'_>> = lines
        .into_iter()
        .map(|l| {
            let text: String = l.spans.iter().map(|s| s.content.as_ref()).collect();
            Line::styled(printable(&text).into_owned(), l.style)
        })
        .collect();
    f.render_widget(Paragraph::new(lines), info);
    let gen_cells: Vec<Vec<String>> = s
        .generations
        .iter()
        .map(|g| {
            vec![
                format!("gen-{}", g.id),
                g.state.clone(),
                format!("{}/{}", g.ready, g.desired),
                g.live.to_string(),
                g.crashes.to_string(),
                g.share.clone().unwrap_or_else(|| "-".into()),
                g.release
                    .as_ref()
                    .map(|r| r.display().to_string())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table(
        f,
        gens,
        &[
            "GENERATION",
            "STATE",
            "READY",
            "LIVE",
            "CRASHES",
            "SHARE",
            "RELEASE",
        ],
        &[false, false, true, true, true, true, false],
        gen_cells,
        None,
    );
    let cells: Vec<Vec<String>> = rows::worker_cells(s, &app.rates, false)
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    let selected = (!cells.is_empty()).then_some(app.selected);
    table(
        f,
        workers,
        &WORKER_COLUMNS,
        &[false, true, false, true, true, false, true, true, false],
        cells,
        selected,
    );
}

/// The keys, over everything.
fn help(f: &mut Frame<'_>) {
    let area = f.area();
    let width = area.width.min(78);
    let height = area
        .height
        .min(u16::try_from(HELP.len() + 2).unwrap_or(u16::MAX));
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    let lines: Vec<Line<'_>> = HELP
        .iter()
        .map(|(k, what)| Line::raw(format!("{k:>9}  {what}")))
        .collect();
    f.render_widget(Clear, popup);
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" keys of hatchery top ")),
        popup,
    );
}
