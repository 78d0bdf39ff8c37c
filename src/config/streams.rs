//! Validation of the `[[streams]]` tables: each table's keys with their defaults and
//! limits, then the rules across tables (one loop per (name, group); no dead-letter
//! stream that the daemon also consumes).

use std::collections::BTreeMap;
use std::time::Duration;

use super::locate::KeyPath;
use super::program::resolve_program;
use super::raw::RawStream;
use super::validate::{Ctx, check_env_var, stream_key};
use super::{
    ConfigError, HandlerMode, OrderConfig, OrderKey, OrderScope, PayloadMode, StreamConfig,
};

// ---------------------------------------------------------------------------------------
// Defaults (documented on the fields of `StreamConfig`).

const DEFAULT_MAX_BLOCK_READ: u64 = 10;
/// Reached only by workers that answer in well under a millisecond (the depth follows
/// their speed, see `worker`); measured on 2 cores, 16 gives ~0.8 and 32 ~0.9 of the
/// Redis ceiling with a trivial worker.
const DEFAULT_WORKER_PREFETCH: u64 = 32;
const DEFAULT_BLOCK: Duration = Duration::from_secs(5);
const DEFAULT_START_ID: &str = "$";
const DEFAULT_PAYLOAD_FIELD: &str = "payload";
const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_ATTEMPTS: u64 = 3;
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(60);
const DEFAULT_CLAIM_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(60);
const DEFAULT_REAP_IDLE: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------
// Limits of counts that size processes or memory (README: "Limits"). Without them a typo
// (an extra 0 or three) sizes the daemon's slots, or its worker processes, at start.

/// Exec mode: handler processes one stream may run at once. Each is a process, a task and
/// a few pipes in the daemon; thousands at once already exceed the usual process and
/// descriptor limits of a host, and 10,000 is far beyond what one stream can use.
const MAX_BLOCK_READ_EXEC: usize = 10_000;
/// Worker mode: long-lived processes, all started with the daemon.
const MAX_BLOCK_READ_WORKER: usize = 1_024;
/// More would only hold entries back from other consumers: at this depth a worker already
/// never waits for the daemon.
const MAX_WORKER_PREFETCH: usize = 1000;
/// `order_waiting_max`: entries held in memory, whole, while they wait behind a busy
/// key; at most as many as exec mode may run at once.
const DEFAULT_ORDER_WAITING_MAX: u64 = 100;
const MAX_ORDER_WAITING: u64 = 10_000;

/// Running handlers refresh their entries every `claim_idle / 3`; below this the refresh
/// would come more often than once a second.
const MIN_CLAIM_IDLE: Duration = Duration::from_secs(3);

