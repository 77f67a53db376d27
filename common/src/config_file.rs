//! Configuration files that feed the same clap parser as the flags.
//!
//! - [`parse_ini`] reads frp's INI form (`frps.ini`, `frpc.ini`): sections,
//!   `key = value` lines, `;`/`#` comments. It keeps every line number, which
//!   is why it is written here: the INI crates (rust-ini, configparser) drop
//!   them, and every error must name the file, the line and the key.
//! - [`FileArgs`] turns the settings a file holds into command-line
//!   arguments, checking each value with the flag's own parser, so a file
//!   accepts exactly what the flags accept.
//! - [`load`] runs the whole thing: parse the command line, read the file it
//!   names, parse again with the file's settings placed before the command
//!   line's. Precedence: command line, then environment, then the file, then
//!   the defaults. Repeatable flags (`--meta`) are merged instead.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

/// A configuration file problem, naming the file, line and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, when the problem has one.
    pub line: Option<usize>,
    /// The key (or section) at fault, when there is one.
    pub key: Option<String>,
    /// What is wrong, in English.
    pub message: String,
}

impl FileError {
    /// An error at `line` about `key`.
    pub fn at(path: &Path, line: usize, key: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            line: Some(line),
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }

    /// An error about the whole file.
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            line: None,
            key: None,
            message: message.into(),
        }
    }

    fn render(&self) -> String {
        let mut out = self.path.display().to_string();
        if let Some(line) = self.line {
            out.push_str(&format!(":{line}"));
        }
        if let Some(key) = &self.key {
            out.push_str(&format!(": `{key}`"));
        }
        out.push_str(&format!(": {}", self.message));
        out
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The command line is wrong (or asks for `--help`/`--version`).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    /// The configuration file is wrong.
    #[error(transparent)]
    File(#[from] FileError),
}

impl LoadError {
    /// Prints the error (or the help text) and exits, as clap does.
    pub fn exit(self) -> ! {
        match self {
            LoadError::Cli(e) => e.exit(),
            LoadError::File(e) => {
                eprintln!("error: {e}");
                std::process::exit(2)
            }
        }
    }
}

/// One `key = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key, trimmed.
    pub key: String,
    /// The value, trimmed, quotes and inline comment removed.
    pub value: String,
    /// 1-based line number.
    pub line: usize,
}

/// One `[name]` section and its entries, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The name between the brackets, trimmed.
    pub name: String,
    /// 1-based line of the header.
    pub line: usize,
    /// The section's entries.
    pub entries: Vec<Entry>,
}

/// Parses INI text: `[section]` headers, `key = value` lines, blank lines
/// and `;`/`#` comment lines. A value may be quoted (`"..."` or `'...'`,
/// then followed by a comment or nothing). An unquoted value with ` ;` or
/// ` #` in it is an error: frp keeps such text as part of the value (it
/// reads no inline comments), other INI readers cut it there, and taking
/// either reading silently could shorten a token or password the operator
/// wrote. Keys outside a section, repeated sections and repeated keys are
/// errors.
pub fn parse_ini(path: &Path, text: &str) -> Result<Vec<Section>, FileError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut sections: Vec<Section> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                return Err(FileError::at(
                    path,
                    line,
                    trimmed,
                    "a section header must end with `]`",
                ));
            };
            let name = name.trim();
            if name.is_empty() {
                return Err(FileError::at(path, line, trimmed, "empty section name"));
            }
            if let Some(first) = sections.iter().find(|s| s.name == name) {
                return Err(FileError::at(
                    path,
                    line,
                    name,
                    format!("section repeated (first at line {})", first.line),
                ));
            }
            sections.push(Section {
                name: name.to_owned(),
                line,
                entries: Vec::new(),
            });
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(FileError::at(
                path,
                line,
                trimmed,
                "expected `key = value`, a `[section]` or a comment",
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(FileError::at(path, line, trimmed, "empty key"));
        }
        let Some(section) = sections.last_mut() else {
            return Err(FileError::at(
                path,
                line,
                key,
                "setting before any [section]",
            ));
        };
        if let Some(first) = section.entries.iter().find(|e| e.key == key) {
            return Err(FileError::at(
                path,
                line,
                key,
                format!(
                    "key repeated in [{}] (first at line {})",
                    section.name, first.line
                ),
            ));
        }
        let value = ini_value(value.trim()).map_err(|m| FileError::at(path, line, key, m))?;
        section.entries.push(Entry {
            key: key.to_owned(),
            value,
            line,
        });
    }
    Ok(sections)
}

