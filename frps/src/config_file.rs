//! `frps --config FILE`: frp's INI form (`frps.ini`) or TOML form
//! (`*.toml`), feeding the same flags (see [`common::config_file`]).
//!
//! - INI: `[common]` holds settings named like the flags in snake_case
//!   (`proxy_port`, `database_url`, ...; frp's `bind_port` is the control
//!   port); each `[plugin.NAME]` section holds a server plugin's `addr`,
//!   `path` and `ops` (comma-separated).
//! - TOML: the same settings at the top level, in frp's camelCase
//!   (`bindPort`) or in snake_case, and `[[httpPlugins]]` entries with
//!   `name`, `addr`, `path` and `ops` (an array of strings).
//!
//! Flags and environment variables override the file; unknown keys and bad
//! values are errors naming the file, line and key.

use std::ffi::OsString;
use std::path::Path;

use clap::{CommandFactory, FromArgMatches};
use common::config_file::{self, FileArgs, FileError, LoadError, line_of, parse_ini};
use toml::de::{DeTable, DeValue};

use crate::Cli;
use crate::plugins::PluginSpec;

/// frp's names for frpx settings.
const ALIASES: &[(&str, &str)] = &[("bind_port", "control_port")];

/// The command line of this process, with the file it names.
pub fn load() -> Result<Cli, LoadError> {
    load_from(std::env::args_os())
}

/// Parses `args` (program name first), reading the configuration file the
/// command line or `FRPX_CONFIG` names.
pub fn load_from<I, T>(args: I) -> Result<Cli, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // An empty prefix is a prefix (none), as it was before blank
    // variables counted as unset: a fleet running with one keeps hearing
    // its revocations.
    let (matches, plugins) =
        config_file::load_keeping(Cli::command(), args, "config_file", &["redis_prefix"], read)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    cli.config.plugins = plugins.unwrap_or_default();
    Ok(cli)
}

/// `(a, b)`: flag `a` requires flag `b` (clap's `requires`, which clap
/// does not let [`FileArgs`] read).
const REQUIRES: &[(&str, &str)] = &[
    ("tls_cert", "tls_key"),
    ("tls_key", "tls_cert"),
    ("public_tls_cert", "public_tls_key"),
    ("public_tls_key", "public_tls_cert"),
    ("watch", "monitor"),
];

fn read(file: &mut FileArgs<'_>, text: &str) -> Result<Vec<PluginSpec>, FileError> {
    for (a, b) in REQUIRES {
        file.requires(a, b);
    }
    file.conflicts("tls_self_signed", "tls_cert");
    file.command_only("monitor");
    file.command_only("watch");
    let toml = file
        .path()
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
    if toml {
        read_toml(file, text)
    } else {
        read_ini(file, text)
    }
}

/// One setting: `name` is frp's alias or the flag's snake_case, `key` the
/// key as the file writes it.
fn setting(
    file: &mut FileArgs<'_>,
    name: &str,
    key: &str,
    value: &str,
    line: usize,
) -> Result<(), FileError> {
    file.set(setting_id(name), key, value, line)
}

/// The flag id of setting `name` (frp's alias or the flag's snake_case).
fn setting_id(name: &str) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, id)| id)
}