impl Ctx<'_> {
    pub(super) fn streams(&self, raws: Vec<RawStream>) -> Result<Vec<StreamConfig>, ConfigError> {
        if raws.is_empty() {
            return Err(self.invalid(
                &KeyPath::new("streams"),
                "no [[streams]] table: at least one stream is required",
            ));
        }
        let dlq_written: Vec<bool> = raws.iter().map(|raw| raw.dlq.is_some()).collect();
        let streams = raws
            .into_iter()
            .enumerate()
            .map(|(i, raw)| self.stream(i, raw))
            .collect::<Result<Vec<_>, _>>()?;
        self.check_unique(&streams)?;
        self.check_dlq_not_consumed(&streams, &dlq_written)?;
        Ok(streams)
    }

    /// A DLQ that the daemon also consumes runs failed entries again; two streams that
    /// dead-letter to each other bounce a failing entry back and forth for ever. Any chain
    /// that leads back to a consumed stream has a first link to one, which this refuses.
    fn check_dlq_not_consumed(
        &self,
        streams: &[StreamConfig],
        dlq_written: &[bool],
    ) -> Result<(), ConfigError> {
        for (j, s) in streams.iter().enumerate() {
            let Some(i) = streams.iter().position(|t| t.name == s.dlq) else {
                continue;
            };
            let default = if dlq_written.get(j).copied().unwrap_or(true) {
                ""
            } else {
                " (the default)"
            };
            return Err(self.invalid(
                &stream_key(j, "dlq"),
                format!(
                    "stream {:?} dead-letters to {:?}{default}, which this daemon consumes \
                     (streams[{i}]): a dead-letter stream must never be a consumed stream, or \
                     failed entries run again (and go round for ever when it dead-letters \
                     back); set dlq to a stream no [[streams]] table reads",
                    s.name, s.dlq
                ),
            ));
        }
        Ok(())
    }

    /// Two loops on one (stream, group) would read as the same consumer and race each other.
    fn check_unique(&self, streams: &[StreamConfig]) -> Result<(), ConfigError> {
        for (j, s) in streams.iter().enumerate() {
            let first = streams[..j]
                .iter()
                .position(|f| f.name == s.name && f.group == s.group);
            if let Some(i) = first {
                return Err(self.invalid(
                    &stream_key(j, "name"),
                    format!(
                        "stream {:?} with group {:?} is already configured in streams[{i}]",
                        s.name, s.group
                    ),
                ));
            }
        }
        Ok(())
    }

    fn stream(&self, i: usize, raw: RawStream) -> Result<StreamConfig, ConfigError> {
        let key = |k: &str| stream_key(i, k);
        let name = self.required(&key("name"), raw.name)?;
        let dlq = self.dlq(&key("dlq"), raw.dlq, &name)?;
        let has_backoff_max = raw.retry_backoff_max.is_some();
        let mode = self.mode(&key("mode"), raw.mode)?;
        let retry_backoff = self.duration(
            &key("retry_backoff"),
            raw.retry_backoff,
            DEFAULT_RETRY_BACKOFF,
        )?;
        let retry_backoff_max = self.duration(
            &key("retry_backoff_max"),
            raw.retry_backoff_max,
            DEFAULT_RETRY_BACKOFF_MAX,
        )?;
        if retry_backoff_max < retry_backoff {
            // Blame the key the operator wrote; the other one is a default.
            let blamed = if has_backoff_max {
                key("retry_backoff_max")
            } else {
                key("retry_backoff")
            };
            return Err(self.invalid(
                &blamed,
                format!(
                    "retry_backoff_max ({}) is shorter than retry_backoff ({})",
                    humantime::format_duration(retry_backoff_max),
                    humantime::format_duration(retry_backoff)
                ),
            ));
        }
        Ok(StreamConfig {
            group: self.required(&key("group"), raw.group)?,
            handler: self.handler(&key("handler"), raw.handler)?,
            mode,
            max_block_read: self.max_block_read(
                &key("max_block_read"),
                raw.max_block_read,
                mode,
            )?,
            worker_prefetch: self.worker_prefetch(
                &key("worker_prefetch"),
                raw.worker_prefetch,
                mode,
            )?,
            block: self.positive_duration(&key("block"), raw.block, DEFAULT_BLOCK)?,
            start_id: self.start_id(&key("start_id"), raw.start_id)?,
            payload: self.payload(&key("payload"), raw.payload)?,
            payload_field: self.non_empty_or(
                &key("payload_field"),
                raw.payload_field,
                DEFAULT_PAYLOAD_FIELD,
            )?,
            handler_timeout: self.positive_duration(
                &key("handler_timeout"),
                raw.handler_timeout,
                DEFAULT_HANDLER_TIMEOUT,
            )?,
            max_attempts: self.at_least_one(
                &key("max_attempts"),
                raw.max_attempts,
                DEFAULT_MAX_ATTEMPTS,
            )?,
            retry_backoff,
            retry_backoff_max,
            dlq,
            dlq_exit_codes: self.exit_codes(&key("dlq_exit_codes"), raw.dlq_exit_codes)?,
            env: self.env(&key("env"), raw.env)?,
            claim_interval: self.positive_duration(
                &key("claim_interval"),
                raw.claim_interval,
                DEFAULT_CLAIM_INTERVAL,
            )?,
            claim_idle: self.claim_idle(&key("claim_idle"), raw.claim_idle)?,
            reap_idle: self.duration(&key("reap_idle"), raw.reap_idle, DEFAULT_REAP_IDLE)?,
            order: self.order(
                i,
                raw.order_by,
                raw.order_by_json,
                raw.order_scope,
                raw.order_waiting_max,
            )?,
            name,
        })
    }

    /// `order_by` / `order_by_json` (at most one), `order_scope`, `order_waiting_max`.
    fn order(
        &self,
        i: usize,
        by: Option<String>,
        by_json: Option<String>,
        scope: Option<String>,
        waiting_max: Option<i64>,
    ) -> Result<Option<OrderConfig>, ConfigError> {
        let key = |k: &str| stream_key(i, k);
        let order_key = match (by, by_json) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    &key("order_by_json"),
                    "order_by and order_by_json exclude each other: set one",
                ));
            }
            (Some(field), None) => OrderKey::Field(self.non_empty(&key("order_by"), field)?),
            (None, Some(pointer)) => {
                if !(pointer.is_empty() || pointer.starts_with('/')) {
                    return Err(self.invalid(
                        &key("order_by_json"),
                        format!("must be a JSON Pointer (RFC 6901) such as \"/channel_id\" (got {pointer:?})"),
                    ));
                }
                OrderKey::JsonPointer(pointer)
            }
            (None, None) => {
                for (name, set) in [
                    ("order_scope", scope.is_some()),
                    ("order_waiting_max", waiting_max.is_some()),
                ] {
                    if set {
                        return Err(self.invalid(&key(name), "needs order_by or order_by_json"));
                    }
                }
                return Ok(None);
            }
        };
        let scope = match scope.as_deref() {
            None | Some("consumer") => OrderScope::Consumer,
            Some("group") => OrderScope::Group,
            Some(other) => {
                return Err(self.invalid(
                    &key("order_scope"),
                    format!("must be \"consumer\" or \"group\" (got {other:?})"),
                ));
            }
        };
        let waiting_max = self.at_least_one(
            &key("order_waiting_max"),
            waiting_max,
            DEFAULT_ORDER_WAITING_MAX,
        )?;
        if waiting_max > MAX_ORDER_WAITING {
            return Err(self.invalid(
                &key("order_waiting_max"),
                format!("must be at most {MAX_ORDER_WAITING} (got {waiting_max})"),
            ));
        }
        Ok(Some(OrderConfig {
            key: order_key,
            scope,
            waiting_max: waiting_max as usize,
        }))
    }

    fn dlq(&self, key: &KeyPath, value: Option<String>, name: &str) -> Result<String, ConfigError> {
        let dlq = self.non_empty_or(key, value, &format!("{name}:dlq"))?;
        if dlq == name {
            return Err(self.invalid(
                key,
                format!("must differ from the stream name {name:?}: failed entries would be read again forever"),
            ));
        }
        Ok(dlq)
    }

    fn max_block_read(
        &self,
        key: &KeyPath,
        value: Option<i64>,
        mode: HandlerMode,
    ) -> Result<usize, ConfigError> {
        let n = self.at_least_one(key, value, DEFAULT_MAX_BLOCK_READ)?;
        let (max, what) = match mode {
            HandlerMode::Exec => (
                MAX_BLOCK_READ_EXEC,
                "handler processes this stream may run at once",
            ),
            HandlerMode::Worker => (
                MAX_BLOCK_READ_WORKER,
                "worker processes started with the daemon",
            ),
        };
        let mode = match mode {
            HandlerMode::Exec => "",
            HandlerMode::Worker => " with mode = \"worker\"",
        };
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| {
                self.invalid(
                    key,
                    format!("must be at most {max}{mode} (got {n}): the number of {what}"),
                )
            })
    }

    fn worker_prefetch(
        &self,
        key: &KeyPath,
        value: Option<i64>,
        mode: HandlerMode,
    ) -> Result<usize, ConfigError> {
        if mode == HandlerMode::Exec {
            return match value {
                None => Ok(1),
                Some(_) => Err(self.invalid(key, "applies only to mode = \"worker\"".to_owned())),
            };
        }
        let n = self.at_least_one(key, value, DEFAULT_WORKER_PREFETCH)?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= MAX_WORKER_PREFETCH)
            .ok_or_else(|| {
                self.invalid(
                    key,
                    format!("must be at most {MAX_WORKER_PREFETCH} (got {n})"),
                )
            })
    }

    fn start_id(&self, key: &KeyPath, value: Option<String>) -> Result<String, ConfigError> {
        match value.as_deref() {
            None => Ok(DEFAULT_START_ID.to_string()),
            Some(id @ ("$" | "0")) => Ok(id.to_string()),
            Some(other) => Err(self.invalid(
                key,
                format!(
                    "must be \"$\" (only new entries) or \"0\" (the whole stream), got {other:?}"
                ),
            )),
        }
    }

    fn mode(&self, key: &KeyPath, value: Option<String>) -> Result<HandlerMode, ConfigError> {
        match value.as_deref() {
            None | Some("exec") => Ok(HandlerMode::Exec),
            Some("worker") => Ok(HandlerMode::Worker),
            Some(other) => Err(self.invalid(
                key,
                format!("must be \"exec\" or \"worker\", got {other:?}"),
            )),
        }
    }

    fn payload(&self, key: &KeyPath, value: Option<String>) -> Result<PayloadMode, ConfigError> {
        match value.as_deref() {
            None | Some("field") => Ok(PayloadMode::Field),
            Some("entry") => Ok(PayloadMode::Entry),
            Some(other) => Err(self.invalid(
                key,
                format!("must be \"field\" or \"entry\", got {other:?}"),
            )),
        }
    }

    fn claim_idle(&self, key: &KeyPath, value: Option<String>) -> Result<Duration, ConfigError> {
        let d = self.duration(key, value, DEFAULT_CLAIM_IDLE)?;
        if d < MIN_CLAIM_IDLE {
            return Err(self.invalid(
                key,
                format!(
                    "must be at least {} (got {}): running handlers refresh their entries every \
                     claim_idle/3 so that no other consumer claims them, and that must not be \
                     more often than once a second",
                    humantime::format_duration(MIN_CLAIM_IDLE),
                    humantime::format_duration(d)
                ),
            ));
        }
        Ok(d)
    }

    fn exit_codes(&self, key: &KeyPath, value: Option<Vec<i64>>) -> Result<Vec<i32>, ConfigError> {
        let check = |(i, code): (usize, i64)| match u8::try_from(code) {
            Ok(0) => Err(self.invalid(
                &key.index(i),
                "0 is success, not a failure: exit codes here must be 1..=255",
            )),
            Ok(code) => Ok(i32::from(code)),
            Err(_) => Err(self.invalid(
                &key.index(i),
                format!("{code} is not an exit code: must be 1..=255"),
            )),
        };
        value
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(check)
            .collect()
    }

    fn env(
        &self,
        key: &KeyPath,
        value: Option<BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        let env = value.unwrap_or_default();
        for (name, value) in &env {
            check_env_var(name, value).map_err(|why| self.invalid(&key.key(name), why))?;
        }
        Ok(env)
    }

    fn handler(
        &self,
        key: &KeyPath,
        value: Option<Vec<String>>,
    ) -> Result<Vec<String>, ConfigError> {
        let mut argv = value.ok_or_else(|| {
            self.invalid(key, "is required: the program and its arguments, e.g. [\"/usr/local/bin/handle\", \"--verbose\"]")
        })?;
        // A NUL cannot be passed through exec; better to say so now than at every spawn.
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            return Err(self.invalid(&key.index(i), "contains a NUL character"));
        }
        let Some(program) = argv.first_mut() else {
            return Err(self.invalid(
                key,
                "must not be empty: the first element is the program to run",
            ));
        };
        *program = resolve_program(program, self.config_dir(), self.env.path.as_deref())
            .map_err(|why| self.invalid(key, why))?;
        Ok(argv)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;

    #[test]
    fn order_keys() {
        assert_eq!(ok(MINIMAL).streams[0].order, None);
        let by_field = ok(&with("order_by = \"channel\"\n")).streams[0]
            .order
            .clone();
        assert_eq!(
            by_field,
            Some(OrderConfig {
                key: OrderKey::Field("channel".into()),
                scope: OrderScope::Consumer,
                waiting_max: DEFAULT_ORDER_WAITING_MAX as usize,
            })
        );
        let text =
            with("order_by_json = \"/a/b\"\norder_scope = \"group\"\norder_waiting_max = 7\n");
        let by_json = ok(&text).streams[0].order.clone().expect("ordered");
        assert_eq!(by_json.key, OrderKey::JsonPointer("/a/b".into()));
        assert_eq!((by_json.scope, by_json.waiting_max), (OrderScope::Group, 7));
        let both = with("order_by = \"a\"\norder_by_json = \"/a\"\n");
        assert_invalid(
            &both,
            EXTRA + 1,
            "streams[0].order_by_json",
            "exclude each other",
        );
        assert_invalid(
            &with("order_by_json = \"a\"\n"),
            EXTRA,
            "streams[0].order_by_json",
            "JSON Pointer",
        );
        assert_invalid(
            &with("order_scope = \"group\"\n"),
            EXTRA,
            "streams[0].order_scope",
            "needs order_by",
        );
        assert_invalid(
            &with("order_by = \"a\"\norder_scope = \"world\"\n"),
            EXTRA + 1,
            "streams[0].order_scope",
            "\"consumer\" or \"group\"",
        );
        assert_invalid(
            &with("order_by = \"a\"\norder_waiting_max = 10001\n"),
            EXTRA + 1,
            "streams[0].order_waiting_max",
            "at most 10000",
        );
    }

    #[test]
    fn worker_prefetch_is_for_worker_mode_only() {
        assert_eq!(ok(MINIMAL).streams[0].worker_prefetch, 1);
        assert_eq!(
            ok(&with("mode = \"worker\"\n")).streams[0].worker_prefetch,
            DEFAULT_WORKER_PREFETCH as usize
        );
        assert_eq!(
            ok(&with("mode = \"worker\"\nworker_prefetch = 1\n")).streams[0].worker_prefetch,
            1
        );
        assert_invalid(
            &with("worker_prefetch = 4\n"),
            EXTRA,
            "streams[0].worker_prefetch",
            "applies only to mode = \"worker\"",
        );
        assert_invalid(
            &with("worker_prefetch = 0\nmode = \"worker\"\n"),
            EXTRA,
            "streams[0].worker_prefetch",
            "must be at least 1 (got 0)",
        );
        assert_invalid(
            &with("worker_prefetch = 1001\nmode = \"worker\"\n"),
            EXTRA,
            "streams[0].worker_prefetch",
            "must be at most 1000 (got 1001)",
        );
    }

    #[test]
    fn mode_must_be_exec_or_worker() {
        assert_eq!(ok(MINIMAL).streams[0].mode, HandlerMode::Exec);
        assert_invalid(
            &with("mode = \"daemon\"\n"),
            EXTRA,
            "streams[0].mode",
            "\"exec\" or \"worker\"",
        );
    }

    #[test]
    fn duplicate_name_and_group() {
        let text = with(
            "\n[[streams]]\nname = \"other\"\ngroup = \"workers\"\nhandler = [\"sh\"]\n\n[[streams]]\nname = \"orders\"\ngroup = \"workers\"\nhandler = [\"sh\"]\n",
        );
        assert_invalid(&text, EXTRA + 7, "streams[2].name", "streams[0]");
        // Same stream, another group: fine.
        ok(&with(
            "\n[[streams]]\nname = \"orders\"\ngroup = \"auditors\"\nhandler = [\"sh\"]\n",
        ));
    }

    #[test]
    fn missing_required_stream_keys_point_at_the_header() {
        let text = with("\n[[streams]]\nname = \"b\"\nhandler = [\"sh\"]\n");
        assert_invalid(&text, EXTRA + 1, "streams[1].group", "is required");
        let text = with("\n[[streams]]\ngroup = \"g\"\nhandler = [\"sh\"]\n");
        assert_invalid(&text, EXTRA + 1, "streams[1].name", "is required");
        let text = with("\n[[streams]]\nname = \"b\"\ngroup = \"g\"\n");
        assert_invalid(&text, EXTRA + 1, "streams[1].handler", "is required");
    }

    #[test]
    fn counts_must_be_positive() {
        for (extra, key) in [
            ("max_block_read = 0", "streams[0].max_block_read"),
            ("max_block_read = -3", "streams[0].max_block_read"),
            ("max_attempts = 0", "streams[0].max_attempts"),
            ("max_attempts = -1", "streams[0].max_attempts"),
        ] {
            assert_invalid(&with(&format!("{extra}\n")), EXTRA, key, "at least 1");
        }
    }

    #[test]
    fn counts_that_size_processes_have_an_upper_bound() {
        assert_eq!(
            ok(&with("max_block_read = 10000\n")).streams[0].max_block_read,
            10_000
        );
        for n in ["10001", "100000000", "9223372036854775807"] {
            assert_invalid(
                &with(&format!("max_block_read = {n}\n")),
                EXTRA,
                "streams[0].max_block_read",
                &format!("must be at most 10000 (got {n})"),
            );
        }
        let worker = |n: &str| with(&format!("mode = \"worker\"\nmax_block_read = {n}\n"));
        assert_eq!(ok(&worker("1024")).streams[0].max_block_read, 1024);
        assert_invalid(
            &worker("1025"),
            EXTRA + 1,
            "streams[0].max_block_read",
            "must be at most 1024 with mode = \"worker\" (got 1025)",
        );
        assert_invalid(
            &with("mode = \"worker\"\nworker_prefetch = 9223372036854775807\n"),
            EXTRA + 1,
            "streams[0].worker_prefetch",
            "must be at most 1000",
        );
    }

    #[test]
    fn start_id_and_payload() {
        assert_invalid(
            &with("start_id = \"0-0\"\n"),
            EXTRA,
            "streams[0].start_id",
            "\"$\"",
        );
        assert_invalid(
            &with("payload = \"json\"\n"),
            EXTRA,
            "streams[0].payload",
            "\"field\" or \"entry\"",
        );
    }

    #[test]
    fn retry_backoff_max_not_below_backoff() {
        assert_invalid(
            &with("retry_backoff = \"10s\"\nretry_backoff_max = \"5s\"\n"),
            EXTRA + 1,
            "streams[0].retry_backoff_max",
            "shorter than retry_backoff",
        );
        // Only retry_backoff written: blame it, not the default.
        assert_invalid(
            &with("retry_backoff = \"2m\"\n"),
            EXTRA,
            "streams[0].retry_backoff",
            "shorter than retry_backoff",
        );
        ok(&with(
            "retry_backoff = \"5s\"\nretry_backoff_max = \"5s\"\n",
        ));
    }

    #[test]
    fn claim_idle_allows_the_refresh_period() {
        for bad in ["0s", "2s", "2999ms"] {
            assert_invalid(
                &with(&format!("claim_idle = \"{bad}\"\n")),
                EXTRA,
                "streams[0].claim_idle",
                "claim_idle/3",
            );
        }
        ok(&with("claim_idle = \"3s\"\n"));
    }

    #[test]
    fn dlq_must_differ_from_the_stream() {
        assert_invalid(
            &with("dlq = \"orders\"\n"),
            EXTRA,
            "streams[0].dlq",
            "must differ",
        );
    }

    #[test]
    fn dlq_must_not_be_a_consumed_stream() {
        let second = |extra: &str| {
            format!("\n[[streams]]\nname = \"audit\"\ngroup = \"g\"\nhandler = [\"sh\"]\n{extra}")
        };
        // orders -> audit, audit -> orders: a cycle.
        let text = with(&format!(
            "dlq = \"audit\"\n{}",
            second("dlq = \"orders\"\n")
        ));
        let (line, key, message) = invalid(&text);
        assert_eq!((line, key.as_str()), (EXTRA, "streams[0].dlq"), "{message}");
        for needle in ["\"orders\"", "\"audit\"", "streams[1]"] {
            assert!(message.contains(needle), "{message:?} lacks {needle}");
        }
        // A chain that ends in a consumed stream is refused too, at its first link.
        let text = with(&second("dlq = \"orders\"\n"));
        assert_invalid(
            &text,
            EXTRA + 5,
            "streams[1].dlq",
            "which this daemon consumes (streams[0]",
        );
        // The default name: the key is not written, so the error points at the table.
        let text =
            with("\n[[streams]]\nname = \"orders:dlq\"\ngroup = \"g\"\nhandler = [\"sh\"]\n");
        assert_invalid(&text, 4, "streams[0].dlq", "\"orders:dlq\" (the default)");
        // Two streams sharing one DLQ that nobody consumes: fine.
        ok(&with(&format!(
            "dlq = \"dead\"\n{}",
            second("dlq = \"dead\"\n")
        )));
    }

    #[test]
    fn dlq_exit_codes_range() {
        assert_invalid(
            &with("dlq_exit_codes = [0]\n"),
            EXTRA,
            "streams[0].dlq_exit_codes[0]",
            "0 is success",
        );
        assert_invalid(
            &with("dlq_exit_codes = [\n  65,\n  256,\n]\n"),
            EXTRA + 2,
            "streams[0].dlq_exit_codes[1]",
            "1..=255",
        );
        assert_invalid(
            &with("dlq_exit_codes = [-1]\n"),
            EXTRA,
            "streams[0].dlq_exit_codes[0]",
            "1..=255",
        );
    }

    #[test]
    fn env_names() {
        let sub = |entries: &str| format!("{MINIMAL}\n[streams.env]\nGOOD = \"1\"\n{entries}\n");
        assert_invalid(
            &sub("\"\" = \"x\""),
            EXTRA + 3,
            "streams[0].env.\"\"",
            "must not be empty",
        );
        assert_invalid(
            &sub("\"A=B\" = \"x\""),
            EXTRA + 3,
            "streams[0].env.\"A=B\"",
            "'='",
        );
        assert_invalid(
            &sub("\"A\\u0000B\" = \"x\""),
            EXTRA + 3,
            "streams[0].env.\"A\\0B\"",
            "NUL",
        );
        assert_invalid(
            &sub("REDIS_STREAMD_ID = \"x\""),
            EXTRA + 3,
            "streams[0].env.REDIS_STREAMD_ID",
            "reserved",
        );
        assert_invalid(
            &with("env = { COUNT = 1 }\n"),
            EXTRA,
            "streams[0].env.COUNT",
            "expected a string",
        );
    }

    #[test]
    fn at_least_one_stream() {
        assert_invalid(
            "[redis]\nurl = \"redis://h\"\n",
            1,
            "streams",
            "at least one stream",
        );
        assert_invalid(
            "streams = []\n[redis]\nurl = \"redis://h\"\n",
            1,
            "streams",
            "at least one stream",
        );
    }
}
