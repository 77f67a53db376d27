//! Which request paths the public port forwards to clients' services.
//!
//! A model server's API is more than inference: Ollama also deletes, pulls,
//! creates and pushes models on plain HTTP paths, and trusts its caller to
//! be its owner. frps forwards only the paths `--forward-paths` lists, by
//! default the inference and read-only ones, so an API key lets a caller
//! use the fleet's models, not manage the boxes serving them.

use std::fmt;

/// The default `--forward-paths`: OpenAI's API under `/v1/`, and Ollama's
/// inference and read-only calls.
pub const DEFAULT_FORWARD_PATHS: &str = "/v1/*,/api/chat,/api/generate,/api/embed,/api/embeddings,/api/tags,/api/show,/api/ps,/api/version";

/// One `--forward-paths` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRule {
    /// `*`: every path.
    All,
    /// `/v1/*`: paths starting with `/v1/`.
    Prefix(String),
    /// `/api/chat`: that path only.
    Exact(String),
}

impl PathRule {
    /// Parses `*`, `/prefix/*` or `/exact/path`.
    pub fn parse(s: &str) -> Result<PathRule, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(PathRule::All);
        }
        if !s.starts_with('/') {
            return Err(format!(
                "`{s}` is not a path rule: give `*`, a path such as /api/chat, or a prefix such as /v1/*"
            ));
        }
        let (body, prefix) = match s.strip_suffix('*') {
            Some(body) => (body, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(format!("`{s}`: `*` may only end a path rule"));
        }
        Ok(match prefix {
            true => PathRule::Prefix(body.to_owned()),
            false => PathRule::Exact(body.to_owned()),
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathRule::All => true,
            PathRule::Prefix(p) => path.starts_with(p.as_str()),
            PathRule::Exact(p) => path == p,
        }
    }
}

impl fmt::Display for PathRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathRule::All => f.write_str("*"),
            PathRule::Prefix(p) => write!(f, "{p}*"),
            PathRule::Exact(p) => f.write_str(p),
        }
    }
}

/// Whether `rules` let `path` through. Under any rule but `*`, a path with
/// a `.` or `..` segment, a backslash, or an escaped dot, slash or
/// backslash is refused: a service that normalises paths would otherwise
/// serve `/v1/../api/delete` as `/api/delete`.
pub fn allowed(rules: &[PathRule], path: &str) -> bool {
    if rules.contains(&PathRule::All) {
        return true;
    }
    if !plain(path) {
        return false;
    }
    rules.iter().any(|r| r.matches(path))
}

/// `path` with its percent-escapes decoded, as the services behind frps
/// (Go's `URL.Path`, Starlette's `path`) route it; borrowed when it has none.
pub fn decoded(path: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(path).decode_utf8_lossy()
}

/// No segment that walks (`.`, `..`), no backslash, no escaped `.`, `/` or
/// `\`.
fn plain(path: &str) -> bool {
    if path.contains('\\') {
        return false;
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return false;
    }
    let bytes = path.as_bytes();
    !bytes.windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'e') | (b'2', b'f') | (b'5', b'c')
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_decoded_as_services_route_them() {
        assert!(matches!(
            decoded("/v1/chat/completions"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(decoded("/v1/chat/%63ompletions"), "/v1/chat/completions");
        assert_eq!(decoded("/api/%73HOW"), "/api/sHOW");
        assert_eq!(decoded("/v1%2Fchat/completions"), "/v1/chat/completions");
        // Not UTF-8: replaced, never a panic.
        assert_eq!(decoded("/v1/%ff"), "/v1/\u{fffd}");
    }

    fn defaults() -> Vec<PathRule> {
        DEFAULT_FORWARD_PATHS
            .split(',')
            .map(|r| PathRule::parse(r).unwrap())
            .collect()
    }

    #[test]
    fn inference_and_read_only_paths_pass_and_management_ones_do_not() {
        let rules = defaults();
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/models",
            "/api/chat",
            "/api/generate",
            "/api/embed",
            "/api/tags",
            "/api/show",
            "/api/ps",
            "/api/version",
        ] {
            assert!(allowed(&rules, path), "{path}");
        }
        for path in [
            "/api/delete",
            "/api/pull",
            "/api/push",
            "/api/create",
            "/api/copy",
            "/api/blobs/sha256:00",
            "/api/chat/extra",
            "/",
            "/slots",
            "/v1",
            "/v1/../api/delete",
            "/v1/./x",
            "/v1/%2e%2e/api/delete",
            "/v1/%2E%2e%2Fapi%2fdelete",
            "/v1/..%5Capi",
            "/v1/\\..\\api",
        ] {
            assert!(!allowed(&rules, path), "{path}");
        }
    }

    #[test]
    fn rules_parse_and_print_back() {
        assert_eq!(PathRule::parse("*"), Ok(PathRule::All));
        assert_eq!(
            PathRule::parse(" /v1/* "),
            Ok(PathRule::Prefix("/v1/".into()))
        );
        assert_eq!(
            PathRule::parse("/api/chat"),
            Ok(PathRule::Exact("/api/chat".into()))
        );
        assert!(
            PathRule::parse("api/chat")
                .unwrap_err()
                .contains("not a path rule")
        );
        assert!(
            PathRule::parse("/v*/chat")
                .unwrap_err()
                .contains("only end")
        );
        assert!(PathRule::parse("").is_err());
        assert_eq!(PathRule::parse("/é"), Ok(PathRule::Exact("/é".into())));
        assert_eq!(PathRule::parse("/é*"), Ok(PathRule::Prefix("/é".into())));
        for rule in defaults() {
            assert_eq!(PathRule::parse(&rule.to_string()), Ok(rule));
        }
        // `*` lets everything through, as before this rule existed.
        assert!(allowed(&[PathRule::All], "/api/delete"));
        assert!(allowed(&[PathRule::All], "/v1/../x"));
        assert!(!allowed(&[], "/v1/chat/completions"));
    }
}
