//! Plumbing shared by both programs' `Config`: where settings come from and how problems are
//! reported. Each binary builds its own `Config` as defaults < file < environment < flags and then
//! validates it, reporting every bad setting at once (one line each) before exiting.
//!
//! Environment variables are read through [`Env`] so that tests hand in a map instead of touching
//! the process environment (linkerd's habit; `std::env::set_var` is never used).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// A source of environment variables.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// An environment given as pairs, for tests and tools that hand in their own.
pub fn env_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A setting that must never reach a log line or a `Debug` dump: passwords, keys, URLs that may
/// embed credentials.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// One setting as operators see it: the file key (also the name its problems are reported
/// under), the environment variable, the flag if there is one, the default and what it does.
/// `settings!` builds a program's table of these from the same lines that declare the setting,
/// and `--help` and docs/configuration.md are rendered from that table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingDoc {
    pub key: &'static str,
    pub env: &'static str,
    /// `--` and the key, `-` for `_`.
    pub flag: Option<&'static str>,
    pub default: DefaultDoc,
    pub help: &'static str,
}

/// What a setting is when no layer sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultDoc {
    /// This value, written as it would be in the environment (and parsed the same way).
    Value(&'static str),
    /// No value; the text says what happens instead (`none`, `required`, …).
    Unset(&'static str),
}

impl SettingDoc {
    /// The line `--help` shows for the setting's flag: the help without its Markdown links
    /// (their text stays), the variable and the default.
    pub fn flag_help(&self) -> String {
        let mut help = String::new();
        let mut rest = self.help;
        while let Some(open) = rest.find('[')
            && let Some(close) = rest[open..].find("](").map(|i| open + i)
            && let Some(end) = rest[close..].find(')').map(|i| close + i)
        {
            help.push_str(&rest[..open]);
            help.push_str(&rest[open + 1..close]);
            rest = &rest[end + 1..];
        }
        help.push_str(rest);
        match self.default {
            DefaultDoc::Value(v) => format!("{help} [env: {}] [default: {v}]", self.env),
            DefaultDoc::Unset(_) => format!("{help} [env: {}]", self.env),
        }
    }
}

/// The settings of one program as the Markdown table of docs/configuration.md.
pub fn doc_table(settings: &[SettingDoc]) -> String {
    let mut out = String::from(
        "| file key | environment | flag | default | meaning |\n| --- | --- | --- | --- | --- |\n",
    );
    for s in settings {
        let flag = s
            .flag
            .map_or_else(|| " ".to_owned(), |f| format!(" `{f}` "));
        let default = match s.default {
            DefaultDoc::Value(v) => format!("`{v}`"),
            DefaultDoc::Unset(text) => text.to_owned(),
        };
        out.push_str(&format!(
            "| `{}` | `{}` |{flag}| {default} | {} |\n",
            s.key, s.env, s.help
        ));
    }
    out
}

/// `doc` with the text between `<!-- settings: NAME ... -->` and the next `<!-- end settings -->`
/// replaced by `table`; `None` if the markers are missing.
pub fn splice_doc_table(doc: &str, name: &str, table: &str) -> Option<String> {
    let open = format!("<!-- settings: {name} ");
    let start = doc.find(&open)?;
    let body = start + doc[start..].find("-->\n")? + 4;
    let end = body + doc[body..].find("<!-- end settings -->")?;
    Some(format!("{}{table}{}", &doc[..body], &doc[end..]))
}

/// A default as `settings!` writes it: text parsed like an environment value, so the default
/// that is documented is the one in force. (The tests load every program's defaults.)
pub fn parse_default<T>(text: &str) -> T
where
    T: FromStr,
    T::Err: fmt::Display,
{
    text.parse()
        .unwrap_or_else(|e| panic!("the default {text:?} does not parse: {e}"))
}

/// Declares a program's settings, each once: its type, default, environment variable, flag and
/// help (the doc comment). Generates
///
/// - `ENV_*`, the environment variable names;
/// - `Layer`, one source of settings (the file, the environment, the flags), every field an
///   `Option`, deserialized from TOML with `deny_unknown_fields`; `Layer::from_env`, and
///   `overlay` (later layers win);
/// - `Settings`, the merged layers with every default applied (`Layer::resolve`): a setting
///   with a default is a `T`, one without an `Option<T>`;
/// - `SETTINGS`, the table docs/configuration.md and `--help` are rendered from;
/// - `Flags`, the clap arguments of the settings that have a flag.
///
/// ```text
/// settings! {
///     /// REST listener (the public API)
///     listen: String = "127.0.0.1:9001", env ENV_LISTEN = "TOLLGATE_LISTEN", flag "--listen";
///     /// PEM file of the CA(s) that sign Redis's certificate
///     redis_ca_file: PathBuf, unset "public web roots", env ENV_REDIS_CA_FILE = "TOLLGATE_REDIS_CA_FILE";
/// }
/// ```
///
/// The crate using it needs `serde` and `clap` among its dependencies.
#[macro_export]
macro_rules! settings {
    ($(
        $(#[doc = $help:literal])+
        $key:ident : $ty:ty $(= $default:literal)? $(, unset $unset:literal)?,
            env $env_const:ident = $env:literal $(, flag $flag:literal)?;
    )+) => {
        $(pub const $env_const: &str = $env;)+

        /// One source of settings; every field optional, later layers win.
        #[derive(Debug, Default, ::serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Layer {
            $($(#[doc = $help])+ pub $key: Option<$ty>,)+
        }

        /// The layers merged, with every default applied.
        #[derive(Debug)]
        pub struct Settings {
            $(pub $key: $crate::settings!(@type $ty $(, $default)?),)+
        }

        /// Every setting, in the order of the docs.
        pub const SETTINGS: &[$crate::config::SettingDoc] = &[$(
            $crate::config::SettingDoc {
                key: stringify!($key),
                env: $env,
                flag: $crate::settings!(@option $($flag)?),
                default: $crate::settings!(@default $(value $default)? $(unset $unset)?),
                help: $crate::config::__trim_doc(concat!($($help),+)),
            },
        )+];

        impl Layer {
            fn from_env(
                env: &dyn $crate::config::Env,
                problems: &mut $crate::config::Problems,
            ) -> Layer {
                Layer { $($key: problems.env(env, $env),)+ }
            }

            /// `other`'s settings win over `self`'s.
            fn overlay(self, other: Layer) -> Layer {
                Layer { $($key: other.$key.or(self.$key),)+ }
            }

            fn resolve(self) -> Settings {
                Settings { $($key: $crate::settings!(@resolve self.$key $(, $default)?),)+ }
            }

            /// Defaults < `file` (its name and text) < the environment < `flags`, with every
            /// problem found on the way noted in `problems`.
            fn merge(
                file: Option<(&str, &str)>,
                env: &dyn $crate::config::Env,
                flags: Layer,
                problems: &mut $crate::config::Problems,
            ) -> Settings {
                let file_layer = match file {
                    Some((origin, text)) => problems.file::<Layer>(origin, text),
                    None => Layer::default(),
                };
                let env_layer = Layer::from_env(env, problems);
                file_layer.overlay(env_layer).overlay(flags).resolve()
            }
        }

        /// The settings given as command-line flags (`#[command(flatten)]` them into the CLI).
        #[derive(Debug, Default)]
        pub struct Flags(pub Layer);

        impl ::clap::FromArgMatches for Flags {
            fn from_arg_matches(matches: &::clap::ArgMatches) -> Result<Self, ::clap::Error> {
                Ok(Flags(Layer {
                    $($key: $crate::settings!(@flag matches, $key, $ty $(, $flag)?),)+
                }))
            }

            fn update_from_arg_matches(
                &mut self,
                matches: &::clap::ArgMatches,
            ) -> Result<(), ::clap::Error> {
                *self = Self::from_arg_matches(matches)?;
                Ok(())
            }
        }

        impl ::clap::Args for Flags {
            fn augment_args(command: ::clap::Command) -> ::clap::Command {
                let mut command = command;
                for (setting, flag, parse) in [$($(
                    (
                        stringify!($key),
                        $flag,
                        ::clap::builder::ValueParser::new(|value: &str| {
                            value.parse::<$ty>().map_err(|e| e.to_string())
                        }),
                    ),
                )?)+] {
                    let help = SETTINGS
                        .iter()
                        .find(|s| s.key == setting)
                        .map(|s| s.flag_help())
                        .unwrap_or_default();
                    command = command.arg(
                        ::clap::Arg::new(setting)
                            .long(flag.trim_start_matches("--"))
                            .global(true)
                            .value_parser(parse)
                            .help(help),
                    );
                }
                command
            }

            fn augment_args_for_update(command: ::clap::Command) -> ::clap::Command {
                Self::augment_args(command)
            }
        }
    };
    (@type $ty:ty, $default:literal) => { $ty };
    (@type $ty:ty) => { Option<$ty> };
    (@option $flag:literal) => { Some($flag) };
    (@option) => { None };
    (@default value $default:literal) => { $crate::config::DefaultDoc::Value($default) };
    (@default unset $unset:literal) => { $crate::config::DefaultDoc::Unset($unset) };
    (@resolve $value:expr, $default:literal) => {
        $value.unwrap_or_else(|| $crate::config::parse_default($default))
    };
    (@resolve $value:expr) => { $value };
    (@flag $matches:ident, $key:ident, $ty:ty, $flag:literal) => {
        $matches.get_one::<$ty>(stringify!($key)).cloned()
    };
    (@flag $matches:ident, $key:ident, $ty:ty) => { None };
}

/// A doc comment's text without the space after `///`.
#[doc(hidden)]
pub const fn __trim_doc(text: &'static str) -> &'static str {
    text.trim_ascii()
}

/// A list of strings: an array in a file, comma-separated in the environment and on flags.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct List(pub Vec<String>);

impl FromStr for List {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(List(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        ))
    }
}

/// Every configuration problem found, one line each, naming the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

/// Collects problems while a `Config` is assembled, so that all are reported together.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn push(&mut self, setting: &str, message: impl fmt::Display) {
        self.0.push(format!("{setting}: {message}"));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads and parses one environment variable; a value that does not parse is a problem
    /// naming the variable, and counts as unset.
    pub fn env<T>(&mut self, env: &dyn Env, name: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let raw = env.var(name)?;
        match raw.parse() {
            Ok(value) => Some(value),
            Err(e) => {
                self.push(name, format_args!("cannot parse {raw:?}: {e}"));
                None
            }
        }
    }

    /// Parses a TOML config file into `T` (a struct of `Option`s with `deny_unknown_fields`),
    /// checking each top-level key on its own so that every unknown or mistyped key is reported,
    /// not just the first. Keys that fail are left unset.
    pub fn file<T: DeserializeOwned + Default>(&mut self, origin: &str, text: &str) -> T {
        let table: toml::Table = match text.parse() {
            Ok(table) => table,
            Err(e) => {
                let e: toml::de::Error = e;
                let at = e
                    .span()
                    .map(|span| format!(" at line {}", line_of(text, span.start)))
                    .unwrap_or_default();
                self.push(origin, format_args!("not valid TOML{at}: {}", e.message()));
                return T::default();
            }
        };
        let mut good = toml::Table::new();
        for (key, value) in table {
            let mut single = toml::Table::new();
            single.insert(key.clone(), value.clone());
            match T::deserialize(single) {
                Ok(_) => {
                    good.insert(key, value);
                }
                Err(e) => self.push(&format!("{origin}: {key}"), e.message().trim()),
            }
        }
        T::deserialize(good).unwrap_or_default()
    }

    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError(self.0))
        }
    }
}

