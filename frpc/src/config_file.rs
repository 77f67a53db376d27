//! `frpc --config frpc.ini`: frp's INI form, feeding the same flags (see
//! [`common::config_file`]).
//!
//! - `[common]`: `server_addr`, `server_port` (frps's control port), `user`,
//!   `meta_KEY = VALUE` (as `--meta KEY=VALUE`), and any other frpc flag in
//!   snake_case (`proxy_port`, `email`, `token_file`, ...).
//! - One proxy section, `[NAME]`: the name becomes the client id unless one
//!   is given (`--client-id`, `FRPC_CLIENT_ID` or `client_id` in `[common]`);
//!   `local_ip` and `local_port` are the local service; `meta_KEY = VALUE`
//!   are proxy metas (as `--proxy-meta KEY=VALUE`). `type` and `remote_port`
//!   are accepted and do not apply: frpx exposes one HTTP service per frpc
//!   through frps's shared public port.
//!
//! Flags and environment variables override the file; unknown keys and bad
//! values are errors naming the file, line and key.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches};
use common::config_file::{self, FileArgs, FileError, LoadError, Section, parse_ini};

use crate::config::Config;

/// frp's names for frpc settings in `[common]`.
const ALIASES: &[(&str, &str)] = &[("server_port", "control_port")];

/// The command line of this process, with the file it names.
pub fn load() -> Result<Config, LoadError> {
    load_from(std::env::args_os())
}

/// Parses `args` (program name first), reading the configuration file the
/// command line or `FRPC_CONFIG` names.
pub fn load_from<I, T>(args: I) -> Result<Config, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let (matches, _) = config_file::load(Config::command(), args, "config_file", read)?;
    Ok(Config::from_arg_matches(&matches)?)
}

