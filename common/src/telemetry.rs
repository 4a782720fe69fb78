//! Log set-up shared by both programs: one JSON (or text) line per event on standard error.
//!
//! A log call appends its line to a buffer in memory ([`BatchWriter`]); a writer thread of its
//! own moves the buffer to standard error in one `write` every few milliseconds. So no request
//! waits on a write to standard error, and a busy sidecar makes one system call and one thread
//! wake-up per batch of lines, not one per line (bench/RESULTS.md: with a wake-up and a write per
//! line, the writer thread alone was 4.5 % of the sidecar's CPU samples). The guard that `init`
//! returns writes what is buffered when the program exits, waiting for it at most `EXIT_WAIT`.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// How often the writer thread moves what is buffered to standard error.
const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Buffered bytes at which the writer thread is woken at once instead of at its next tick.
const WAKE_AT: usize = 256 << 10;
/// Buffered bytes at which a log call waits for the writer: a stuck reader of standard error
/// slows the programs down rather than losing access-log lines (the audit trail).
const MAX_BUFFERED: usize = 64 << 20;

/// Keeps the writer thread alive; drop it last (it writes what is left).
#[must_use = "the log writer stops when this is dropped"]
pub struct LogGuard {
    writer: Option<(BatchWriter, std::thread::JoinHandle<()>)>,
}

/// The longest the program waits at exit for the writer to write what is buffered: a reader of
/// standard error that stopped reading must not keep the process from exiting.
const EXIT_WAIT: Duration = Duration::from_secs(2);

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((writer, thread)) = self.writer.take() {
            writer.close();
            let until = std::time::Instant::now() + EXIT_WAIT;
            while !thread.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// Installs the global subscriber. `filter` was validated with the config.
pub fn init(format: LogFormat, filter: &str) -> LogGuard {
    let filter = EnvFilter::builder()
        .parse(filter)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = BatchWriter::new();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone());
    // A second init (tests start several servers in one process) is harmless: try_init fails,
    // and that writer goes away unstarted.
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
    if installed.is_err() {
        return LogGuard { writer: None };
    }
    let thread = {
        let writer = writer.clone();
        std::thread::Builder::new()
            .name("tollgate-log".into())
            .spawn(move || writer.run(std::io::stderr()))
    };
    match thread {
        Ok(thread) => LogGuard {
            writer: Some((writer, thread)),
        },
        Err(e) => {
            // Nothing would ever write the lines: say so, and let log calls write directly.
            eprintln!("log: cannot start the writer thread ({e}); writing lines directly");
            writer.direct();
            LogGuard { writer: None }
        }
    }
}

/// Lines appended to one buffer, written out in batches by [`BatchWriter::run`].
#[derive(Clone)]
pub struct BatchWriter {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// The writer thread waits here for its tick, a full buffer or the end.
    wake: Condvar,
    /// Log calls wait here while the buffer is at `MAX_BUFFERED`.
    room: Condvar,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    closed: bool,
    /// No writer thread: each line goes to standard error itself.
    direct: bool,
}

impl Default for BatchWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchWriter {
    pub fn new() -> BatchWriter {
        BatchWriter {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                room: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `line` (the writer writes it with the next batch).
    pub fn append(&self, line: &[u8]) {
        let mut state = self.lock();
        if state.direct || state.closed {
            drop(state);
            let _ = std::io::stderr().write_all(line);
            return;
        }
        while state.buffer.len() >= MAX_BUFFERED && !state.closed {
            state = self
                .inner
                .room
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        let before = state.buffer.len();
        state.buffer.extend_from_slice(line);
        if before < WAKE_AT && state.buffer.len() >= WAKE_AT {
            self.inner.wake.notify_one();
        }
    }

    /// The writer thread: every `FLUSH_EVERY` (sooner when `WAKE_AT` bytes wait), everything
    /// buffered goes to `out` in one write; returns once closed and empty.
    pub fn run(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            let closed = {
                let mut state = self.lock();
                // A tick's lines wait for the tick (one write for all of them) unless they are
                // already many.
                if state.buffer.len() < WAKE_AT && !state.closed {
                    state = self
                        .inner
                        .wake
                        .wait_timeout(state, FLUSH_EVERY)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                std::mem::swap(&mut batch, &mut state.buffer);
                state.closed
            };
            self.inner.room.notify_all();
            if !batch.is_empty() {
                // Standard error going away (a closed pipe) loses lines; nothing else could
                // be done with them.
                let _ = out.write_all(&batch);
                let _ = out.flush();
                batch.clear();
                // A burst's big buffer is not kept for good.
                batch.shrink_to(WAKE_AT);
            } else if closed {
                return;
            }
        }
    }

    /// Stops the writer thread once it has written what is buffered.
    fn close(&self) {
        self.lock().closed = true;
        self.inner.wake.notify_one();
        self.inner.room.notify_all();
    }

    fn direct(&self) {
        self.lock().direct = true;
    }
}

/// What a log call writes one event into: the line is formatted here, then appended whole.
pub struct LineWriter {
    line: Vec<u8>,
    to: BatchWriter,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.to.append(&self.line);
        }
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            line: Vec::with_capacity(512),
            to: self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` the test can read back while the writer thread holds it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(buf);
            s.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_whole_in_order_in_few_writes() {
        let writer = BatchWriter::new();
        let sink = Sink::default();
        let thread = {
            let (writer, sink) = (writer.clone(), sink.clone());
            std::thread::spawn(move || writer.run(sink))
        };
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        let mut line = writer.make_writer();
                        // Written in pieces, as the formatter does.
                        write!(line, "t{t} ").unwrap();
                        writeln!(line, "line {i}").unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        writer.close();
        thread.join().unwrap();
        let (bytes, writes) = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("t{t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5_000).collect::<Vec<_>>(), "thread {t}'s lines");
        }
        assert!(writes < 20_000, "{writes} writes for 20,000 lines");
    }

    #[test]
    fn closing_writes_what_is_buffered() {
        let writer = BatchWriter::new();
        let sink = Sink::default();
        writer.append(b"last words\n");
        writer.close();
        writer.run(sink.clone());
        assert_eq!(sink.0.lock().unwrap().0, b"last words\n");
    }
}
