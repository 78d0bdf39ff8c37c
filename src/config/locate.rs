//! Locating keys in the file: key paths such as `streams[1].env.FOO`, the line each one
//! is on, and the errors that name both (`file:line: key: message`).

use std::path::Path;

use super::ConfigError;

/// The file and its parsed document: turns a key path into a located error.
pub(super) struct Locator<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
    pub(super) doc: &'a toml_edit::Document<&'a str>,
}

impl Locator<'_> {
    fn root(&self) -> Node<'_> {
        Node::from_item(self.doc.as_item())
    }

    /// An error at `key`, or at the nearest enclosing table that exists when the key itself
    /// is missing (so a missing key points at its `[[streams]]` header).
    pub(super) fn invalid(&self, key: &KeyPath, message: impl Into<String>) -> ConfigError {
        let line = span_of(self.root(), &key.0).map_or(1, |s| line_at(self.text, s.start));
        ConfigError::Invalid {
            path: self.file.to_path_buf(),
            line,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// Unknown keys and wrong types: serde gives a span, the document gives the key there.
    pub(super) fn serde_error(&self, err: &toml::de::Error) -> ConfigError {
        let offset = err.span().map(|s| s.start);
        let key = offset
            .and_then(|o| path_at(self.root(), o))
            .map_or_else(|| "(document)".to_string(), |p| KeyPath(p).to_string());
        ConfigError::Invalid {
            path: self.file.to_path_buf(),
            line: offset.map_or(1, |o| line_at(self.text, o)),
            key,
            message: err.message().trim().to_string(),
        }
    }
}

pub(super) fn syntax_error(file: &Path, text: &str, err: &toml_edit::TomlError) -> ConfigError {
    ConfigError::Invalid {
        path: file.to_path_buf(),
        line: err.span().map_or(1, |s| line_at(text, s.start)),
        // A document that does not parse has no key paths to name.
        key: "(syntax)".to_string(),
        message: format!("invalid TOML: {}", err.message().trim()),
    }
}

/// 1-based line of byte `offset`.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

// ---------------------------------------------------------------------------------------
// Key paths and their place in the file.

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `streams[1].env.FOO`.
#[derive(Debug, Clone)]
pub(super) struct KeyPath(Vec<Seg>);

impl KeyPath {
    pub(super) fn new(key: &str) -> KeyPath {
        KeyPath(vec![Seg::Key(key.to_string())])
    }

    pub(super) fn key(&self, key: &str) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Seg::Key(key.to_string()));
        path
    }

    pub(super) fn index(&self, i: usize) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Seg::Index(i));
        path
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(i) => write!(f, "[{i}]")?,
                Seg::Key(k) => {
                    if n > 0 {
                        f.write_str(".")?;
                    }
                    // Quote keys that TOML would need quoted, so `env."A=B"` reads right.
                    if is_bare_key(k) {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A node of the parsed document, with tables, inline tables and arrays seen alike.
#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a toml_edit::Table),
    Inline(&'a toml_edit::InlineTable),
    Tables(&'a toml_edit::ArrayOfTables),
    Array(&'a toml_edit::Array),
    Leaf(&'a toml_edit::Value),
    Empty,
}

type Span = Option<std::ops::Range<usize>>;

impl<'a> Node<'a> {
    fn from_item(item: &'a toml_edit::Item) -> Node<'a> {
        match item {
            toml_edit::Item::None => Node::Empty,
            toml_edit::Item::Value(v) => Node::from_value(v),
            toml_edit::Item::Table(t) => Node::Table(t),
            toml_edit::Item::ArrayOfTables(a) => Node::Tables(a),
        }
    }

    fn from_value(value: &'a toml_edit::Value) -> Node<'a> {
        match value {
            toml_edit::Value::InlineTable(t) => Node::Inline(t),
            toml_edit::Value::Array(a) => Node::Array(a),
            other => Node::Leaf(other),
        }
    }

    fn span(self) -> Span {
        match self {
            Node::Table(t) => t.span(),
            Node::Inline(t) => t.span(),
            Node::Tables(a) => a.span(),
            Node::Array(a) => a.span(),
            Node::Leaf(v) => v.span(),
            Node::Empty => None,
        }
    }

    /// Each child with the span that marks it in the file: its key as written, or for an
    /// array element the element itself (a `[[table]]` header for an array of tables).
    fn children(self) -> Vec<(Seg, Span, Node<'a>)> {
        match self {
            Node::Table(t) => t
                .iter()
                .map(|(k, item)| {
                    let span = t.key(k).and_then(toml_edit::Key::span);
                    (Seg::Key(k.to_string()), span, Node::from_item(item))
                })
                .collect(),
            Node::Inline(t) => t
                .iter()
                .map(|(k, v)| {
                    let span = t.key(k).and_then(toml_edit::Key::span);
                    (Seg::Key(k.to_string()), span, Node::from_value(v))
                })
                .collect(),
            Node::Tables(a) => a
                .iter()
                .enumerate()
                .map(|(i, t)| (Seg::Index(i), t.span(), Node::Table(t)))
                .collect(),
            Node::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (Seg::Index(i), v.span(), Node::from_value(v)))
                .collect(),
            Node::Leaf(_) | Node::Empty => Vec::new(),
        }
    }
}

/// The span of the deepest segment of `path` present in the document: the key itself, or
/// the nearest enclosing table when the key is missing.
fn span_of(root: Node<'_>, path: &[Seg]) -> Span {
    let mut node = root;
    let mut best = None;
    for seg in path {
        let Some((_, span, child)) = node.children().into_iter().find(|(s, ..)| s == seg) else {
            break;
        };
        // Implicit tables (`[a.b]` without `[a]`) have no span of their own.
        best = span.or_else(|| child.span()).or(best);
        node = child;
    }
    best
}

/// The key path of the innermost key or value that covers byte `offset`.
fn path_at(node: Node<'_>, offset: usize) -> Option<Vec<Seg>> {
    for (seg, span, child) in node.children() {
        if covers(&span, offset) {
            return Some(vec![seg]);
        }
        if let Some(mut sub) = path_at(child, offset) {
            sub.insert(0, seg);
            return Some(sub);
        }
        if covers(&child.span(), offset) {
            return Some(vec![seg]);
        }
    }
    None
}

fn covers(span: &Span, offset: usize) -> bool {
    span.as_ref()
        .is_some_and(|s| s.contains(&offset) || s.start == offset)
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;

    #[test]
    fn unknown_keys_are_errors_with_line_and_name() {
        let text = with(
            "\n[[streams]]\nname = \"b\"\ngroup = \"g\"\nhandler = [\"sh\"]\nmax_block_reed = 3\n",
        );
        assert_invalid(
            &text,
            EXTRA + 5,
            "streams[1].max_block_reed",
            "unknown field `max_block_reed`",
        );
        assert_invalid(
            &format!("{MINIMAL}\n[redsi]\nurl = \"x\"\n"),
            EXTRA + 1,
            "redsi",
            "unknown field `redsi`",
        );
        assert_invalid(
            &format!("{MINIMAL}\n[daemon]\nconsumr = \"x\"\n"),
            EXTRA + 2,
            "daemon.consumr",
            "unknown field `consumr`",
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        assert_invalid(
            &with("max_block_read = \"10\"\n"),
            EXTRA,
            "streams[0].max_block_read",
            "invalid type",
        );
        assert_invalid(
            &MINIMAL.replace("[[streams]]", "[streams]"),
            4,
            "streams",
            "invalid type",
        );
        assert_invalid(
            "streams = [1]\n",
            1,
            "streams[0]",
            "expected a [[streams]] table",
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let (line, key, _) = invalid(&with("block = \"5s\n"));
        assert_eq!((line, key.as_str()), (EXTRA, "(syntax)"));
        let (line, _, message) = invalid(&with("name = \"again\"\n"));
        assert_eq!(line, EXTRA);
        assert!(message.contains("duplicate key"), "{message}");
    }

    #[test]
    fn inline_and_dotted_forms_are_located() {
        let text = "redis.url = \"redis://h\"\nstreams = [\n  { name = \"a\", group = \"g\", handler = [\"sh\"] },\n  { name = \"b\", group = \"g\", handler = [\"sh\"], max_attempts = 0 },\n]\n";
        assert_invalid(text, 4, "streams[1].max_attempts", "at least 1");
        let text = "redis.url = \"http://h\"\nstreams = [{ name = \"a\", group = \"g\", handler = [\"sh\"] }]\n";
        assert_invalid(text, 1, "redis.url", "redis://");
        let text =
            "redis.url = \"redis://h\"\nstreams = [\n  { name = \"a\", group = \"g\" },\n]\n";
        assert_invalid(text, 3, "streams[0].handler", "is required");
    }

    #[test]
    fn key_paths_display() {
        let p = KeyPath::new("streams").index(2).key("env").key("FOO");
        assert_eq!(p.to_string(), "streams[2].env.FOO");
        assert_eq!(KeyPath::new("a").key("b c").to_string(), "a.\"b c\"");
    }
}