fn read_ini(file: &mut FileArgs<'_>, text: &str) -> Result<Vec<PluginSpec>, FileError> {
    let path = file.path().to_owned();
    let mut plugins = Vec::new();
    for section in parse_ini(&path, text)? {
        if section.name == "common" {
            for e in &section.entries {
                setting(file, &e.key, &e.key, &e.value, e.line)?;
            }
        } else if let Some(name) = section.name.strip_prefix("plugin.") {
            let mut fields: [Option<(&str, usize)>; 3] = [None; 3];
            let mut tls_verify = false;
            for e in &section.entries {
                let slot = match e.key.as_str() {
                    "addr" => 0,
                    "path" => 1,
                    "ops" => 2,
                    TLS_VERIFY => {
                        tls_verify = true;
                        continue;
                    }
                    _ => {
                        return Err(FileError::at(
                            &path,
                            e.line,
                            &e.key,
                            format!(
                                "unknown key in [{}] (expected addr, path, ops)",
                                section.name
                            ),
                        ));
                    }
                };
                fields[slot] = Some((e.value.as_str(), e.line));
            }
            let [addr, plugin_path, ops] = fields;
            let line_of_field = |field: &str| {
                match field {
                    "addr" => addr,
                    "path" => plugin_path,
                    "ops" => ops,
                    _ => None,
                }
                .map_or(section.line, |(_, line)| line)
            };
            let ops: Vec<&str> = ops.map_or("", |(v, _)| v).split(',').collect();
            let spec = PluginSpec::new(
                name,
                addr.map_or("", |(v, _)| v),
                plugin_path.map_or("", |(v, _)| v),
                &ops,
            )
            .map_err(|e| FileError::at(&path, line_of_field(e.field), e.field, e.message))?;
            plugins.push(with_tls_verify(spec, tls_verify));
        } else {
            return Err(FileError::at(
                &path,
                section.line,
                &format!("[{}]", section.name),
                "unknown section (expected [common] or [plugin.NAME])",
            ));
        }
    }
    Ok(plugins)
}

/// frp's `tls_verify` for an `https://` plugin: taken so an frp
/// configuration starts, and said at start, since frps calls plugins over
/// plain HTTP only (an `https://` address is refused).
const TLS_VERIFY: &str = "tls_verify";

fn with_tls_verify(mut spec: PluginSpec, given: bool) -> PluginSpec {
    if given {
        spec.unused
            .push("tls_verify (frps calls plugins over plain HTTP)".into());
    }
    spec
}

/// `bindPort` → `bind_port`; snake_case stays as it is.
fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A scalar TOML value as the text a flag would take.
fn scalar(value: &DeValue<'_>) -> Option<String> {
    match value {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .ok()
            .map(|n| n.to_string()),
        DeValue::Float(f) => Some(f.as_str().to_owned()),
        DeValue::Boolean(b) => Some(b.to_string()),
        DeValue::Datetime(_) | DeValue::Array(_) | DeValue::Table(_) => None,
    }
}

fn read_toml(file: &mut FileArgs<'_>, text: &str) -> Result<Vec<PluginSpec>, FileError> {
    let path = file.path().to_owned();
    let doc = DeTable::parse(text).map_err(|e| FileError {
        path: path.clone(),
        line: e.span().map(|s| line_of(text, s.start)),
        key: None,
        message: e.message().trim().to_owned(),
    })?;
    let mut plugins = Vec::new();
    for (key, value) in doc.get_ref() {
        let line = line_of(text, key.span().start);
        let name = key.get_ref().as_ref();
        if matches!(name, "httpPlugins" | "http_plugins") {
            let DeValue::Array(entries) = value.get_ref() else {
                return Err(FileError::at(
                    &path,
                    line,
                    name,
                    "expected [[httpPlugins]] entries",
                ));
            };
            for entry in entries.iter() {
                let spec = toml_plugin(&path, text, entry)?;
                if let Some(dup) = plugins.iter().find(|p: &&PluginSpec| p.name == spec.name) {
                    let line = line_of(text, entry.span().start);
                    return Err(FileError::at(
                        &path,
                        line,
                        "name",
                        format!("a plugin named '{}' is already configured", dup.name),
                    ));
                }
                plugins.push(spec);
            }
            continue;
        }
        if let DeValue::Array(items) = value.get_ref() {
            // A list flag (`forwardPaths = ["/v1/*", "/api/*"]`).
            let Some(items) = items
                .iter()
                .map(|i| scalar(i.get_ref()))
                .collect::<Option<Vec<String>>>()
            else {
                return Err(FileError::at(
                    &path,
                    line,
                    name,
                    "expected an array of single values",
                ));
            };
            file.set_list(setting_id(&snake_case(name)), name, &items, line)?;
            continue;
        }
        let Some(text_value) = scalar(value.get_ref()) else {
            return Err(FileError::at(
                &path,
                line,
                name,
                "unknown key, or not a single value",
            ));
        };
        setting(file, &snake_case(name), name, &text_value, line)?;
    }
    Ok(plugins)
}

