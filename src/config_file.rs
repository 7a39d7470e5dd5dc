//! `thinblk serve --config FILE`: a TOML file that says what the flags say. Every key is a
//! long flag of `serve` without its dashes (`dir = "/var/lib/thinblk"`, `socket-group =
//! "kvm"`); an `export` is a string in `--export`'s syntax or a table of its keys. The file is
//! turned into flags that go before the command line's, so the command line overrides it
//! (for repeatable flags such as `--export` both count). Keys are checked against the
//! `serve` command itself, so a flag added there is a key here with no change to this file.

use clap::ArgAction;
use toml::{Table, Value};

/// What `serve --help` says of configuration files, with an example (checked by a test).
pub const HELP: &str = "\
A configuration file (--config FILE, TOML) takes every flag above as a key without its dashes;
an export is a string in --export's syntax or a table of its keys. Flags on the command line
override the file (--export adds to the file's exports). Example:

    dir = \"/var/lib/thinblk\"
    data-size = \"1T\"
    socket-group = \"libvirt-qemu\"   # libvirt's QEMU may connect
    socket-mode = \"0660\"
    export = [
        \"name=vm1,size=32G,socket=/run/thinblk/vm1.sock\",
        { name = \"vm2\", size = \"16G\", socket = \"/run/thinblk/vm2.sock\", queues = 4 },
    ]

SIGHUP re-reads the file: exports whose id is new are started, those no longer listed are
stopped, those whose keys changed are restarted; exports made over QMP are left alone. Other
keys take effect at the next start.";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("unknown key '{key}' (known: {known})")]
    UnknownKey { key: String, known: String },
    #[error("key '{key}': {why}")]
    BadValue { key: String, why: String },
}

/// How a flag takes values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `--flag VALUE`, once (a later one overrides).
    Value,
    /// `--flag VALUE`, repeatable.
    Many,
    /// `--flag` alone.
    Switch,
}

/// The long flags of `cmd` a file may set (not `--config` itself, `--help` or `--version`).
fn flags(cmd: &clap::Command) -> Vec<(String, Kind)> {
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let kind = match a.get_action() {
                ArgAction::Set => Kind::Value,
                ArgAction::Append => Kind::Many,
                ArgAction::SetTrue => Kind::Switch,
                _ => return None,
            };
            (long != "config").then(|| (long.to_string(), kind))
        })
        .collect()
}

/// Reads `path` and returns the flags it stands for.
pub fn read_args(path: &std::path::Path, cmd: &clap::Command) -> Result<Vec<String>, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: name.clone(),
        source,
    })?;
    let table = parse(&name, &text)?;
    to_args(&table, cmd)
}

/// The file as a table.
pub fn parse(name: &str, text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|source| ConfigError::Parse {
        path: name.into(),
        source: Box::new(source),
    })
}