/// Unquotes a value; refuses an unquoted one that reads as carrying an
/// inline comment.
fn ini_value(v: &str) -> Result<String, String> {
    for quote in ['"', '\''] {
        if let Some(rest) = v.strip_prefix(quote) {
            let Some(end) = rest.find(quote) else {
                return Err(format!("unterminated {quote}quoted{quote} value"));
            };
            let after = rest[end + 1..].trim_start();
            if !(after.is_empty() || after.starts_with(';') || after.starts_with('#')) {
                // Not repeated: it may be part of a secret.
                return Err(format!(
                    "unexpected text after the quoted value ({} characters after the closing quote)",
                    after.chars().count()
                ));
            }
            return Ok(rest[..end].to_owned());
        }
    }
    let comment = v.char_indices().find(|&(i, c)| {
        (c == ';' || c == '#') && v[..i].ends_with(|p: char| p.is_ascii_whitespace())
    });
    if let Some((i, c)) = comment {
        // The value is not repeated: it may be a password or a token, and
        // this message goes to the terminal or the journal.
        return Err(format!(
            "the value may end in a comment at its character {} (`{c}` after a blank), which frp would keep as part of the value: quote the value (\"...\" ; comment), or put the comment on a line of its own",
            v[..i].chars().count() + 1,
        ));
    }
    Ok(v.trim_end().to_owned())
}

/// The line `offset` (a byte index into `text`) is on, 1-based.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Collects the command-line arguments a configuration file stands for.
pub struct FileArgs<'a> {
    cmd: &'a Command,
    given: &'a ArgMatches,
    path: &'a Path,
    config_id: &'a str,
    seen: HashMap<String, usize>,
    /// Each file setting's flag id and the argument it stands for.
    args: Vec<(String, OsString)>,
    /// `(a, b)`: flag `a` requires flag `b` (`--tls-cert` needs `--tls-key`).
    requires: Vec<(String, String)>,
    /// Conflicts clap is not told of (see [`FileArgs::conflicts`]).
    conflicts: Vec<(String, String)>,
    /// Flags only the command line may give (see [`FileArgs::command_only`]).
    command_only: Vec<String>,
}

impl<'a> FileArgs<'a> {
    /// Settings from `path` for `cmd`, whose command line alone parsed to
    /// `given`; flag `config_id` (the one naming the file) cannot be set.
    pub fn new(
        cmd: &'a Command,
        given: &'a ArgMatches,
        path: &'a Path,
        config_id: &'a str,
    ) -> Self {
        Self {
            cmd,
            given,
            path,
            config_id,
            seen: HashMap::new(),
            args: Vec::new(),
            requires: Vec::new(),
            conflicts: Vec::new(),
            command_only: Vec::new(),
        }
    }

    /// Declares flag `id` one a file may not set: it makes the program do
    /// something else than run (`--monitor` prints the fleet and exits), so
    /// a file naming it would turn every start into that.
    pub fn command_only(&mut self, id: &str) {
        self.command_only.push(id.to_owned());
    }

    /// Declares that flag `a` requires flag `b` (clap does not say which
    /// flags another requires): when the command line or the environment
    /// overrules the file's `b` (see [`FileArgs::into_args`]), the file's
    /// `a` goes too.
    pub fn requires(&mut self, a: &str, b: &str) {
        self.requires.push((a.to_owned(), b.to_owned()));
    }

    /// Declares that flags `a` and `b` cannot be used together, where the
    /// program checks that itself: clap counts a switch the environment
    /// turns off (`FRPX_TLS_SELF_SIGNED=false`) as present for its own
    /// `conflicts_with`, so such a switch cannot declare one there.
    pub fn conflicts(&mut self, a: &str, b: &str) {
        self.conflicts.push((a.to_owned(), b.to_owned()));
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        self.path
    }