fn toml_plugin(
    path: &Path,
    text: &str,
    entry: &toml::Spanned<DeValue<'_>>,
) -> Result<PluginSpec, FileError> {
    let entry_line = line_of(text, entry.span().start);
    let DeValue::Table(table) = entry.get_ref() else {
        return Err(FileError::at(
            path,
            entry_line,
            "httpPlugins",
            "each entry must be a table ([[httpPlugins]])",
        ));
    };
    let mut strings: [(&str, String, usize); 3] = [
        ("name", String::new(), entry_line),
        ("addr", String::new(), entry_line),
        ("path", String::new(), entry_line),
    ];
    let mut ops: (Vec<String>, usize) = (Vec::new(), entry_line);
    let mut tls_verify = false;
    for (key, value) in table {
        let line = line_of(text, key.span().start);
        let name = key.get_ref().as_ref();
        if snake_case(name) == TLS_VERIFY {
            tls_verify = true;
            continue;
        }
        if name == "ops" {
            let DeValue::Array(items) = value.get_ref() else {
                return Err(FileError::at(
                    path,
                    line,
                    name,
                    "expected an array of operation names",
                ));
            };
            for item in items.iter() {
                let DeValue::String(op) = item.get_ref() else {
                    return Err(FileError::at(
                        path,
                        line,
                        name,
                        "expected an array of operation names",
                    ));
                };
                ops.0.push(op.to_string());
            }
            ops.1 = line;
            continue;
        }
        let Some(slot) = strings.iter_mut().find(|(field, _, _)| *field == name) else {
            return Err(FileError::at(
                path,
                line,
                name,
                "unknown key in [[httpPlugins]] (expected name, addr, path, ops)",
            ));
        };
        let DeValue::String(v) = value.get_ref() else {
            return Err(FileError::at(path, line, name, "expected a string"));
        };
        slot.1 = v.to_string();
        slot.2 = line;
    }
    let [(_, name, _), (_, addr, _), (_, plugin_path, _)] = &strings;
    let op_names: Vec<&str> = ops.0.iter().map(String::as_str).collect();
    let spec = PluginSpec::new(name, addr, plugin_path, &op_names).map_err(|e| {
        let line = match e.field {
            "ops" => ops.1,
            field => strings
                .iter()
                .find(|(f, _, _)| *f == field)
                .map_or(entry_line, |(_, _, line)| *line),
        };
        FileError::at(path, line, e.field, e.message)
    })?;
    Ok(with_tls_verify(spec, tls_verify))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::Op;
    use std::time::Duration;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("frps-cf-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn load(name: &str, text: &str, flags: &[&str]) -> Result<Cli, LoadError> {
        let path = write(name, text);
        let mut args = vec![
            "frps".to_owned(),
            "--config".into(),
            path.display().to_string(),
        ];
        args.extend(flags.iter().map(|s| s.to_string()));
        let res = load_from(args);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        res
    }

    fn file_error(res: Result<Cli, LoadError>) -> FileError {
        match res {
            Err(LoadError::File(e)) => e,
            Err(other) => panic!("expected a file error, got {other}"),
            Ok(_) => panic!("expected a file error, got a configuration"),
        }
    }

    #[test]
    fn ini_settings_and_plugins() {
        let cli = load(
            "frps.ini",
            "[common]\nbind_port = 7000\nproxy_port = 7001\nplugin_timeout = 250ms\nredis_url = none\n\n[plugin.a]\naddr = 127.0.0.1:9000\npath = /handler\nops = Login, NewProxy\n\n[plugin.b]\naddr = http://127.0.0.1:9001\nops = Ping\n",
            &[],
        )
        .unwrap();
        let c = cli.config;
        assert_eq!((c.control_port, c.proxy_port), (7000, 7001));
        assert_eq!(c.plugin_timeout, Duration::from_millis(250));
        assert_eq!(c.plugins.len(), 2);
        assert_eq!(c.plugins[0].name, "a");
        assert_eq!(c.plugins[0].ops, [Op::Login, Op::NewProxy]);
        assert_eq!(c.plugins[1].addr, "127.0.0.1:9001");
        assert_eq!(c.plugins[1].path, "/");
    }

    #[test]
    fn flags_override_the_file() {
        let cli = load(
            "frps.ini",
            "[common]\nbind_port = 7000\npublic_port = 8080\n",
            &["--control-port", "7100"],
        )
        .unwrap();
        assert_eq!(cli.config.control_port, 7100);
        assert_eq!(cli.config.public_port, 8080);
    }

    #[test]
    fn a_flag_conflicting_with_the_files_setting_wins() {
        let file = "[common]\ntls_cert = /etc/frps/cert.pem\ntls_key = /etc/frps/key.pem\n";
        // The file's certificate pair, both halves, gives way.
        let c = load("frps.ini", file, &["--tls-self-signed"])
            .unwrap()
            .config;
        assert!(c.tls_self_signed);
        assert_eq!((c.tls_cert, c.tls_key), (None, None));
        // Without the flag, the file counts.
        let c = load("frps.ini", file, &[]).unwrap().config;
        assert!(!c.tls_self_signed);
        assert_eq!(c.tls_cert.unwrap(), Path::new("/etc/frps/cert.pem"));
        assert_eq!(c.tls_key.unwrap(), Path::new("/etc/frps/key.pem"));
        // And the other way round.
        let c = load(
            "frps.toml",
            "tls_self_signed = true\n",
            &["--tls-cert", "/c.pem", "--tls-key", "/k.pem"],
        )
        .unwrap()
        .config;
        assert!(!c.tls_self_signed);
        assert_eq!(c.tls_cert.unwrap(), Path::new("/c.pem"));
        // A file that contradicts itself is still refused, at start.
        let both = "[common]\ntls_cert = /c\ntls_key = /k\ntls_self_signed = true\n";
        let c = load("frps.ini", both, &[]).unwrap().config;
        assert!(c.tls_self_signed && c.tls_cert.is_some());
    }

    #[test]
    fn every_flag_that_requires_another_is_declared() {
        // clap does not say which flags a flag requires: ask it, flag by
        // flag, so a new `requires` cannot be missed in REQUIRES.
        use clap::error::ErrorKind;
        let cmd = Cli::command();
        // Each flag alone, with a value its parser takes.
        let alone = |arg: &clap::Arg| -> Option<clap::error::Error> {
            let long = arg.get_long()?;
            if !arg.get_action().takes_values() {
                return cmd
                    .clone()
                    .try_get_matches_from(["frps".to_owned(), format!("--{long}")])
                    .err();
            }
            let possible = arg.get_possible_values();
            let own = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .chain(possible.iter().map(|v| v.get_name().to_owned()));
            let any = [
                "1",
                "1s",
                "k=v",
                "127.0.0.1",
                "http://127.0.0.1:1",
                "127.0.0.1:1",
            ];
            own.chain(any.iter().map(|v| v.to_string()))
                .map(|v| {
                    cmd.clone()
                        .try_get_matches_from(["frps".to_owned(), format!("--{long}={v}")])
                })
                .find(|r| {
                    !matches!(r, Err(e) if matches!(e.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue))
                })
                .unwrap_or_else(|| panic!("no sample value for --{long}"))
                .err()
        };
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            let requires =
                alone(arg).is_some_and(|e| e.kind() == ErrorKind::MissingRequiredArgument);
            let declared: Vec<&str> = REQUIRES
                .iter()
                .filter(|(a, _)| *a == id)
                .map(|(_, b)| *b)
                .collect();
            assert_eq!(
                requires,
                !declared.is_empty(),
                "--{id}: REQUIRES must list exactly the flags clap requires"
            );
            for b in declared {
                let long = cmd
                    .get_arguments()
                    .find(|a| a.get_id() == b)
                    .and_then(|a| a.get_long())
                    .unwrap_or_else(|| panic!("REQUIRES names an unknown flag {b}"));
                let message = alone(arg).unwrap().to_string();
                assert!(
                    message.contains(&format!("--{long}")),
                    "{id} → {b}: {message}"
                );
            }
        }
    }

    #[test]
    fn a_list_flag_replaces_the_files_list() {
        let file = "[common]\nforward_paths = *\n";
        let all = load("frps.ini", file, &[]).unwrap().config.forward_paths;
        assert!(crate::paths::allowed(&all, "/api/delete"));
        // The flag's list alone: the file's `*` would let everything through.
        let cli = load("frps.ini", file, &["--forward-paths", "/v1/*"]).unwrap();
        let paths = cli.config.forward_paths;
        assert_eq!(paths.len(), 1, "{paths:?}");
        assert!(crate::paths::allowed(&paths, "/v1/chat/completions"));
        assert!(!crate::paths::allowed(&paths, "/api/delete"));
        // Named twice in the file is an error, as for any one setting.
        let e = file_error(load(
            "frps.ini",
            "[common]\nforward_paths = /v1/*\nforward_paths = *\n",
            &[],
        ));
        assert!(e.to_string().contains("key repeated"), "{e}");
    }

    #[test]
    fn ini_errors_name_file_line_and_key() {
        let e = file_error(load(
            "frps.ini",
            "[common]\nbind_port = 7000\nbind_prot = 1\n",
            &[],
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("bind_prot")));
        assert!(
            e.to_string()
                .contains("frps.ini:3: `bind_prot`: unknown key"),
            "{e}"
        );
        let e = file_error(load("frps.ini", "[common]\n\nproxy_port = seventy\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("proxy_port")));
        assert!(e.message.contains("invalid value `seventy`"), "{e}");
        let e = file_error(load(
            "frps.ini",
            "[common]\nconnect_timeout = 5 parsecs\n",
            &[],
        ));
        assert!(e.message.contains("unknown unit"), "{e}");
        let e = file_error(load(
            "frps.ini",
            "[common]\nbind_port = 1\ncontrol_port = 2\n",
            &[],
        ));
        assert!(e.message.contains("already set at line 2"), "{e}");
        let e = file_error(load(
            "frps.ini",
            "[plugin.x]\naddr = h:1\nops = Login, Logout\n",
            &[],
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("ops")));
        assert!(e.message.contains("unknown operation `Logout`"), "{e}");
        let e = file_error(load("frps.ini", "[plugin.x]\nops = Login\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("addr")));
        let e = file_error(load(
            "frps.ini",
            "[plugin.x]\naddr = h:1\nops = Ping\ntimeout = 3\n",
            &[],
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(4), Some("timeout")));
        let e = file_error(load("frps.ini", "[common]\nheartbeat_interval = 0\n", &[]));
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("heartbeat_interval"))
        );
        assert!(e.message.contains("from 100ms to 1h"), "{e}");
        let e = file_error(load("frps.ini", "[common]\ntoken_ttl = 36501d\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("token_ttl")));
        assert!(e.message.contains("at most 100 years"), "{e}");
        let e = file_error(load("frps.ini", "[common]\n[server]\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("[server]")));
    }

    #[test]
    fn frp_toml_form() {
        let cli = load(
            "frps.toml",
            "bindPort = 7000\nproxy_port = 7001\npluginTimeout = \"1s\"\n\n[[httpPlugins]]\nname = \"user-manager\"\naddr = \"127.0.0.1:9000\"\npath = \"/handler\"\nops = [\"Login\"]\n\n[[httpPlugins]]\nname = \"port-manager\"\naddr = \"127.0.0.1:9001\"\npath = \"/handler\"\nops = [\"NewProxy\", \"Ping\"]\n",
            &[],
        )
        .unwrap();
        let c = cli.config;
        assert_eq!((c.control_port, c.proxy_port), (7000, 7001));
        assert_eq!(c.plugin_timeout, Duration::from_secs(1));
        let names: Vec<&str> = c.plugins.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["user-manager", "port-manager"]);
        assert_eq!(c.plugins[1].ops, [Op::NewProxy, Op::Ping]);
    }

    #[test]
    fn toml_errors_name_file_line_and_key() {
        let e = file_error(load(
            "frps.toml",
            "bindPort = 7000\n\nvhostHTTPPort = 80\n",
            &[],
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("vhostHTTPPort")));
        let e = file_error(load("frps.toml", "bindPort = 70000\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("bindPort")));
        let e = file_error(load("frps.toml", "[webServer]\nport = 7500\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("webServer")));
        let e = file_error(load(
            "frps.toml",
            "[[httpPlugins]]\nname = \"a\"\naddr = \"h:1\"\nops = [\"Login\"]\ntimeout = 3\n",
            &[],
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(5), Some("timeout")));
        let e = file_error(load(
            "frps.toml",
            "[[httpPlugins]]\nname = \"a\"\naddr = \"https://h:1\"\nops = [\"Login\"]\n",
            &[],
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("addr")));
        let e = file_error(load("frps.toml", "bindPort = \n", &[]));
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn frp_plugin_settings_frps_does_not_act_on_are_taken() {
        // frp's CloseUserConn and tls_verify: an frp configuration starts.
        let ini = load(
            "frps.ini",
            "[plugin.a]\naddr = h:1\nops = NewUserConn, CloseUserConn\ntls_verify = false\n",
            &[],
        )
        .unwrap();
        let toml = load(
            "frps.toml",
            "[[httpPlugins]]\nname = \"a\"\naddr = \"h:1\"\nops = [\"NewUserConn\", \"CloseUserConn\"]\ntlsVerify = false\n",
            &[],
        )
        .unwrap();
        for cli in [ini, toml] {
            let p = &cli.config.plugins[0];
            assert_eq!(p.ops, [Op::NewUserConn]);
            assert_eq!(
                p.unused,
                [
                    "the operation CloseUserConn (frps never makes that call)",
                    "tls_verify (frps calls plugins over plain HTTP)"
                ]
            );
        }
    }

    #[test]
    fn a_toml_array_sets_a_list_flag() {
        let cli = load(
            "frps.toml",
            "forwardPaths = [\"/v1/*\", \"/api/tags\"]\n",
            &[],
        )
        .unwrap();
        let paths = cli.config.forward_paths;
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(crate::paths::allowed(&paths, "/v1/chat/completions"));
        assert!(crate::paths::allowed(&paths, "/api/tags"));
        assert!(!crate::paths::allowed(&paths, "/api/delete"));
        // Each item is checked as the flag checks it.
        let e = file_error(load(
            "frps.toml",
            "forward_paths = [\"/v1/*\", \"\"]\n",
            &[],
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("forward_paths")));
        for (text, why) in [
            ("bindPort = [7000]\n", "takes a single value, not an array"),
            ("forwardPaths = []\n", "an empty array"),
            ("forwardPaths = [\"/v1/*,/api/*\"]\n", "item 1 holds `,`"),
            (
                "forwardPaths = [{ path = \"/v1/*\" }]\n",
                "expected an array of single values",
            ),
        ] {
            let e = file_error(load("frps.toml", text, &[]));
            assert_eq!(e.line, Some(1), "{text}: {e}");
            assert!(e.message.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn a_file_cannot_turn_the_server_into_the_monitor() {
        for (name, text, key) in [
            ("frps.ini", "[common]\nmonitor = true\n", "monitor"),
            ("frps.ini", "[common]\nwatch = true\n", "watch"),
            ("frps.toml", "bindPort = 7000\nmonitor = true\n", "monitor"),
        ] {
            let e = file_error(load(name, text, &[]));
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
            assert!(
                e.message.contains("a command-line option, not a setting")
                    && e.message.contains(&format!("--{key}")),
                "{text}: {e}"
            );
        }
        // The command line still may.
        let cli = load("frps.ini", "[common]\nbind_port = 7000\n", &["--monitor"]).unwrap();
        assert!(cli.config.monitor);
    }

    #[test]
    fn admin_commands_take_the_store_flags_after_them_too() {
        let path = write("frps.ini", "[common]\nredis_prefix = fromfile:\n");
        let path = path.display().to_string();
        for args in [
            vec!["frps", "user", "list", "--database-url", "sqlite://a.db"],
            vec!["frps", "--database-url", "sqlite://a.db", "user", "list"],
        ] {
            let cli = load_from(
                args.iter()
                    .copied()
                    .chain(["--redis-url", "none", "-c", &path]),
            )
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(
                matches!(cli.command, Some(crate::admin::Admin::User { .. })),
                "{args:?}"
            );
            assert_eq!(cli.config.database_url, "sqlite://a.db", "{args:?}");
            assert_eq!(cli.config.redis(), None, "{args:?}");
            assert_eq!(
                cli.config.redis_prefix, "fromfile:",
                "the file it names: {args:?}"
            );
        }
        std::fs::remove_dir_all(std::path::Path::new(&path).parent().unwrap()).unwrap();
    }
}
