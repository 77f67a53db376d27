//! Logging set-up, in one place.

use std::io::Write;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Lines of log waiting for standard output at most; past that, further
/// ones are dropped (and counted, [`Reporting`]) until it takes them again.
pub const LOG_QUEUE_LINES: usize = 1024;

/// Installs the global subscriber: `RUST_LOG` if set, else `default_filter`.
/// Every event is one line on standard output: line breaks inside it (a
/// peer's text in a message) are written as `\n` and `\r`, so nothing a
/// peer sends can forge a log line. Colours only on a terminal (a log file
/// or a collector gets no escape codes).
///
/// Lines are written by a thread of their own, [`LOG_QUEUE_LINES`] at most
/// waiting: a standard output that stops taking them (a paused terminal, a
/// log pipe or a container's log driver that blocks) no longer stops every
/// thread that logs (frpc's heartbeats and data, frps's workers); lines
/// past the queue are dropped, and said so when output moves again. Keep
/// the returned guard until the end: dropping it writes what is queued.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(default_filter: &str) -> LogGuard {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .thread_name("log writer")
        .finish(std::io::stdout());
    install(default_filter, Reporting::new(writer), terminal);
    LogGuard(guard)
}

/// Keeps [`init`]'s log writer going; dropped, it writes what is queued
/// (waiting a second at most) and stops.
#[derive(Debug)]
pub struct LogGuard(#[allow(dead_code)] tracing_appender::non_blocking::WorkerGuard);

/// A non-blocking writer that says, in the next line it takes, how many
/// lines it dropped since it last said so.
#[derive(Clone)]
pub struct Reporting {
    writer: tracing_appender::non_blocking::NonBlocking,
    dropped: tracing_appender::non_blocking::ErrorCounter,
    said: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Reporting {
    /// Wraps `writer`.
    pub fn new(writer: tracing_appender::non_blocking::NonBlocking) -> Self {
        Reporting {
            dropped: writer.error_counter(),
            writer,
            said: Default::default(),
        }
    }
}

impl<'a> MakeWriter<'a> for Reporting {
    type Writer = tracing_appender::non_blocking::NonBlocking;

    fn make_writer(&'a self) -> Self::Writer {
        use std::sync::atomic::Ordering;
        let dropped = self.dropped.dropped_lines();
        let said = self.said.load(Ordering::Relaxed);
        if dropped > said
            && self
                .said
                .compare_exchange(said, dropped, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let mut w = self.writer.clone();
            let _ = w.write_all(
                format!(
                    "{} log line(s) dropped: the log output did not take them in time\n",
                    dropped - said
                )
                .as_bytes(),
            );
            // The notice itself found the queue still full: the lines it
            // was to count are said with a later line (its own drop not
            // among them).
            if self.dropped.dropped_lines() > dropped {
                self.said.store(said + 1, Ordering::Relaxed);
            }
        }
        self.writer.clone()
    }
}

/// [`init`] on standard error: for commands whose standard output is their
/// answer (a key created, a table), which a script reads whole.
pub fn init_on_stderr(default_filter: &str) {
    use std::io::IsTerminal;
    install(
        default_filter,
        std::io::stderr,
        std::io::stderr().is_terminal(),
    );
}

/// The subscriber of [`init`] writing to `out`, in colour when `terminal`
/// (and `NO_COLOR` does not say otherwise).
fn install<M>(default_filter: &str, out: M, terminal: bool)
where
    M: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(default_filter))
        .with_ansi(terminal && !no_color())
        .with_writer(OneLine(out))
        .try_init();
}

/// Whether `NO_COLOR` asks for no colours (<https://no-color.org>: set and
/// not empty).
fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// `RUST_LOG` if set, else `default_filter` (checked when the flag was
/// read: [`parse_filter`]); one that is not a filter is said on stderr,
/// not dropped in silence.
fn filter(default_filter: &str) -> EnvFilter {
    if let Ok(env) = std::env::var(EnvFilter::DEFAULT_ENV)
        && !env.trim().is_empty()
    {
        match EnvFilter::try_new(&env) {
            Ok(f) => return f,
            Err(e) => eprintln!(
                "{}={env:?} is not a log filter ({e}); logging with {default_filter:?}",
                EnvFilter::DEFAULT_ENV
            ),
        }
    }
    EnvFilter::try_new(default_filter).unwrap_or_else(|e| {
        eprintln!("{default_filter:?} is not a log filter ({e}); logging with \"info\"");
        EnvFilter::new("info")
    })
}

/// Reads a `--log` value: a filter as `RUST_LOG` takes (`info`,
/// `frps=debug,hyper=warn`), or a clear error at start.
pub fn parse_filter(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a log filter such as `info` or `frps=debug,hyper=warn`: {e}"))
}