    /// The flag whose id is `id` (a field name such as `control_port`, the
    /// flag `--control-port`), if the command has one a file may set.
    pub fn flag(&self, id: &str) -> Option<&'a Arg> {
        if matches!(id, "help" | "version") || id == self.config_id {
            return None;
        }
        self.cmd
            .get_arguments()
            .find(|a| a.get_id() == id && a.get_long().is_some())
    }

    /// Whether the command line or the environment already set flag `id`.
    /// A variable set to nothing (or blanks) sets nothing: docker-compose
    /// writes `${VAR}` of an unset variable so, as does a placeholder
    /// `Environment=` line, and frpx reads an empty value as unset, so it
    /// must not silently drop the file's (an admin token, a Redis URL).
    pub fn given(&self, id: &str) -> bool {
        match self.given.value_source(id) {
            Some(ValueSource::CommandLine) => true,
            Some(ValueSource::EnvVariable) => !self.env_is_blank(id),
            _ => false,
        }
    }

    /// Whether flag `id`'s environment variable holds nothing but blanks.
    fn env_is_blank(&self, id: &str) -> bool {
        self.cmd
            .get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(Arg::get_env)
            .and_then(std::env::var_os)
            .is_some_and(|v| v.to_string_lossy().trim().is_empty())
    }

    /// Sets flag `id` to `value`, written as `key` at `line` of the file.
    /// The value is checked with the flag's own parser. A flag the command
    /// line or environment set already keeps that value, except repeatable
    /// flags (`--meta k=v`, one value each), whose values are merged (the
    /// file's first). A list flag (`--forward-paths a,b`) is one setting:
    /// given on the command line or in the environment, it replaces the
    /// file's list rather than adding to it (an allow-list must not widen).
    pub fn set(&mut self, id: &str, key: &str, value: &str, line: usize) -> Result<(), FileError> {
        let Some(arg) = self.flag(id) else {
            return Err(FileError::at(self.path, line, key, "unknown key"));
        };
        if self.command_only.iter().any(|c| c == id) {
            return Err(FileError::at(
                self.path,
                line,
                key,
                format!(
                    "a command-line option, not a setting: give --{} on the command line",
                    arg.get_long().unwrap_or(id)
                ),
            ));
        }
        let repeatable = is_repeatable(arg);
        if !repeatable && let Some(first) = self.seen.insert(id.to_owned(), line) {
            return Err(FileError::at(
                self.path,
                line,
                key,
                format!("already set at line {first}"),
            ));
        }
        let long = arg
            .get_long()
            .expect("flags the file may set have a long name");
        if !arg.get_action().takes_values() {
            let on = switch(value).map_err(|e| self.invalid(line, key, value, &e))?;
            if on && !self.given(id) {
                self.args.push((id.to_owned(), format!("--{long}").into()));
            }
            return Ok(());
        }
        // A list flag (`a,b`) takes the file's value as the command line
        // would: each item is checked on its own.
        let items: Vec<&str> = match arg.get_value_delimiter() {
            Some(d) => value.split(d).collect(),
            None => vec![value],
        };
        for item in items {
            check(arg, item).map_err(|e| self.invalid(line, key, value, &e))?;
        }
        if repeatable || !self.given(id) {
            self.args
                .push((id.to_owned(), format!("--{long}={value}").into()));
        }
        Ok(())
    }

    /// Sets flag `id` from a list of values (a TOML array): each value of a
    /// repeatable flag, or the values of a list flag (`a,b`) joined by its
    /// delimiter. A flag that takes one value refuses a list.
    pub fn set_list(
        &mut self,
        id: &str,
        key: &str,
        items: &[String],
        line: usize,
    ) -> Result<(), FileError> {
        let Some(arg) = self.flag(id) else {
            return Err(FileError::at(self.path, line, key, "unknown key"));
        };
        if is_repeatable(arg) {
            for item in items {
                self.set(id, key, item, line)?;
            }
            return Ok(());
        }
        let Some(delimiter) = arg.get_value_delimiter() else {
            return Err(FileError::at(
                self.path,
                line,
                key,
                "takes a single value, not an array",
            ));
        };
        if items.is_empty() {
            return Err(FileError::at(
                self.path,
                line,
                key,
                "an empty array: give at least one value",
            ));
        }
        if let Some(n) = items.iter().position(|i| i.contains(delimiter)) {
            return Err(FileError::at(
                self.path,
                line,
                key,
                format!(
                    "item {} holds `{delimiter}`, which separates the items of this list",
                    n + 1
                ),
            ));
        }
        self.set(id, key, &items.join(&delimiter.to_string()), line)
    }

    fn invalid(&self, line: usize, key: &str, value: &str, e: &clap::Error) -> FileError {
        let why = std::error::Error::source(e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                first.trim_start_matches("error: ").to_owned()
            });
        FileError::at(
            self.path,
            line,
            key,
            format!("invalid value `{value}`: {why}"),
        )
    }

    /// The arguments to place before the command line's. A file setting
    /// that conflicts with a flag the command line or the environment gives
    /// (the file's `tls_cert` against `--tls-self-signed`) is left out, as is
    /// any file setting that requires one left out ([`FileArgs::requires`],
    /// the file's `tls_key`): the command line wins
    /// there too, instead of clap refusing the two together. Values of
    /// repeatable flags that came from the environment are added after the
    /// file's, since clap reads the environment only for absent flags.
    pub fn into_args(self) -> Vec<OsString> {
        let mut overruled: Vec<&str> = self
            .args
            .iter()
            .map(|(id, _)| id.as_str())
            .filter(|id| self.overruled(id))
            .collect();
        // Until nothing more goes: a chain of requirements is followed.
        while let Some((a, _)) = self
            .requires
            .iter()
            .find(|(a, b)| !overruled.contains(&a.as_str()) && overruled.contains(&b.as_str()))
        {
            overruled.push(a);
        }
        let mut args: Vec<OsString> = self
            .args
            .iter()
            .filter(|(id, _)| !overruled.contains(&id.as_str()))
            .map(|(_, arg)| arg.clone())
            .collect();
        for arg in self.cmd.get_arguments() {
            let id = arg.get_id().as_str();
            let from_env = self.given.value_source(id) == Some(ValueSource::EnvVariable);
            if !(from_env && is_repeatable(arg)) {
                continue;
            }
            let (Some(long), Ok(Some(raw))) = (arg.get_long(), self.given.try_get_raw(id)) else {
                continue;
            };
            for value in raw {
                let mut flag = OsString::from(format!("--{long}="));
                flag.push(value);
                args.push(flag);
            }
        }
        args
    }

    /// Whether `arg`, if a switch, is on (`FRPX_TLS_SELF_SIGNED=false` in
    /// the environment chooses nothing); any other flag counts as given.
    fn switched_on(&self, arg: &Arg) -> bool {
        !matches!(arg.get_action(), ArgAction::SetTrue)
            || self.given.get_one::<bool>(arg.get_id().as_str()).copied() == Some(true)
    }

    /// Whether the command line or the environment gives a flag that flag
    /// `id` conflicts with (either side may declare the conflict).
    fn overruled(&self, id: &str) -> bool {
        let Some(arg) = self.flag(id) else {
            return false;
        };
        let declared = self.cmd.get_arg_conflicts_with(arg);
        self.cmd.get_arguments().any(|other| {
            let other_id = other.get_id().as_str();
            other_id != id
                && self.given(other_id)
                && self.switched_on(other)
                && (declared.iter().any(|c| c.get_id() == other.get_id())
                    || self
                        .cmd
                        .get_arg_conflicts_with(other)
                        .iter()
                        .any(|c| c.get_id() == arg.get_id())
                    || self
                        .conflicts
                        .iter()
                        .any(|(a, b)| (a == id && b == other_id) || (a == other_id && b == id)))
        })
    }
}

