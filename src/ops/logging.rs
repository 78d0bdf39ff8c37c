//! Log output: text for terminals, one JSON object per line for collectors.
//!
//! Lines go to stderr through a non-blocking writer so a slow terminal or journald never
//! stalls the runtime; if the writer falls behind, lines are dropped rather than waited on.
//!
//! Code puts context that many events share (stream, group, consumer; an entry's id and
//! attempt) on tracing spans instead of repeating it on every event. [`Line`] renders the
//! fields of every enclosing span as if they were fields of the event, after the event's
//! own, so each line stands alone: `... INFO consume loop stopped stream=a group=g` in
//! text, and flat top-level keys in JSON (no `span`/`spans` nesting), which is what log
//! queries and the tests match on. A field set on both wins from the event, and an inner
//! span's from an outer one's; each name is printed once.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use serde::ser::{SerializeMap, Serializer as _};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Lines buffered for the writer thread before new ones are dropped.
const LOG_BUFFER_LINES: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging could not be set up. `Display` is the whole message.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log level: {0}")]
    Level(#[from] tracing_subscriber::filter::ParseError),
    #[error("cannot install logger: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
}

/// Installs the global subscriber. `level` (from `--log-level`) wins over `RUST_LOG`;
/// with neither, `info`. Keep the guard alive until exit so buffered lines are written.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<WorkerGuard, LoggingError> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }?;
    // The default buffer (128,000 lines) is allocated up front: 4 MiB of idle memory for
    // a burst the writer thread drains in microseconds anyway.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .lossy(true)
        .finish(std::io::stderr());
    let ansi = format == LogFormat::Text && std::io::stderr().is_terminal();
    subscriber(format, filter, writer, ansi).try_init()?;
    Ok(guard)
}

/// The subscriber [`init`] installs, writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(filter)
        .with(SpanFieldsLayer)
        .with(
            tracing_subscriber::fmt::layer()
                .event_format(Line { format })
                .fmt_fields(NoFields)
                .with_writer(writer)
                .with_ansi(ansi),
        )
}

// ---------------------------------------------------------------------------------------
// Fields as recorded, for either format.

/// One recorded value, kept typed so that JSON gets numbers and booleans as such.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    /// A `&str`: quoted in text (as tracing's own formatter does), a JSON string.
    Str(String),
    /// `%value`, `?value`, errors and anything else: the text as formatted.
    Formatted(String),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
}