/// Checks the Redis key prefix both programs share: 1-32 letters, digits, `_` or `-`.
/// A listen address, or a problem for `setting`.
pub fn addr(problems: &mut Problems, setting: &str, value: &str) -> Option<std::net::SocketAddr> {
    value
        .parse()
        .map_err(|e| problems.push(setting, format_args!("{value:?} is not an address: {e}")))
        .ok()
}

pub fn redis_prefix(problems: &mut Problems, prefix: String) -> String {
    if prefix.is_empty()
        || prefix.len() > 32
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        problems.push(
            "redis_prefix",
            format_args!("{prefix:?} must be 1-32 letters, digits, '_' or '-'"),
        );
    }
    prefix
}

/// Checks a tracing filter directive the way the log set-up will parse it.
pub fn log_filter(problems: &mut Problems, filter: String) -> String {
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&filter) {
        problems.push("log", format_args!("{filter:?} is not a filter: {e}"));
    }
    filter
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A duration written as an integer number of milliseconds (files) or with a unit
/// (`250ms`, `5s`, `2m`, `1h`) in the environment and on flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub u64);

impl Millis {
    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

impl FromStr for Millis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("expected a duration such as 250ms, 5s or 2m, got {s:?}"))?;
        let factor = match unit {
            "" | "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} (use ms, s, m, h or d)"
                ));
            }
        };
        n.checked_mul(factor)
            .map(Millis)
            .ok_or_else(|| format!("duration {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(Millis(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Log output format, shared by both programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            other => Err(format!("expected json or text, got {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Layer {
        listen: Option<String>,
        timeout: Option<Millis>,
        workers: Option<u32>,
    }

    #[test]
    fn every_bad_file_key_is_reported() {
        let mut problems = Problems::default();
        let layer: Layer = problems.file(
            "tollgate.toml",
            "listen = \"0.0.0.0:1\"\nworkers = \"many\"\nbogus = 1\ntimeout = \"5x\"\n",
        );
        assert_eq!(layer.listen.as_deref(), Some("0.0.0.0:1"));
        assert_eq!(layer.workers, None);
        assert_eq!(layer.timeout, None);
        let Err(ConfigError(lines)) = problems.finish(()) else {
            panic!("expected problems");
        };
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("tollgate.toml: workers:"))
        );
        assert!(lines.iter().any(|l| l.starts_with("tollgate.toml: bogus:")));
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("tollgate.toml: timeout:"))
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let mut problems = Problems::default();
        let _: Layer = problems.file("f.toml", "listen = \"a\"\nworkers = = 2\n");
        let Err(ConfigError(lines)) = problems.finish(()) else {
            panic!("expected problems");
        };
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("line 2"), "{lines:?}");
    }

    #[test]
    fn env_values_are_parsed_and_named() {
        let env: BTreeMap<String, String> = [
            ("A".to_owned(), "17".to_owned()),
            ("B".to_owned(), "x".to_owned()),
        ]
        .into();
        let mut problems = Problems::default();
        assert_eq!(problems.env::<u32>(&env, "A"), Some(17));
        assert_eq!(problems.env::<u32>(&env, "B"), None);
        assert_eq!(problems.env::<u32>(&env, "C"), None);
        let Err(ConfigError(lines)) = problems.finish(()) else {
            panic!("expected problems");
        };
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("B: "));
    }

    #[test]
    fn durations() {
        let check = |s: &str, want: Option<u64>| {
            assert_eq!(s.parse::<Millis>().ok().map(|m| m.0), want, "{s}");
        };
        check("250", Some(250));
        check("250ms", Some(250));
        check("5s", Some(5_000));
        check("2m", Some(120_000));
        check("1h", Some(3_600_000));
        check("5x", None);
        check("", None);
        check("-1s", None);
    }

    #[test]
    fn flag_help_names_the_variable_and_default_without_links() {
        let doc = SettingDoc {
            key: "database_url",
            env: "DATABASE_URL",
            flag: Some("--database-url"),
            default: DefaultDoc::Value("postgres://h/db"),
            help: "PostgreSQL, as libpq: [deployment.md](deployment.md#tls) (secret)",
        };
        assert_eq!(
            doc.flag_help(),
            "PostgreSQL, as libpq: deployment.md (secret) [env: DATABASE_URL] [default: postgres://h/db]"
        );
        assert!(doc_table(&[doc]).contains(
            "| `database_url` | `DATABASE_URL` | `--database-url` | `postgres://h/db` | PostgreSQL, as libpq: [deployment.md](deployment.md#tls) (secret) |"
        ));
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = Secret::new("postgres://u:hunter2@db/x");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