/// Whether flag `arg` is given once per value and merged with the file's
/// values; a list flag (with a delimiter) is one setting, not repeatable.
fn is_repeatable(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append) && arg.get_value_delimiter().is_none()
}

/// Runs `value` through the parser of flag `arg` alone (a copy without its
/// relations to other flags, which a one-flag command would not know).
fn check(arg: &Arg, value: &str) -> Result<(), clap::Error> {
    let alone = Arg::new("value")
        .value_name("VALUE")
        .allow_hyphen_values(true)
        .action(arg.get_action().clone())
        .value_parser(arg.get_value_parser().clone());
    Command::new("check")
        .no_binary_name(true)
        .arg(alone)
        .try_get_matches_from([value])
        .map(drop)
}

/// Reads `value` as a switch: `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`.
fn switch(value: &str) -> Result<bool, clap::Error> {
    let alone = Arg::new("value")
        .value_name("VALUE")
        .value_parser(BoolishValueParser::new());
    let m = Command::new("check")
        .no_binary_name(true)
        .arg(alone)
        .try_get_matches_from([value])?;
    Ok(m.get_one::<bool>("value").copied().unwrap_or(false))
}

/// Parses `args` with `cmd`; when flag `config_id` names a file, reads it
/// with `read` (which adds the file's settings through [`FileArgs`] and
/// returns anything else the file holds) and parses again with those
/// settings before the command line's.
pub fn load<T>(
    cmd: Command,
    args: Vec<OsString>,
    config_id: &str,
    read: impl FnOnce(&mut FileArgs<'_>, &str) -> Result<T, FileError>,
) -> Result<(ArgMatches, Option<T>), LoadError> {
    load_keeping(cmd, args, config_id, &[], read)
}

/// [`load`], where the flags `empty_means` name take a variable set to
/// nothing as an empty value (frps's `--redis-prefix`: no prefix), not as
/// unset.
pub fn load_keeping<T>(
    cmd: Command,
    args: Vec<OsString>,
    config_id: &str,
    empty_means: &[&str],
    read: impl FnOnce(&mut FileArgs<'_>, &str) -> Result<T, FileError>,
) -> Result<(ArgMatches, Option<T>), LoadError> {
    // A variable set to nothing (or blanks) sets nothing: dropped from its
    // flag before clap reads it, so a typed flag (a port, a path, a switch)
    // is not refused at start for it, and a text flag is not set to "".
    let mut cmd = cmd.mut_args(|a| {
        let blank = !empty_means.contains(&a.get_id().as_str())
            && a.get_env()
                .and_then(std::env::var_os)
                .is_some_and(|v| v.to_string_lossy().trim().is_empty());
        if blank { a.env(None::<&str>) } else { a }
    });
    cmd.build();
    let given = cmd.clone().try_get_matches_from(&args)?;
    let Some(path) = given.get_one::<PathBuf>(config_id).cloned() else {
        return Ok((given, None));
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| FileError::file(&path, format!("cannot read the configuration file: {e}")))?;
    let mut file = FileArgs::new(&cmd, &given, &path, config_id);
    let extra = read(&mut file, &text)?;
    let mut all: Vec<OsString> = args.iter().take(1).cloned().collect();
    all.extend(file.into_args());
    all.extend(args.into_iter().skip(1));
    let matches = cmd.try_get_matches_from(all)?;
    Ok((matches, Some(extra)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ini(text: &str) -> Result<Vec<Section>, FileError> {
        parse_ini(Path::new("t.ini"), text)
    }

    #[test]
    fn sections_keys_comments_and_quotes() {
        let s = ini("\u{feff}; top\n[common]\nbind_port = \"7000\" ; inline\n# c\naddr=127.0.0.1:9000\nq = \"a ; b\"  # c\nurl = p#w\nempty =\n\n[plugin.x]\n  ops = Login, NewProxy\n").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].name.as_str(), s[0].line), ("common", 2));
        let kv: Vec<_> = s[0]
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str(), e.line))
            .collect();
        assert_eq!(
            kv,
            [
                ("bind_port", "7000", 3),
                ("addr", "127.0.0.1:9000", 5),
                ("q", "a ; b", 6),
                ("url", "p#w", 7),
                ("empty", "", 8)
            ]
        );
        assert_eq!(s[1].name, "plugin.x");
        assert_eq!(s[1].entries[0].value, "Login, NewProxy");
        assert_eq!(s[1].entries[0].line, 11);
    }

    #[test]
    fn an_unquoted_value_that_may_end_in_a_comment_is_refused_not_cut() {
        // frp keeps `blue horse #42` whole; cutting it would shorten the
        // token silently, keeping it would differ from other INI readers.
        for line in [
            "token = blue horse #42",
            "password = my pass ;x",
            "bind_port = 7000 ; control",
        ] {
            let e = ini(&format!("[common]\n{line}\n")).unwrap_err().to_string();
            assert!(e.contains("quote the value"), "{line}: {e}");
            assert!(e.contains("t.ini:2"), "{line}: {e}");
            // The value is not repeated: it may be a secret.
            for word in ["horse", "my pass", "7000", "control"] {
                assert!(!e.contains(word), "{line}: {e}");
            }
        }
        // Quoted, or `#`/`;` inside a word: the value as written.
        let s = ini("[common]\ntoken = \"blue horse #42\"\npassword = my;pass#x\n").unwrap();
        assert_eq!(s[0].entries[0].value, "blue horse #42");
        assert_eq!(s[0].entries[1].value, "my;pass#x");
    }

    #[test]
    fn malformed_lines_name_the_line_and_key() {
        let e = ini("[common]\nbind_port 7000\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(
            e.to_string()
                .starts_with("t.ini:2: `bind_port 7000`: expected"),
            "{e}"
        );
        let e = ini("a = 1\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("a")));
        let e = ini("[x]\na = 1\na = 2\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.ini:3: `a`: key repeated in [x] (first at line 2)"
        );
        let e = ini("[x]\n[y]\n[x]\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(ini("[x\n").is_err());
        assert!(ini("[]\n").is_err());
        assert!(ini("[x]\na = \"open\n").is_err());
        let e = ini("[x]\na = \"q\" secret-tail\n").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn line_of_counts_newlines() {
        let t = "a\nbb\nccc";
        assert_eq!(line_of(t, 0), 1);
        assert_eq!(line_of(t, 2), 2);
        assert_eq!(line_of(t, 5), 3);
        assert_eq!(line_of(t, 100), 3);
    }

    /// A command with only its `--config` flag.
    fn with_config() -> Command {
        Command::new("t").arg(
            Arg::new("config")
                .long("config")
                .value_parser(clap::value_parser!(PathBuf)),
        )
    }

    fn cmd() -> Command {
        with_config()
            .arg(
                Arg::new("port")
                    .long("port")
                    .value_parser(clap::value_parser!(u16))
                    .default_value("1"),
            )
            .arg(
                Arg::new("name")
                    .long("name")
                    .env("FRPX_CONFIG_FILE_TEST_NAME"),
            )
            .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
            .arg(Arg::new("meta").long("meta").action(ArgAction::Append))
    }

    /// Loads `file` (INI) for `cmd` with the command line `argv`, after
    /// `declare` has told [`FileArgs`] what clap does not.
    fn run_with(
        cmd: Command,
        argv: &[&str],
        file: &str,
        declare: impl FnOnce(&mut FileArgs<'_>),
    ) -> Result<ArgMatches, LoadError> {
        let dir = std::env::temp_dir().join(format!("frpx-cf-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.ini");
        std::fs::write(&path, file).unwrap();
        let mut args: Vec<OsString> = vec!["t".into(), "--config".into(), path.clone().into()];
        args.extend(argv.iter().map(OsString::from));
        let out = load(cmd, args, "config", |f, text| {
            declare(f);
            for s in parse_ini(f.path(), text)? {
                for e in s.entries {
                    f.set(&e.key, &e.key, &e.value, e.line)?;
                }
            }
            Ok(())
        });
        std::fs::remove_dir_all(dir).unwrap();
        out.map(|(m, _)| m)
    }

    fn run(argv: &[&str], file: &str) -> Result<ArgMatches, LoadError> {
        run_with(cmd(), argv, file, |_| {})
    }

    #[test]
    fn the_file_sets_flags_and_the_command_line_wins() {
        let m = run(&[], "[s]\nport = 7000\nquiet = true\nmeta = a=1\n").unwrap();
        assert_eq!(m.get_one::<u16>("port"), Some(&7000));
        assert!(m.get_flag("quiet"));
        let m = run(
            &["--port", "9", "--meta", "b=2"],
            "[s]\nport = 7000\nmeta = a=1\nquiet = no\n",
        )
        .unwrap();
        assert_eq!(m.get_one::<u16>("port"), Some(&9));
        assert!(!m.get_flag("quiet"));
        let metas: Vec<&String> = m.get_many("meta").unwrap().collect();
        assert_eq!(metas, ["a=1", "b=2"], "repeatable flags merge, file first");
    }

    #[test]
    fn a_list_sets_each_value_of_a_repeatable_flag_and_no_single_one() {
        let list = |key: &'static str, items: &'static [&'static str]| {
            run_with(cmd(), &["--meta", "c=3"], "", move |f| {
                let items: Vec<String> = items.iter().map(|i| i.to_string()).collect();
                f.set_list(key, key, &items, 4)
                    .unwrap_or_else(|e| panic!("{e}"));
            })
        };
        let m = list("meta", &["a=1", "b=2"]).unwrap();
        let metas: Vec<&String> = m.get_many("meta").unwrap().collect();
        assert_eq!(metas, ["a=1", "b=2", "c=3"]);
        let e = run_with(cmd(), &[], "", |f| {
            let e = f.set_list("port", "port", &["1".into()], 4).unwrap_err();
            assert_eq!((e.line, e.key.as_deref()), (Some(4), Some("port")));
            assert!(e.message.contains("not an array"), "{e}");
            let e = f.set_list("nope", "nope", &[], 5).unwrap_err();
            assert!(e.message.contains("unknown key"), "{e}");
        });
        assert!(e.is_ok());
    }

    #[test]
    fn a_command_only_flag_is_refused_in_the_file() {
        let e = run_with(cmd(), &[], "[s]\nquiet = true\n", |f| {
            f.command_only("quiet")
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("`quiet`: a command-line option, not a setting: give --quiet"),
            "{e}"
        );
        let m = run_with(cmd(), &["--quiet"], "", |f| f.command_only("quiet")).unwrap();
        assert!(m.get_flag("quiet"));
    }

    /// `--self-signed` (a switch, also from `env`) conflicts with `--cert`
    /// (declared to clap, or, without an `env`, to [`FileArgs`] alone),
    /// which needs `--key` and back; `--chain` needs `--cert`.
    fn tls_cmd(env: Option<&'static str>) -> Command {
        let mut self_signed = Arg::new("self_signed")
            .long("self-signed")
            .action(ArgAction::SetTrue);
        self_signed = match env {
            Some(env) => self_signed.env(env),
            None => self_signed.conflicts_with("cert"),
        };
        let path = || clap::value_parser!(PathBuf);
        Command::new("t")
            .arg(Arg::new("config").long("config").value_parser(path()))
            .arg(
                Arg::new("cert")
                    .long("cert")
                    .requires("key")
                    .value_parser(path()),
            )
            .arg(
                Arg::new("key")
                    .long("key")
                    .requires("cert")
                    .value_parser(path()),
            )
            .arg(
                Arg::new("chain")
                    .long("chain")
                    .requires("cert")
                    .value_parser(path()),
            )
            .arg(self_signed)
    }

    fn run_tls(
        env: Option<&'static str>,
        argv: &[&str],
        file: &str,
    ) -> Result<ArgMatches, LoadError> {
        run_with(tls_cmd(env), argv, file, |f| {
            for (a, b) in [("cert", "key"), ("key", "cert"), ("chain", "cert")] {
                f.requires(a, b);
            }
            if env.is_some() {
                f.conflicts("self_signed", "cert");
            }
        })
    }

    #[test]
    fn a_file_setting_conflicting_with_the_command_line_gives_way_with_what_needs_it() {
        const NO_ENV: Option<&str> = None;
        let file = "[s]\ncert = c.pem\nkey = k.pem\nchain = ch.pem\n";
        let m = run_tls(NO_ENV, &["--self-signed"], file).unwrap();
        assert!(m.get_flag("self_signed"));
        for id in ["cert", "key", "chain"] {
            assert!(m.get_one::<PathBuf>(id).is_none(), "{id} kept");
        }
        let m = run_tls(NO_ENV, &[], file).unwrap();
        assert!(!m.get_flag("self_signed"));
        assert_eq!(m.get_one::<PathBuf>("chain").unwrap(), Path::new("ch.pem"));
        // The declaring side does not matter: the file's switch gives way
        // to the command line's certificate.
        let m = run_tls(
            NO_ENV,
            &["--cert", "c2", "--key", "k2"],
            "[s]\nself_signed = true\n",
        )
        .unwrap();
        assert!(!m.get_flag("self_signed"));
        assert_eq!(m.get_one::<PathBuf>("cert").unwrap(), Path::new("c2"));
        // A file that contradicts itself is refused as clap refuses it.
        let both = "[s]\ncert = c\nkey = k\nself_signed = on\n";
        assert!(matches!(run_tls(NO_ENV, &[], both), Err(LoadError::Cli(_))));
    }

    #[test]
    fn a_switch_turned_off_in_the_environment_overrules_nothing() {
        // Read by this test's command alone; the conflict is declared to
        // FileArgs, not clap.
        const NAME: &str = "FRPX_CONFIG_FILE_TEST_SELF_SIGNED";
        const ENV: Option<&str> = Some(NAME);
        // SAFETY: no other code of this process reads or writes this name.
        unsafe { std::env::set_var(NAME, "false") };
        let off = run_tls(ENV, &[], "[s]\ncert = c.pem\nkey = k.pem\n");
        unsafe { std::env::set_var(NAME, "true") };
        let on = run_tls(ENV, &[], "[s]\ncert = c.pem\nkey = k.pem\n");
        unsafe { std::env::remove_var(NAME) };
        let off = off.unwrap();
        assert_eq!(off.get_one::<PathBuf>("cert").unwrap(), Path::new("c.pem"));
        let on = on.unwrap();
        assert!(on.get_flag("self_signed"));
        assert!(on.get_one::<PathBuf>("cert").is_none());
    }

    #[test]
    fn a_variable_set_to_nothing_leaves_the_files_value() {
        const NAME: &str = "FRPX_CONFIG_FILE_TEST_BLANK";
        const PORT: &str = "FRPX_CONFIG_FILE_TEST_BLANK_PORT";
        let cmd = || {
            with_config()
                .arg(Arg::new("token").long("token").env(NAME))
                .arg(
                    Arg::new("port")
                        .long("port")
                        .env(PORT)
                        .value_parser(clap::value_parser!(u16)),
                )
        };
        let file = "[s]\ntoken = from-the-file\nport = 7000\n";
        let token = |m: &ArgMatches| m.get_one::<String>("token").cloned();
        let port = |m: &ArgMatches| m.get_one::<u16>("port").copied();
        let without_file =
            |cmd: Command| load(cmd, vec!["t".into()], "config", |_, _| Ok(())).map(|(m, _)| m);
        // SAFETY: no other code of this process reads or writes these names.
        unsafe { std::env::set_var(NAME, "") };
        unsafe { std::env::set_var(PORT, "") };
        let empty = run_with(cmd(), &[], file, |_| {});
        let empty_alone = without_file(cmd());
        unsafe { std::env::set_var(NAME, "  ") };
        unsafe { std::env::set_var(PORT, " ") };
        let blank = run_with(cmd(), &[], file, |_| {});
        unsafe { std::env::set_var(NAME, "from-the-environment") };
        unsafe { std::env::set_var(PORT, "8000") };
        let set = run_with(cmd(), &[], file, |_| {});
        unsafe { std::env::remove_var(NAME) };
        unsafe { std::env::remove_var(PORT) };
        let empty = empty.unwrap();
        assert_eq!(token(&empty).as_deref(), Some("from-the-file"));
        assert_eq!(port(&empty), Some(7000));
        let blank = blank.unwrap();
        assert_eq!(token(&blank).as_deref(), Some("from-the-file"));
        assert_eq!(port(&blank), Some(7000));
        let set = set.unwrap();
        assert_eq!(token(&set).as_deref(), Some("from-the-environment"));
        assert_eq!(port(&set), Some(8000));
        // Without a file: unset, not "" and not refused.
        let alone = empty_alone.unwrap();
        assert_eq!((token(&alone), port(&alone)), (None, None));
    }

    #[test]
    fn a_flag_for_which_empty_means_something_keeps_an_empty_variable() {
        const NAME: &str = "FRPX_CONFIG_FILE_TEST_EMPTY_PREFIX";
        let cmd = || {
            with_config().arg(
                Arg::new("prefix")
                    .long("prefix")
                    .env(NAME)
                    .default_value("p:"),
            )
        };
        let prefix = |keeping: &[&str]| {
            let (m, _) =
                load_keeping(cmd(), vec!["t".into()], "config", keeping, |_, _| Ok(())).unwrap();
            m.get_one::<String>("prefix").cloned()
        };
        // SAFETY: no other code of this process reads or writes this name.
        unsafe { std::env::set_var(NAME, "") };
        let (kept, dropped) = (prefix(&["prefix"]), prefix(&[]));
        unsafe { std::env::remove_var(NAME) };
        assert_eq!(kept.as_deref(), Some(""));
        assert_eq!(dropped.as_deref(), Some("p:"));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_file_line_and_key() {
        let LoadError::File(e) = run(&[], "[s]\n\nprot = 1\n").unwrap_err() else {
            panic!("expected a file error")
        };
        assert_eq!(e.line, Some(3));
        assert!(
            e.to_string().ends_with("t.ini:3: `prot`: unknown key"),
            "{e}"
        );
        let LoadError::File(e) = run(&[], "[s]\nport = 70000\n").unwrap_err() else {
            panic!("expected a file error")
        };
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("port")));
        assert!(e.message.contains("invalid value `70000`"), "{e}");
        let LoadError::File(e) = run(&[], "[s]\nquiet = maybe\n").unwrap_err() else {
            panic!("expected a file error")
        };
        assert_eq!(e.key.as_deref(), Some("quiet"));
        let LoadError::File(e) = run(&[], "[s]\nport = 1\n[t]\nport = 2\n").unwrap_err() else {
            panic!("expected a file error")
        };
        assert!(e.message.contains("already set at line 2"), "{e}");
        let LoadError::File(e) = run(&[], "[s]\nconfig = other.ini\n").unwrap_err() else {
            panic!("expected a file error")
        };
        assert_eq!(e.message, "unknown key");
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let args = vec![
            "t".into(),
            "--config".into(),
            "/nonexistent/frpx.ini".into(),
        ];
        let err = load(cmd(), args, "config", |_, _| Ok(())).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/frpx.ini: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn without_a_file_the_command_line_alone_counts() {
        let args = vec!["t".into(), "--port".into(), "5".into()];
        let (m, extra) = load(cmd(), args, "config", |_, _| Ok(())).unwrap();
        assert_eq!(m.get_one::<u16>("port"), Some(&5));
        assert!(extra.is_none());
    }
}
