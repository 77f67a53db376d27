//! `frps --monitor`: one table of the fleet, read from a running frps's
//! management API; `--watch` redraws it every 2 s.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::api::types::{ClientSummary, Monitoring};
use crate::config::Config;

/// Largest API answer read: a page of [`PAGE_ROWS`] boxes, each of whose
/// reports can be hundreds of KiB (1,024 long model names, many disks and
/// GPUs).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Rows asked for per page of a listing.
const PAGE_ROWS: usize = 200;
/// Deadline for one API call.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The API of the frps `config` describes: its `--api-bind` address (the
/// loopback address of its family when that is unspecified) and port.
fn default_url(config: &Config) -> String {
    let host = match config.api_bind {
        ip if ip.is_unspecified() && ip.is_ipv6() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!(
        "http://{}",
        std::net::SocketAddr::new(host, config.api_port)
    )
}

/// Prints the table (or keeps redrawing it with `--watch`).
pub async fn run(config: &Config, out: &mut dyn Write) -> anyhow::Result<()> {
    let base = config
        .api_url
        .clone()
        .unwrap_or_else(|| default_url(config));
    let token = config.admin_token();
    if !config.watch {
        writeln!(out, "{}", fleet_table(&base, token).await?)?;
        return Ok(out.flush()?);
    }
    // One Ctrl-C listener for the whole watch, heard during a fetch too.
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let fetched = tokio::select! {
            fetched = fleet_table(&base, token) => fetched,
            _ = &mut stop => return Ok(()),
        };
        // Clear the screen and home the cursor before each redraw.
        write!(out, "\x1b[2J\x1b[H")?;
        match fetched {
            Ok(table) => writeln!(out, "{table}")?,
            // frps restarting, say: said, and tried again at the next turn.
            Err(e) => writeln!(out, "cannot read the fleet from {base}: {e:#}; retrying")?,
        }
        out.flush()?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}

/// Builds the fleet table from the API at `base`.
pub async fn fleet_table(base: &str, token: Option<&str>) -> anyhow::Result<Table> {
    let clients: Vec<ClientSummary> = get_all(base, "/api/clients", token).await?;
    let monitoring: Vec<Monitoring> = get_all(base, "/api/monitoring", token).await?;
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "client",
        "status",
        "CPU %",
        "memory",
        "disk",
        "GPU",
        "models",
        "in-flight",
        "last heartbeat",
    ]);
    let systems: std::collections::HashMap<&str, _> = monitoring
        .iter()
        .filter_map(|m| Some((m.id.as_str(), (m.system.as_ref()?, m.system_secs_ago))))
        .collect();
    for c in clients {
        let sys = systems.get(c.id.as_str()).copied();
        let (cpu, memory, disk, gpu) = match sys {
            Some((s, age)) => (
                cpu_cell(s.cpu_usage, age),
                format!("{} / {}", gib(s.memory_used), gib(s.memory_total)),
                s.disks
                    .iter()
                    .map(|d| format!("{} {} / {}", clean(&d.mount), gib(d.used), gib(d.total)))
                    .collect::<Vec<_>>()
                    .join("\n"),
                if s.gpus.is_empty() {
                    "-".to_owned()
                } else {
                    s.gpus
                        .iter()
                        .map(|g| {
                            format!(
                                "{} {:.0}% {} / {}",
                                clean(&g.name),
                                g.utilization,
                                gib(g.memory_used),
                                gib(g.memory_total)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        table.add_row(vec![
            clean(&c.id),
            clean(&c.status),
            cpu,
            memory,
            disk,
            gpu,
            if c.models.is_empty() {
                "-".into()
            } else {
                c.models
                    .iter()
                    .map(|m| clean(m))
                    .collect::<Vec<_>>()
                    .join("\n")
            },
            c.in_flight.to_string(),
            format!("{:.1}s ago", c.last_heartbeat_secs_ago),
        ]);
    }
    Ok(table)
}

/// `text` (reported by a client) safe to print on an operator's terminal:
/// control characters (escape sequences, line breaks) and invisible
/// formatting ones (bidirectional overrides that show the rest of a row
/// reversed, zero-width characters that throw the columns out, line and
/// paragraph separators) shown as `�`.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || invisible(c) {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// Unicode's invisible formatting characters a terminal acts on: bidi
/// marks, embeddings, overrides and isolates, zero-width characters, the
/// line and paragraph separators, word joiners and the byte-order mark.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// Metrics older than this are shown with their age: frpc sends them
/// every `--metrics-interval` (10 s by default), and none while reading
/// them hangs (a stuck network mount, a wedged GPU driver).
pub const STALE_METRICS_SECS: f64 = 60.0;

/// The CPU column: the usage, and the metrics' age once they are stale.
fn cpu_cell(usage: f32, age: Option<f64>) -> String {
    match age {
        Some(age) if age >= STALE_METRICS_SECS => format!("{usage:.1}\n({age:.0}s old)"),
        _ => format!("{usage:.1}"),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Pages one listing is read in at most (10 million clients at the API's
/// 1,000 a page): a server that keeps naming a next page is not followed
/// for ever.
const MAX_PAGES: usize = 10_000;

/// GETs every page of the listing at `path` (following the `Link` headers
/// that name the next one) and returns their `data` in order.
async fn get_all<T: serde::de::DeserializeOwned>(
    base: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<Vec<T>> {
    get_pages(base, path, token, MAX_PAGES).await
}

/// [`get_all`], reading at most `max_pages` pages.
async fn get_pages<T: serde::de::DeserializeOwned>(
    base: &str,
    path: &str,
    token: Option<&str>,
    max_pages: usize,
) -> anyhow::Result<Vec<T>> {
    let mut all = Vec::new();
    // Pages of PAGE_ROWS: a page of the API's 1,000 boxes, each listing
    // 1,024 long model names, could pass MAX_BODY.
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut next = Some(format!("{path}{sep}limit={PAGE_ROWS}"));
    for _ in 0..max_pages {
        let Some(page) = next.take() else {
            return Ok(all);
        };
        let (items, link) = get_page::<Vec<T>>(base, &page, token, MAX_BODY).await?;
        all.extend(items);
        next = link;
    }
    if next.is_none() {
        return Ok(all);
    }
    bail!("{path} named more than {max_pages} pages; this monitor reads at most that")
}

/// GETs `path` from the API, reading at most `max_body` bytes of the
/// answer, and returns the envelope's `data`.
#[cfg(test)]
async fn get_within<T: serde::de::DeserializeOwned>(
    base: &str,
    path: &str,
    token: Option<&str>,
    max_body: usize,
) -> anyhow::Result<T> {
    Ok(get_page(base, path, token, max_body).await?.0)
}

/// The next page a `Link` header names (`<path?query>; rel="next"`), when
/// it names one on this API.
fn next_page(headers: &hyper::HeaderMap) -> Option<String> {
    headers.get_all(header::LINK).iter().find_map(|v| {
        let (target, params) = v.to_str().ok()?.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let next = params.split(';').any(|p| p.trim() == "rel=\"next\"");
        (next && target.starts_with("/api/")).then(|| target.to_owned())
    })
}

/// GETs `path` (with its query) from the API, reading at most `max_body`
/// bytes of the answer; returns the envelope's `data` and the next page
/// the answer names.
async fn get_page<T: serde::de::DeserializeOwned>(
    base: &str,
    path: &str,
    token: Option<&str>,
    max_body: usize,
) -> anyhow::Result<(T, Option<String>)> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let uri: Uri = url
        .parse()
        .with_context(|| format!("`{url}` is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--api-url must be an http:// URL, got `{base}`");
    }
    let authority = uri.authority().context("--api-url needs a host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let call = async {
        // An IPv6 literal comes bracketed (`[::1]`); the socket wants it bare.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let stream = TcpStream::connect((host, port)).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::get(target).header(header::HOST, authority.as_str());
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new())?)
            .await?;
        let status = resp.status();
        let next = next_page(resp.headers());
        let body = match Limited::new(resp.into_body(), max_body).collect().await {
            Ok(body) => body.to_bytes(),
            // Reached, but the answer is too large to show: not a
            // connection problem.
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Ok(Err(anyhow::anyhow!(
                    "{url} answered with more than {max_body} bytes; this monitor reads at most that"
                )));
            }
            Err(e) => return Err(anyhow::anyhow!("{e}")),
        };
        Ok::<_, anyhow::Error>(Ok((status, body, next)))
    };
    let (status, body, next) = tokio::time::timeout(TIMEOUT, call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {TIMEOUT:?}"))
        .and_then(|r| r)
        .with_context(|| format!("cannot reach the frps management API at {base}"))??;
    let envelope: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(envelope) => envelope,
        // A bare 400/431 of the HTTP layer, a proxy's HTML page: its status
        // says more than the JSON error would.
        Err(e) if !status.is_success() => {
            bail!(
                "the frps management API answered {status} for {path}, without its JSON envelope ({e})"
            )
        }
        Err(e) => return Err(e).with_context(|| format!("{url} did not answer with JSON")),
    };
    if !status.is_success() {
        let message = envelope["message"].as_str().unwrap_or("no message");
        bail!("the frps management API answered {status} for {path}: {message}");
    }
    let data = serde_json::from_value(envelope["data"].clone())
        .with_context(|| format!("unexpected answer from {url}"))?;
    Ok((data, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_follows_the_api_bind_address() {
        let url = |bind: &str| {
            let cfg = <Config as clap::Parser>::parse_from([
                "frps",
                "--api-bind",
                bind,
                "--api-port",
                "9001",
            ]);
            default_url(&cfg)
        };
        assert_eq!(url("127.0.0.1"), "http://127.0.0.1:9001");
        assert_eq!(url("10.0.0.5"), "http://10.0.0.5:9001");
        assert_eq!(url("::1"), "http://[::1]:9001");
        assert_eq!(url("0.0.0.0"), "http://127.0.0.1:9001");
        assert_eq!(url("::"), "http://[::1]:9001");
    }

    #[test]
    fn stale_metrics_are_shown_with_their_age() {
        assert_eq!(cpu_cell(12.34, Some(9.0)), "12.3");
        assert_eq!(cpu_cell(12.34, None), "12.3");
        assert_eq!(cpu_cell(12.34, Some(75.4)), "12.3\n(75s old)");
    }

    #[test]
    fn client_text_cannot_drive_the_terminal() {
        // OSC 52 (write the clipboard), a screen clear, a forged line.
        let hostile = "llama3\u{1b}]52;c;ZWNobyBwd25lZA==\u{7}\u{1b}[2J\nfake-row";
        let shown = clean(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.starts_with("llama3\u{fffd}]52;"));
        assert_eq!(clean("qwen2.5:1.5b ü"), "qwen2.5:1.5b ü");
        // A right-to-left override shows the rest of the row reversed; a
        // zero-width space and a line separator throw the columns out.
        assert_eq!(
            clean("llama\u{202E}ecnetsixe\u{200B}x\u{2028}y\u{2066}z"),
            "llama\u{fffd}ecnetsixe\u{fffd}x\u{fffd}y\u{fffd}z"
        );
        // Letters of right-to-left scripts are text, not formatting.
        assert_eq!(clean("نموذج"), "نموذج");
    }

    #[test]
    fn the_next_page_is_read_from_the_link_header() {
        let next = |links: &[&str]| {
            let mut h = hyper::HeaderMap::new();
            for l in links {
                h.append(header::LINK, l.parse().unwrap());
            }
            next_page(&h)
        };
        assert_eq!(
            next(&["</api/clients?limit=2&after=b-1>; rel=\"next\""]).as_deref(),
            Some("/api/clients?limit=2&after=b-1")
        );
        assert_eq!(
            next(&[
                "</x>; rel=\"prev\"",
                "</api/monitoring?after=a> ; rel=\"next\""
            ])
            .as_deref(),
            Some("/api/monitoring?after=a")
        );
        // Not a next page, or not on this API: the listing ends there.
        assert_eq!(next(&[]), None);
        assert_eq!(next(&["</api/clients?after=a>; rel=\"prev\""]), None);
        assert_eq!(
            next(&["<http://elsewhere/api/clients>; rel=\"next\""]),
            None
        );
        assert_eq!(next(&["/api/clients; rel=\"next\""]), None);
    }

    /// A fake API answering `pages` pages of one id each, each but the last
    /// naming the next; returns its base URL.
    async fn paged_api(pages: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut head = [0u8; 1024];
                let n = s.read(&mut head).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..n]);
                // `GET /api/ids?after=N HTTP/1.1`: page N + 1.
                let at: usize = head
                    .split_once("after=")
                    .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
                    .map_or(0, |n: usize| n + 1);
                let body = format!(r#"{{"success":true,"data":["{at}"],"message":"a page"}}"#);
                let link = if at + 1 < pages {
                    format!("link: </api/ids?after={at}>; rel=\"next\"\r\n")
                } else {
                    String::new()
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{link}content-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        base
    }

    #[tokio::test]
    async fn every_page_of_a_listing_is_read() {
        let base = paged_api(3).await;
        let ids: Vec<String> = get_all(&base, "/api/ids", None).await.unwrap();
        assert_eq!(ids, ["0", "1", "2"]);
        // A server naming pages without end is not followed for ever.
        let base = paged_api(usize::MAX).await;
        let err = get_pages::<String>(&base, "/api/ids", None, 5)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("more than 5 pages"), "{err:#}");
        // Exactly as many pages as allowed is fine.
        let base = paged_api(5).await;
        let ids: Vec<String> = get_pages(&base, "/api/ids", None, 5).await.unwrap();
        assert_eq!(ids.len(), 5);
    }

    /// A fake API answering every request with `status`, `content_type`
    /// and `body`; returns its base URL.
    async fn answering(status: &'static str, content_type: &'static str, body: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut head = [0u8; 1024];
                let _ = s.read(&mut head).await;
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        base
    }

    /// An error answer without the API's envelope (a bare 431, a proxy's
    /// page) is named by its status, not as "did not answer with JSON".
    #[tokio::test]
    async fn an_error_without_the_envelope_is_named_by_its_status() {
        let base = answering(
            "502 Bad Gateway",
            "text/html",
            "<html>Bad Gateway</html>".into(),
        )
        .await;
        let err = get_all::<ClientSummary>(&base, "/api/clients", None)
            .await
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("answered 502 Bad Gateway for /api/clients"),
            "{text}"
        );
    }

    /// An answer over the limit is said to be one, not "cannot reach".
    #[tokio::test]
    async fn an_answer_too_large_is_not_called_unreachable() {
        let body = format!(
            r#"{{"success":true,"data":[],"message":"{}"}}"#,
            "x".repeat(500)
        );
        let base = answering("200 OK", "application/json", body).await;
        let err = get_within::<Vec<ClientSummary>>(&base, "/api/clients", None, 100)
            .await
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("more than 100 bytes"), "{text}");
        assert!(!text.contains("cannot reach"), "{text}");
        let listed: Vec<ClientSummary> =
            get_within(&base, "/api/clients", None, 4096).await.unwrap();
        assert!(listed.is_empty());
    }
}
