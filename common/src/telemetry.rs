//! Log set-up shared by both programs: one JSON (or text) line per event on standard error.
//!
//! Lines are handed to a writer thread through a buffer (`tracing-appender`'s non-blocking
//! writer), so no request waits on a write to standard error; the guard that `init` returns
//! flushes what is buffered when the program exits.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Lines buffered before a log call waits for the writer: a stuck reader of standard error
/// slows the programs down rather than losing access-log lines (the audit trail).
const BUFFERED_LINES: usize = 256 * 1024;

/// Keeps the writer thread alive; drop it last (it flushes).
#[must_use = "the log writer stops when this is dropped"]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber. `filter` was validated with the config.
pub fn init(format: LogFormat, filter: &str) -> LogGuard {
    let filter = EnvFilter::builder()
        .parse(filter)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .lossy(false)
        .thread_name("tollgate-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // A second init (tests start several servers in one process) is harmless: try_init fails,
    // and that writer and its thread go away with the guard.
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            // The request span is the only one a line is ever inside: its fields once, under
            // "span", not again in a list of all open spans.
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    LogGuard {
        _writer: installed.ok().map(|()| guard),
    }
}