/// The fields of one event or span, in the order recorded; one value per name.
#[derive(Debug, Default)]
struct Fields(Vec<(&'static str, Value)>);

impl Fields {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Sets `name`, in place when it is already there (a span's `record` of a new value).
    fn set(&mut self, name: &'static str, value: Value) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        // Metadata of events from the `log` crate, already shown as level; as tracing's
        // own formatters do, they are not fields.
        if name.starts_with("log.") {
            return;
        }
        // Raw identifiers (`r#type = ...`) are shown without their prefix.
        self.set(name.strip_prefix("r#").unwrap_or(name), value);
    }
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::F64(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::I64(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::U64(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::Str(value.to_string()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // As tracing's text formatter: the error, then the chain of its sources.
        let mut text = value.to_string();
        if let Some(source) = value.source() {
            let mut sources = Vec::new();
            let mut next = Some(source);
            while let Some(error) = next {
                sources.push(error.to_string());
                next = error.source();
            }
            let _ = write!(text, " {}.sources={sources:?}", field.name());
        }
        self.put(field, Value::Formatted(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::Formatted(format!("{value:?}")));
    }
}

/// Keeps the fields of every span in the span's extensions, for [`Line`] to print.
struct SpanFieldsLayer;

impl<S> Layer<S> for SpanFieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        span.extensions_mut().replace(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<Fields>() {
            values.record(fields);
        }
    }
}

/// The fmt layer's own per-span field text is not used: [`SpanFieldsLayer`] keeps the
/// values. Writing nothing keeps that per-span cost at an empty string.
struct NoFields;

impl<'w> FormatFields<'w> for NoFields {
    fn format_fields<R: RecordFields>(&self, _writer: Writer<'w>, _fields: R) -> fmt::Result {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The line.

/// Formats one event as one line: timestamp, level, the event's fields (the message
/// first as written), then the fields of the enclosing spans, outermost first.
struct Line {
    format: LogFormat,
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Events of the `log` crate come with the level of their record too.
        let level = *event.metadata().level();
        let mut own = Fields::default();
        event.record(&mut own);
        let inherited = span_fields(ctx, &own);
        match self.format {
            LogFormat::Text => write_text(&mut writer, level, &own, &inherited),
            LogFormat::Json => write_json(&mut writer, level, &own, &inherited),
        }
    }
}

/// The fields of the spans around the event that the event does not set itself,
/// outermost span first; a name set by several spans takes the innermost one's value.
fn span_fields<S, N>(ctx: &FmtContext<'_, S, N>, own: &Fields) -> Fields
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let mut inherited = Fields::default();
    let Some(scope) = ctx.event_scope() else {
        return inherited;
    };
    for span in scope.from_root() {
        let extensions = span.extensions();
        let Some(fields) = extensions.get::<Fields>() else {
            continue;
        };
        for (name, value) in &fields.0 {
            if own.get(name).is_none() {
                inherited.set(name, value.clone());
            }
        }
    }
    inherited
}

/// `2026-12-01T12:00:00.123456Z  INFO message k=v span_k=v`, as tracing's own `Full`
/// format without targets and without the `span{...}:` prefix, colours included.
fn write_text(
    writer: &mut Writer<'_>,
    level: Level,
    own: &Fields,
    inherited: &Fields,
) -> fmt::Result {
    let ansi = writer.has_ansi_escapes();
    if ansi {
        writer.write_str("\x1b[2m")?;
    }
    timestamp(writer)?;
    if ansi {
        writer.write_str("\x1b[0m")?;
    }
    writer.write_char(' ')?;
    // Padded to five like tracing's own, inside the colour when there is one.
    let name = match level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    };
    if ansi {
        let colour = match level {
            Level::TRACE => "35",
            Level::DEBUG => "34",
            Level::INFO => "32",
            Level::WARN => "33",
            Level::ERROR => "31",
        };
        write!(writer, "\x1b[{colour}m{name}\x1b[0m ")?;
    } else {
        write!(writer, "{name} ")?;
    }
    let sanitize = writer.sanitizes_ansi_escapes();
    let all = own.0.iter().chain(&inherited.0);
    for (n, (name, value)) in all.enumerate() {
        if n > 0 {
            writer.write_char(' ')?;
        }
        if *name == "message" {
            let text = match value {
                Value::Str(s) | Value::Formatted(s) => s.clone(),
                other => text_value(other),
            };
            write_message(writer, &text, sanitize)?;
        } else if ansi {
            write!(
                writer,
                "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m{}",
                text_value(value)
            )?;
        } else {
            write!(writer, "{name}={}", text_value(value))?;
        }
    }
    writer.write_char('\n')
}

/// A value as tracing's text formatter shows it: strings quoted, the rest as formatted.
fn text_value(value: &Value) -> String {
    match value {
        Value::Str(s) => format!("{s:?}"),
        Value::Formatted(s) => s.clone(),
        Value::I64(n) => n.to_string(),
        Value::U64(n) => n.to_string(),
        Value::F64(x) => format!("{x:?}"),
        Value::Bool(b) => b.to_string(),
    }
}

/// The message, with terminal control characters escaped when the writer asks for it
/// (as tracing's formatter does, so a logged text cannot drive the terminal).
fn write_message(writer: &mut Writer<'_>, text: &str, sanitize: bool) -> fmt::Result {
    if !sanitize {
        return writer.write_str(text);
    }
    for c in text.chars() {
        match c {
            '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => {
                write!(writer, "\\x{:02x}", u32::from(c))?
            }
            c if ('\u{80}'..='\u{9f}').contains(&c) => write!(writer, "\\u{{{:x}}}", u32::from(c))?,
            c => writer.write_char(c)?,
        }
    }
    Ok(())
}

fn timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    // Only a formatting error is an error: a clock that cannot be read is written as such.
    if SystemTime.format_time(writer).is_err() {
        writer.write_str("<unknown time>")?;
    }
    Ok(())
}

/// `{"timestamp":..,"level":"INFO","message":..,"k":..,"span_k":..}`: one flat object.
fn write_json(
    writer: &mut Writer<'_>,
    level: Level,
    own: &Fields,
    inherited: &Fields,
) -> fmt::Result {
    let mut time = String::new();
    timestamp(&mut Writer::new(&mut time))?;
    let line = json_line(&time, level, own, inherited).map_err(|_| fmt::Error)?;
    writer.write_str(&line)?;
    writer.write_char('\n')
}

fn json_line(
    time: &str,
    level: Level,
    own: &Fields,
    inherited: &Fields,
) -> Result<String, serde_json::Error> {
    let mut buf = Vec::with_capacity(256);
    let mut serializer = serde_json::Serializer::new(&mut buf);
    let mut map = serializer.serialize_map(None)?;
    map.serialize_entry("timestamp", time)?;
    map.serialize_entry("level", level.as_str())?;
    for (name, value) in own.0.iter().chain(&inherited.0) {
        match value {
            Value::Str(s) | Value::Formatted(s) => map.serialize_entry(name, s)?,
            Value::I64(n) => map.serialize_entry(name, n)?,
            Value::U64(n) => map.serialize_entry(name, n)?,
            Value::F64(x) => map.serialize_entry(name, x)?,
            Value::Bool(b) => map.serialize_entry(name, b)?,
        }
    }
    map.end()?;
    // serde_json writes UTF-8 only; the lossy conversion never replaces anything.
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects every line written, for assertions.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;

        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    /// The lines `emit` logs in `format`.
    fn lines(format: LogFormat, ansi: bool, emit: impl FnOnce()) -> Vec<String> {
        let capture = Capture::default();
        let filter = EnvFilter::try_new("debug").expect("filter");
        let subscriber = subscriber(format, filter, capture.clone(), ansi);
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = capture.0.lock().expect("capture lock").clone();
        String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A text line without its timestamp: `" INFO message k=v"` → `"INFO message k=v"`.
    fn after_timestamp(line: &str) -> &str {
        let (stamp, rest) = line.split_once(' ').expect("timestamp");
        assert!(stamp.ends_with('Z') && stamp.contains('T'), "{line}");
        rest.trim_start()
    }

    fn json(line: &str) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::from_str(line).expect("JSON line") {
            serde_json::Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn nested() {
        let name = "a";
        let outer = tracing::info_span!("stream", stream = %name, group = "g", consumer = %"c1");
        let _outer = outer.enter();
        tracing::info!("consume loop started");
        let inner = tracing::info_span!("attempt", id = %"1-0", attempt = 2_u64);
        let _inner = inner.enter();
        tracing::warn!(exit_code = 3, retry_in = ?std::time::Duration::from_millis(1500), "handler failed");
        tracing::info!(stream = "event-wins", attempt = 9_i64, "override");
    }

    #[test]
    fn text_puts_span_fields_after_the_event_fields() {
        let lines = lines(LogFormat::Text, false, nested);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(
            after_timestamp(&lines[0]),
            "INFO consume loop started stream=a group=\"g\" consumer=c1"
        );
        assert!(lines[0].contains("Z  INFO consume"), "{}", lines[0]);
        assert_eq!(
            after_timestamp(&lines[1]),
            "WARN handler failed exit_code=3 retry_in=1.5s stream=a group=\"g\" consumer=c1 id=1-0 attempt=2"
        );
        assert_eq!(
            after_timestamp(&lines[2]),
            "INFO override stream=\"event-wins\" attempt=9 group=\"g\" consumer=c1 id=1-0"
        );
    }

    #[test]
    fn text_without_spans_is_tracings_own_layout() {
        let lines = lines(LogFormat::Text, false, || {
            tracing::error!(error = %"boom", "fatal");
            tracing::debug!(n = 1_u64, ok = true, ratio = 0.5, "numbers");
            tracing::info!(only = 1);
        });
        assert_eq!(after_timestamp(&lines[0]), "ERROR fatal error=boom");
        assert!(lines[0].contains("Z ERROR fatal"), "{}", lines[0]);
        assert_eq!(
            after_timestamp(&lines[1]),
            "DEBUG numbers n=1 ok=true ratio=0.5"
        );
        assert_eq!(after_timestamp(&lines[2]), "INFO only=1");
    }

    #[test]
    fn json_is_one_flat_object() {
        let lines = lines(LogFormat::Json, false, nested);
        assert_eq!(lines.len(), 3, "{lines:?}");
        let first = json(&lines[0]);
        let keys: Vec<&str> = first.keys().map(String::as_str).collect();
        assert!(
            first["timestamp"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "consume loop started");
        assert_eq!(first["stream"], "a");
        assert_eq!(first["consumer"], "c1");
        assert!(
            !keys.contains(&"span") && !keys.contains(&"spans"),
            "{keys:?}"
        );
        assert!(lines[0].starts_with("{\"timestamp\":"), "{}", lines[0]);

        let second = json(&lines[1]);
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["exit_code"], 3);
        assert_eq!(second["retry_in"], "1.5s");
        assert_eq!(second["id"], "1-0");
        assert_eq!(second["attempt"], 2);
        assert_eq!(second["group"], "g");

        let third = json(&lines[2]);
        assert_eq!(third["stream"], "event-wins");
        assert_eq!(third["attempt"], 9);
        // Each key once: a repeated key would be lost by most JSON readers.
        assert_eq!(lines[2].matches("\"stream\":").count(), 1, "{}", lines[2]);
        assert_eq!(lines[2].matches("\"attempt\":").count(), 1, "{}", lines[2]);
    }

    #[test]
    fn recorded_span_fields_replace_their_empty_declaration() {
        let lines = lines(LogFormat::Json, false, || {
            let span =
                tracing::info_span!("attempt", id = %"1-0", elapsed_ms = tracing::field::Empty);
            let _entered = span.enter();
            tracing::info!("before");
            span.record("elapsed_ms", 12_u64);
            tracing::info!("after");
        });
        assert!(!json(&lines[0]).contains_key("elapsed_ms"), "{}", lines[0]);
        assert_eq!(json(&lines[1])["elapsed_ms"], 12);
    }

    #[test]
    fn errors_and_odd_text_are_escaped_as_values() {
        let lines = lines(LogFormat::Json, false, || {
            let e = std::io::Error::other("disk \"full\"\n");
            tracing::error!(
                error = &e as &dyn std::error::Error,
                r#type = "x",
                "quote \" and é"
            );
        });
        let line = json(&lines[0]);
        assert_eq!(line["error"], "disk \"full\"\n");
        assert_eq!(line["type"], "x");
        assert_eq!(line["message"], "quote \" and é");
    }

    #[test]
    fn text_message_control_characters_are_escaped() {
        let lines = lines(LogFormat::Text, false, || {
            tracing::info!("bell \x07 esc \x1b[31m red");
        });
        assert_eq!(
            after_timestamp(&lines[0]),
            "INFO bell \\x07 esc \\x1b[31m red"
        );
    }

    #[test]
    fn ansi_text_colours_level_and_names() {
        let lines = lines(LogFormat::Text, true, || {
            let span = tracing::info_span!("stream", stream = %"a");
            let _entered = span.enter();
            tracing::warn!(n = 1, "careful");
        });
        assert!(lines[0].starts_with("\x1b[2m"), "{:?}", lines[0]);
        assert!(
            lines[0].contains("\x1b[33m WARN\x1b[0m careful"),
            "{:?}",
            lines[0]
        );
        assert!(
            lines[0].contains("\x1b[3mstream\x1b[0m\x1b[2m=\x1b[0ma"),
            "{:?}",
            lines[0]
        );
    }

    #[test]
    fn an_invalid_level_is_an_error() {
        let err = init(LogFormat::Text, Some("info,[")).expect_err("invalid filter");
        assert!(err.to_string().starts_with("invalid log level: "), "{err}");
    }
}
