//! What the operator commands print: aligned columns that fit the terminal (80 columns
//! when stdout is not one), truncated with `…`; text escaped so that no raw control
//! character from a payload, a reason or a stderr tail ever reaches a terminal; JSON
//! helpers that stay binary-safe; and colour only on a terminal without `NO_COLOR`.

use std::io::{IsTerminal, Write};

use serde_json::{Map, Value as Json};

/// Writes one line to stderr. Unlike `eprintln!` it never panics (a closed pipe is
/// ignored: there is no one left to tell).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use note;

/// Width used when stdout is not a terminal and `COLUMNS` is unset.
pub(crate) const DEFAULT_WIDTH: usize = 80;

/// Escapes bytes for display: printable text stays as it is; invalid UTF-8 bytes become
/// `\xNN`; `\n`, `\r`, `\t`, `\\` and `\e` are spelled so; other control characters
/// (C0, DEL, C1) become `\xNN` or `\u{NN}`; characters that reorder or hide text
/// (bidi overrides, zero-width marks) become `\u{NNNN}`.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_escaped(&mut out, c);
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\\' => out.push_str("\\\\"),
        '\u{1b}' => out.push_str("\\e"),
        c if (c as u32) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\x{:02x}", c as u32)),
        c if is_hidden(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        c => out.push(c),
    }
}

/// C1 controls and the format characters that can make a line read differently from
/// what it contains.
fn is_hidden(c: char) -> bool {
    matches!(c as u32,
        0x80..=0x9f | 0x200b..=0x200f | 0x202a..=0x202e | 0x2060..=0x2069 | 0xfeff)
}

/// The first line of `bytes`, escaped (for stderr tails in one-line listings).
pub(crate) fn first_line(bytes: &[u8]) -> String {
    let trimmed = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&[][..], |start| &bytes[start..]);
    let line = trimmed.split(|b| *b == b'\n').next().unwrap_or_default();
    escape(line.strip_suffix(b"\r").unwrap_or(line))
}

/// `s` cut to at most `width` characters, the last one `…` when something was cut.
pub(crate) fn fit(s: &str, width: usize) -> String {
    let count = s.chars().count();
    if count <= width {
        return s.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(width - 1).collect();
    out.push('…');
    out
}

/// How wide the output may be: `COLUMNS`, else the terminal's width, else 80.
pub(crate) fn width() -> usize {
    if let Some(cols) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|c| *c >= 20)
    {
        return cols;
    }
    terminal_width().unwrap_or(DEFAULT_WIDTH)
}

fn terminal_width() -> Option<usize> {
    use nix::libc;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass, which lives
    // across the call; fd 1 is a terminal (checked above), any other outcome is an
    // error return that leaves the struct untouched.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col >= 20).then_some(usize::from(size.ws_col))
}

/// Whether to colour stdout: a terminal, and `NO_COLOR` unset or empty.
pub(crate) fn colour_stdout() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Colours used in human output (empty strings when colour is off).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    pub(crate) bold: &'static str,
    pub(crate) dim: &'static str,
    pub(crate) red: &'static str,
    pub(crate) reset: &'static str,
}

impl Style {
    pub(crate) fn new(colour: bool) -> Style {
        if colour {
            Style {
                bold: "\u{1b}[1m",
                dim: "\u{1b}[2m",
                red: "\u{1b}[31m",
                reset: "\u{1b}[0m",
            }
        } else {
            Style {
                bold: "",
                dim: "",
                red: "",
                reset: "",
            }
        }
    }

    pub(crate) fn for_stdout() -> Style {
        Style::new(colour_stdout())
    }
}

/// One column of a [`Table`].
#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub(crate) title: &'static str,
    /// Flexible columns give up width (truncated with `…`) when the line is too long.
    pub(crate) flex: bool,
    /// Right-aligned (numbers).
    pub(crate) right: bool,
    /// Colour of the cells.
    pub(crate) colour: &'static str,
}

impl Column {
    pub(crate) fn fixed(title: &'static str) -> Column {
        Column {
            title,
            flex: false,
            right: false,
            colour: "",
        }
    }

    pub(crate) fn flex(title: &'static str) -> Column {
        Column {
            flex: true,
            ..Column::fixed(title)
        }
    }

    pub(crate) fn number(title: &'static str) -> Column {
        Column {
            right: true,
            ..Column::fixed(title)
        }
    }

    pub(crate) fn coloured(mut self, colour: &'static str) -> Column {
        self.colour = colour;
        self
    }
}

/// Columns aligned to the widest cell, shrunk to fit a width. Cells must already be
/// escaped (no control characters).
#[derive(Debug)]
pub(crate) struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
}

/// Narrowest a flexible column gets before the line is allowed to overflow.
const MIN_FLEX: usize = 6;