fn read(file: &mut FileArgs<'_>, text: &str) -> Result<(), FileError> {
    let path = file.path().to_owned();
    let mut proxy: Option<Section> = None;
    let mut client_id_set = file.given("client_id");
    for section in parse_ini(&path, text)? {
        if section.name == "common" {
            for e in &section.entries {
                if let Some(meta) = e.key.strip_prefix("meta_") {
                    file.set("metas", &e.key, &format!("{meta}={}", e.value), e.line)?;
                    continue;
                }
                let id = ALIASES
                    .iter()
                    .find(|(alias, _)| *alias == e.key)
                    .map_or(e.key.as_str(), |(_, id)| id);
                client_id_set |= id == "client_id";
                file.set(id, &e.key, &e.value, e.line)?;
            }
            continue;
        }
        if let Some(first) = &proxy {
            return Err(FileError::at(
                &path,
                section.line,
                &format!("[{}]", section.name),
                format!(
                    "frpx exposes one service per frpc, and [{}] (line {}) is already one",
                    first.name, first.line
                ),
            ));
        }
        for e in &section.entries {
            match e.key.as_str() {
                "local_ip" => file.set("local_addr", &e.key, &e.value, e.line)?,
                "local_port" => file.set("local_port", &e.key, &e.value, e.line)?,
                // Not applicable: every frpc serves HTTP through frps's public port.
                "type" | "remote_port" => {}
                key => match key.strip_prefix("meta_") {
                    Some(meta) => {
                        file.set("proxy_metas", key, &format!("{meta}={}", e.value), e.line)?
                    }
                    None => {
                        return Err(FileError::at(
                            &path,
                            e.line,
                            key,
                            format!(
                                "unknown key in proxy section [{}] (expected local_ip, local_port, meta_*, type, remote_port)",
                                section.name
                            ),
                        ));
                    }
                },
            }
        }
        proxy = Some(section);
    }
    if let Some(p) = proxy.filter(|_| !client_id_set) {
        file.set("client_id", &format!("[{}]", p.name), &p.name, p.line)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::meta_map;

    fn load(text: &str, flags: &[&str]) -> Result<Config, LoadError> {
        let dir = std::env::temp_dir().join(format!("frpc-cf-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("frpc.ini");
        std::fs::write(&path, text).unwrap();
        let mut args = vec![
            "frpc".to_owned(),
            "--config".into(),
            path.display().to_string(),
        ];
        args.extend(flags.iter().map(|s| s.to_string()));
        let res = load_from(args);
        std::fs::remove_dir_all(dir).unwrap();
        res
    }

    fn file_error(res: Result<Config, LoadError>) -> FileError {
        match res {
            Err(LoadError::File(e)) => e,
            Err(other) => panic!("expected a file error, got {other}"),
            Ok(_) => panic!("expected a file error, got a configuration"),
        }
    }

    const SEED: &str = "# frpc.ini\n[common]\nserver_addr = 127.0.0.1\nserver_port = 7000\nuser = fake\nmeta_token = fake\nmeta_version = 1.0.0\n\n[ssh]\ntype = tcp\nlocal_port = 22\nremote_port = 6000\nmeta_id = 123\n";

    #[test]
    fn the_seed_example_reads_as_frp_means_it() {
        let c = load(SEED, &[]).unwrap();
        assert_eq!(c.server_addr, "127.0.0.1");
        assert_eq!(c.control_port, 7000);
        assert_eq!(c.user, "fake");
        assert_eq!(
            meta_map(&c.metas),
            [("token", "fake"), ("version", "1.0.0")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into()
        );
        assert_eq!(c.client_id.as_deref(), Some("ssh"));
        assert_eq!(c.local_port, 22);
        assert_eq!(
            meta_map(&c.proxy_metas),
            [("id".to_owned(), "123".to_owned())].into()
        );
    }

    #[test]
    fn a_flag_conflicting_with_the_files_setting_wins() {
        let file = "[common]\nserver_addr = frps.example\ntls_ca = /etc/frpc/ca.pem\n";
        let print = "ab".repeat(32);
        let c = load(file, &["--tls-fingerprint", &print]).unwrap();
        assert_eq!(c.tls_ca, None);
        assert_eq!(c.tls_fingerprint, Some([0xab; 32]));
        let c = load(file, &[]).unwrap();
        assert_eq!(c.tls_ca.unwrap(), std::path::Path::new("/etc/frpc/ca.pem"));
    }

    #[test]
    fn flags_override_and_metas_merge() {
        let c = load(
            SEED,
            &[
                "--client-id",
                "gpu-a",
                "--meta",
                "version=2",
                "--user",
                "real",
            ],
        )
        .unwrap();
        assert_eq!(c.client_id.as_deref(), Some("gpu-a"));
        assert_eq!(c.user, "real");
        let metas = meta_map(&c.metas);
        assert_eq!(metas["version"], "2", "the command line wins per key");
        assert_eq!(metas["token"], "fake");
        let c = load(
            "[common]\nclient_id = box-1\nlocal_port = 8000\n[ssh]\nlocal_ip = 10.0.0.5\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.client_id.as_deref(), Some("box-1"));
        assert_eq!((c.local_addr.as_str(), c.local_port), ("10.0.0.5", 8000));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = file_error(load("[common]\nserver_port = x\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("server_port")));
        let e = file_error(load("[common]\ntoken = secret\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("token")));
        assert_eq!(e.message, "unknown key");
        let e = file_error(load(
            "[ssh]\nlocal_port = 22\ncustom_domains = a.example\n",
            &[],
        ));
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(3), Some("custom_domains"))
        );
        let e = file_error(load(
            "[ssh]\nlocal_port = 22\n\n[web]\nlocal_port = 80\n",
            &[],
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(4), Some("[web]")));
        let e = file_error(load("[ssh]\nlocal_port = 99999\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("local_port")));
        let e = file_error(load("[common]\nmeta_ = x\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("meta_")));
        // The file's values pass the flags' checks.
        let e = file_error(load("[common]\nserver_addr = frps.example:7000\n", &[]));
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("server_addr")));
        assert!(e.message.contains("--control-port"), "{}", e.message);
        let e = file_error(load("[common]\nmetrics_interval = 100ms\n", &[]));
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("metrics_interval"))
        );
        assert!(e.message.contains("below 1s"), "{}", e.message);
    }
}
