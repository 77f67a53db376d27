//! Logging set-up, in one place.

use std::io::Write;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Installs the global subscriber: `RUST_LOG` if set, else `default_filter`.
/// Every event is one line on standard output: line breaks inside it (a
/// peer's text in a message) are written as `\n` and `\r`, so nothing a
/// peer sends can forge a log line. Colours only on a terminal (a log file
/// or a collector gets no escape codes).
pub fn init(default_filter: &str) {
    use std::io::IsTerminal;
    install(
        default_filter,
        std::io::stdout,
        std::io::stdout().is_terminal(),
    );
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