impl Table {
    pub(crate) fn new(columns: Vec<Column>) -> Table {
        Table {
            columns,
            rows: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Drops the rows (keeps the columns).
    pub(crate) fn clear(&mut self) {
        self.rows.clear();
    }

    /// Column widths that fit `width`: flexible columns shrink, widest first.
    pub(crate) fn widths(&self, width: usize) -> Vec<usize> {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, col)| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .chain([col.title.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let gaps = self.columns.len().saturating_sub(1);
        loop {
            let total: usize = widths.iter().sum::<usize>() + gaps;
            if total <= width {
                break;
            }
            let widest = (0..widths.len())
                .filter(|&i| self.columns[i].flex && widths[i] > MIN_FLEX)
                .max_by_key(|&i| widths[i]);
            match widest {
                Some(i) => widths[i] -= 1,
                None => break,
            }
        }
        widths
    }

    /// Writes the header and the rows, fitted to `width`.
    pub(crate) fn render(
        &self,
        out: &mut impl Write,
        width: usize,
        style: Style,
    ) -> std::io::Result<()> {
        let widths = self.widths(width);
        self.render_with(out, &widths, true, style)
    }

    /// Writes the rows (and the header if `header`) with the given column widths.
    pub(crate) fn render_with(
        &self,
        out: &mut impl Write,
        widths: &[usize],
        header: bool,
        style: Style,
    ) -> std::io::Result<()> {
        if header {
            let titles: Vec<String> = self.columns.iter().map(|c| c.title.to_owned()).collect();
            self.line(out, &titles, widths, Some(style.bold), style)?;
        }
        for row in &self.rows {
            self.line(out, row, widths, None, style)?;
        }
        Ok(())
    }

    fn line(
        &self,
        out: &mut impl Write,
        cells: &[String],
        widths: &[usize],
        colour: Option<&'static str>,
        style: Style,
    ) -> std::io::Result<()> {
        let mut line = String::new();
        let last = self.columns.len().saturating_sub(1);
        for (i, col) in self.columns.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let cell = fit(cells.get(i).map_or("", String::as_str), w);
            let pad = w.saturating_sub(cell.chars().count());
            let colour = colour.unwrap_or(col.colour);
            if i > 0 {
                line.push(' ');
            }
            if col.right {
                line.push_str(&" ".repeat(pad));
            }
            let coloured = !colour.is_empty() && !cell.is_empty();
            if coloured {
                line.push_str(colour);
            }
            line.push_str(&cell);
            if coloured {
                line.push_str(style.reset);
            }
            if !col.right && i < last {
                line.push_str(&" ".repeat(pad));
            }
        }
        writeln!(out, "{}", line.trim_end())
    }
}

/// `1 entry`, `3 entries`.
pub(crate) fn entries(n: u64) -> String {
    if n == 1 {
        "1 entry".to_owned()
    } else {
        format!("{n} entries")
    }
}

/// Standard base64 with padding (binary values in JSON output).
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Puts `bytes` into `obj` as `key` (a string) when it is UTF-8, else as `key_base64`.
pub(crate) fn put_bytes(obj: &mut Map<String, Json>, key: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => obj.insert(key.to_owned(), Json::String(text.to_owned())),
        Err(_) => obj.insert(format!("{key}_base64"), Json::String(base64(bytes))),
    };
}

/// Writes one JSON object as one line.
pub(crate) fn json_line(out: &mut impl Write, value: &Json) -> std::io::Result<()> {
    writeln!(out, "{value}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_never_lets_control_characters_through() {
        assert_eq!(escape(b"plain text"), "plain text");
        assert_eq!(escape(b"a\nb\tc\r\\"), "a\\nb\\tc\\r\\\\");
        assert_eq!(escape(b"\x1b[31mred"), "\\e[31mred");
        assert_eq!(escape(&[0, 7, 0x7f, 0xff, b'x']), "\\x00\\x07\\x7f\\xffx");
        assert_eq!(
            escape("caf\u{e9} \u{202e}txt".as_bytes()),
            "caf\u{e9} \\u{202e}txt"
        );
        assert_eq!(escape("\u{85}".as_bytes()), "\\u{85}");
        let all: Vec<u8> = (0..=255).collect();
        assert!(!escape(&all).chars().any(|c| c.is_control()));
    }

    #[test]
    fn first_line_of_stderr() {
        assert_eq!(first_line(b"\n  boom: failed\nmore\n"), "boom: failed");
        assert_eq!(first_line(b"one\r\ntwo"), "one");
        assert_eq!(first_line(b""), "");
    }

    #[test]
    fn fit_counts_characters_not_bytes() {
        assert_eq!(fit("héllo wörld", 5), "héll…");
        assert_eq!(fit("short", 10), "short");
        assert_eq!(fit("abc", 0), "");
        assert_eq!(fit("日本語テキスト", 3), "日本…");
    }

    #[test]
    fn table_fits_width_by_shrinking_flexible_columns() {
        let mut t = Table::new(vec![
            Column::fixed("ID"),
            Column::flex("REASON"),
            Column::number("N"),
            Column::flex("PAYLOAD"),
        ]);
        t.push(vec![
            "1700000000000-0".into(),
            "exit code 3 because of a very long explanation here".into(),
            "12".into(),
            "x".repeat(100),
        ]);
        let mut out = Vec::new();
        t.render(&mut out, 80, Style::new(false)).expect("render");
        let text = String::from_utf8(out).expect("utf-8");
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
        assert!(text.contains("1700000000000-0"));
        assert!(text.contains('…'));
        let mut wide = Vec::new();
        t.render(&mut wide, 300, Style::new(false)).expect("render");
        assert!(!String::from_utf8(wide).expect("utf-8").contains('…'));
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0x00, 0x80]), "/wCA");
    }
}