/// The flags `table` stands for (keys sorted; a repeatable flag's values in their order).
pub fn to_args(table: &Table, cmd: &clap::Command) -> Result<Vec<String>, ConfigError> {
    let known = flags(cmd);
    let mut args = Vec::new();
    for (key, value) in table {
        let Some((_, kind)) = known.iter().find(|(k, _)| k == key) else {
            let mut names: Vec<&str> = known.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            return Err(ConfigError::UnknownKey {
                key: key.clone(),
                known: names.join(", "),
            });
        };
        let bad = |why: &str| ConfigError::BadValue {
            key: key.clone(),
            why: why.into(),
        };
        match (kind, value) {
            (Kind::Switch, Value::Boolean(true)) => args.push(format!("--{key}")),
            (Kind::Switch, Value::Boolean(false)) => {}
            (Kind::Switch, _) => return Err(bad("expected true or false")),
            (Kind::Value, v) => {
                args.push(format!("--{key}"));
                args.push(scalar(v).ok_or_else(|| bad("expected a string or a number"))?);
            }
            (Kind::Many, Value::Array(items)) => {
                for item in items {
                    args.push(format!("--{key}"));
                    args.push(item_text(item).map_err(|why| bad(&why))?);
                }
            }
            (Kind::Many, v) => {
                args.push(format!("--{key}"));
                args.push(item_text(v).map_err(|why| bad(&why))?);
            }
        }
    }
    Ok(args)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// One value of a repeatable flag: a string as it is, or a table as `key=value,...` with
/// commas in values doubled (QEMU's escape, which `--export` understands).
fn item_text(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Table(t) => {
            let mut parts = Vec::new();
            for (k, v) in t {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Integer(i) => i.to_string(),
                    Value::Boolean(b) => if *b { "on" } else { "off" }.to_string(),
                    _ => return Err(format!("'{k}' must be a string, number or boolean")),
                };
                parts.push(format!("{k}={}", text.replace(',', ",,")));
            }
            Ok(parts.join(","))
        }
        _ => Err("expected a string or a table".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    #[command(args_override_self = true)]
    struct Probe {
        #[arg(long)]
        dir: Option<String>,
        #[arg(long)]
        export: Vec<String>,
        #[arg(long)]
        error_if_no_space: bool,
        #[arg(long)]
        no_space_timeout: Option<u64>,
        #[arg(long)]
        config: Option<String>,
    }

    fn args_of(text: &str) -> Result<Vec<String>, ConfigError> {
        use clap::CommandFactory;
        to_args(&parse("t.toml", text)?, &Probe::command())
    }

    #[test]
    fn keys_become_flags_and_exports_strings_or_tables() {
        let a = args_of(
            r#"
            dir = "/var/lib/thinblk"
            no-space-timeout = 30
            error-if-no-space = true
            export = ["name=a,size=1G", { name = "b", socket = "/run/b,1.sock", readonly = true }]
            "#,
        )
        .unwrap();
        assert_eq!(
            a,
            [
                "--dir",
                "/var/lib/thinblk",
                "--error-if-no-space",
                "--export",
                "name=a,size=1G",
                "--export",
                "name=b,readonly=on,socket=/run/b,,1.sock",
                "--no-space-timeout",
                "30",
            ]
        );
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        use clap::Parser;
        let mut argv = vec!["probe".to_string()];
        argv.extend(args_of("dir = \"/from/file\"\nexport = \"name=a\"").unwrap());
        argv.extend(["--dir", "/from/flag", "--export", "name=b"].map(String::from));
        let p = Probe::try_parse_from(argv).unwrap();
        assert_eq!(p.dir.as_deref(), Some("/from/flag"));
        assert_eq!(p.export, ["name=a", "name=b"]);
    }

    #[test]
    fn the_example_in_the_help_is_a_valid_file() {
        #[derive(clap::Parser, Debug)]
        struct Serve {
            #[arg(long)]
            dir: String,
            #[arg(long)]
            data_size: String,
            #[arg(long)]
            socket_group: String,
            #[arg(long)]
            socket_mode: String,
            #[arg(long)]
            export: Vec<crate::export_spec::ExportSpec>,
        }
        use clap::{CommandFactory, Parser};
        let example: String = HELP
            .lines()
            .skip_while(|l| !l.starts_with("    "))
            .take_while(|l| !l.is_empty())
            .map(|l| format!("{}\n", l.trim_start()))
            .collect();
        let table = parse("example", &example).unwrap();
        let mut argv = vec!["serve".to_string()];
        argv.extend(to_args(&table, &Serve::command()).unwrap());
        let s = Serve::try_parse_from(argv).unwrap();
        assert_eq!(s.export.len(), 2);
        assert_eq!(s.export[1].settings.num_queues, 4);
        assert_eq!(s.socket_group, "libvirt-qemu");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let e = args_of("colour = \"red\"").unwrap_err().to_string();
        assert!(e.contains("'colour'") && e.contains("dir"), "{e}");
        let e = args_of("config = \"/etc/x\"").unwrap_err().to_string();
        assert!(e.contains("'config'"), "{e}");
        let e = args_of("error-if-no-space = \"yes\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("true or false"), "{e}");
        let e = args_of("dir = [1]").unwrap_err().to_string();
        assert!(e.contains("'dir'"), "{e}");
        assert!(args_of("dir = ").is_err());
    }
}
