//! Log lines on stderr, as text (the default) or as one JSON object per line
//! (`--log-format json`, for log shippers). Workers log in the supervisor's
//! format: the supervisor passes its choice on to each worker it starts.

use std::sync::OnceLock;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// `2026-12-02T12:32:34.378404Z  INFO allowed CPUs: 1 (1 CPU); ...`
    #[default]
    Text,
    /// `{"timestamp":"...","level":"INFO","message":"...","worker":0}`: the
    /// event's fields beside its message, one object per line.
    Json,
}

impl LogFormat {
    pub(crate) fn as_arg(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The format this process logs in, for the workers it starts.
pub(crate) fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// Logs go to stderr. A log reader that goes away (a closed pipe, a
/// container's log driver restarting) costs the log lines, never the
/// process: write errors are dropped, not reported on the same broken stream.
/// Fails only for a format this build lacks (`json` without the `json-log`
/// feature).
pub(crate) fn init(format: LogFormat, worker: bool) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("UDPSHARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.compact().init(),
        #[cfg(feature = "json-log")]
        LogFormat::Json => {
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .init();
            // A panic's message joins the JSON stream as one object too,
            // not as plain text a log shipper cannot parse.
            std::panic::set_hook(Box::new(|info| tracing::error!("panic: {info}")));
        }
        #[cfg(not(feature = "json-log"))]
        LogFormat::Json => {
            builder.compact().init();
            return Err("--log-format json: this build lacks the json-log feature \
                        (`udpshard --version` lists the features it has)"
                .into());
        }
    }
    let _ = FORMAT.set(format);
    if worker {
        tracing::debug!(pid = std::process::id(), "worker process");
    }
    Ok(())
}