/// A [`MakeWriter`] whose writers hand an event's text to the inner writer
/// on one line: at once when it comes in one write ending its line (as the
/// fmt layer writes, one writer per event), else when dropped.
#[derive(Debug, Clone, Copy)]
pub struct OneLine<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for OneLine<M> {
    type Writer = EventBuffer<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EventBuffer {
            text: Vec::new(),
            out: self.0.make_writer(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        EventBuffer {
            text: Vec::new(),
            out: self.0.make_writer_for(meta),
        }
    }
}

/// One event's text on its way to `out`.
#[derive(Debug)]
pub struct EventBuffer<W: Write> {
    text: Vec<u8>,
    out: W,
}

impl<W: Write> Write for EventBuffer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer hands over a whole event in one write: passed on
        // as it is, without a copy, when it holds no break to escape.
        if self.text.is_empty() && buf.ends_with(b"\n") {
            self.out.write_all(&one_line(buf))?;
            return Ok(buf.len());
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for EventBuffer<W> {
    fn drop(&mut self) {
        if self.text.is_empty() {
            return;
        }
        let line = one_line(&self.text);
        let _ = self.out.write_all(&line);
        let _ = self.out.flush();
    }
}

/// `text` with every line break but a final `\n` written as `\n` or `\r`.
pub fn one_line(text: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let (body, end) = match text.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (text, &b""[..]),
    };
    if !body.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        return text.into();
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(end);
    out.into()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn line_breaks_inside_an_event_are_escaped() {
        assert_eq!(&*one_line(b"plain\n"), b"plain\n");
        assert_eq!(&*one_line(b"no end"), b"no end");
        assert_eq!(
            &*one_line(b"a\nb\r\nc\n"),
            b"a\\nb\\r\\nc\n",
            "only the last break stays"
        );
    }

    /// A shared buffer as the inner writer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An output that takes nothing until released, then keeps all.
    #[derive(Clone, Default)]
    struct Stalled {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        taken: Captured,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, changed) = &*self.open;
            let mut open = open.lock().unwrap();
            while !*open {
                open = changed.wait(open).unwrap();
            }
            self.taken.write(buf)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A log output that stops taking lines does not stop the threads that
    /// log: lines past the queue are dropped, and said to be once the
    /// output takes lines again.
    #[test]
    fn a_stalled_log_output_holds_up_no_one() {
        let out = Stalled::default();
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .buffered_lines_limit(8)
            .lossy(true)
            .finish(out.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(OneLine(Reporting::new(writer)))
            .finish();
        let dispatch = tracing::Dispatch::new(subscriber);
        let logging = dispatch.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tracing::dispatcher::with_default(&logging, || {
                for i in 0..1000 {
                    tracing::warn!("line {i}");
                }
            });
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("logging went on while the output took nothing");
        // The output takes lines again.
        {
            let (open, changed) = &*out.open;
            *open.lock().unwrap() = true;
            changed.notify_all();
        }
        let taken = || String::from_utf8(out.taken.0.lock().unwrap().clone()).unwrap();
        // A line while the queue is still full is dropped, as is the
        // notice it brings; both are counted for the next.
        tracing::dispatcher::with_default(&dispatch, || tracing::warn!("while full"));
        // Once the queue has room (the first 8 lines, always kept, are
        // out), the next line says what was lost.
        let waited = std::time::Instant::now();
        while !taken().contains("line 7\n") {
            assert!(
                waited.elapsed() < std::time::Duration::from_secs(10),
                "{}",
                taken()
            );
            std::thread::yield_now();
        }
        tracing::dispatcher::with_default(&dispatch, || tracing::warn!("after"));
        drop(dispatch);
        drop(guard);
        let text = taken();
        // Every line lost is counted once, in one notice or another: 1,000
        // lines, of which the queue's 8 and the one being written were
        // kept, and the line while full (or it was kept).
        let counted: usize = text
            .lines()
            .filter(|l| l.contains("log line(s) dropped"))
            .map(|l| l.split(' ').next().unwrap().parse::<usize>().unwrap())
            .sum();
        assert!((990..=1001).contains(&counted), "{counted}: {text}");
        assert!(text.contains("after"), "{text}");
        assert!(text.lines().count() < 100, "{text}");
    }

    #[test]
    fn a_peer_text_with_line_breaks_stays_on_its_event_line() {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(OneLine(move || sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let message = "bye\n2026-12-03T00:00:00Z  INFO frps: Client 'victim' registered";
            tracing::warn!("client reported an error: {message}");
            tracing::info!("next");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("bye\\n2026"), "{text}");
        assert!(lines[1].ends_with("next"), "{text}");
    }
}
