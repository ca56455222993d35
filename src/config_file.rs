//! `--config FILE`: one flat TOML table whose keys are the long flags
//! (`connect-timeout = "5s"`, `max-streams = 100`). This module reads and
//! checks the file; the command line (main.rs) parses each value with the
//! flag's own parser and lets flags given on the command line win.
//! Every error is one line naming the file, the line and the key.

use serde::Deserialize;
use std::ops::Range;
use toml::Spanned;

/// One key of the file: its value as the flag would spell it, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key, spelled like the long flag (`exit-policy`).
    pub key: &'static str,
    /// The value as a command-line string (integers in decimal).
    pub value: String,
    /// The value as the file spells it, for error messages.
    pub shown: String,
    /// 1-based line of the value.
    pub line: usize,
}

/// What a key's value must be in TOML.
#[derive(Clone, Copy)]
enum Kind {
    /// A string: an address, a duration, a policy, a filter.
    Text,
    /// A non-negative integer.
    Count,
}

/// Every key the file may hold, in the order they are applied.
const KEYS: &[(&str, Kind)] = &[
    ("socks", Kind::Text),
    ("listen", Kind::Text),
    ("exit", Kind::Text),
    ("exit-policy", Kind::Text),
    ("circuits", Kind::Count),
    ("grace", Kind::Text),
    ("connect-timeout", Kind::Text),
    ("handshake-timeout", Kind::Text),
    ("socks-timeout", Kind::Text),
    ("idle-timeout", Kind::Text),
    ("keepalive", Kind::Text),
    ("max-streams", Kind::Count),
    ("max-streams-per-circuit", Kind::Count),
    ("max-circuits-per-link", Kind::Count),
    ("log", Kind::Text),
    ("status", Kind::Text),
];

type Value = Option<Spanned<toml::Value>>;

/// The file as TOML sees it; unknown keys are refused by serde.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    socks: Value,
    listen: Value,
    exit: Value,
    exit_policy: Value,
    circuits: Value,
    grace: Value,
    connect_timeout: Value,
    handshake_timeout: Value,
    socks_timeout: Value,
    idle_timeout: Value,
    keepalive: Value,
    max_streams: Value,
    max_streams_per_circuit: Value,
    max_circuits_per_link: Value,
    log: Value,
    status: Value,
}

impl Raw {
    /// The values in `KEYS` order.
    fn into_values(self) -> [Value; 16] {
        [
            self.socks,
            self.listen,
            self.exit,
            self.exit_policy,
            self.circuits,
            self.grace,
            self.connect_timeout,
            self.handshake_timeout,
            self.socks_timeout,
            self.idle_timeout,
            self.keepalive,
            self.max_streams,
            self.max_streams_per_circuit,
            self.max_circuits_per_link,
            self.log,
            self.status,
        ]
    }
}

/// A value as the error message shows it.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => format!("(a {})", other.type_str()),
    }
}

/// 1-based line of byte offset `at` in `text`.
pub fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn where_(text: &str, span: Option<Range<usize>>) -> String {
    match span {
        Some(s) => format!("line {}", line_of(text, s.start)),
        None => "somewhere".to_owned(),
    }
}

/// Checks `text` (the contents of the file `name`) and returns its keys,
/// or one line saying what is wrong, where.
pub fn parse(name: &str, text: &str) -> Result<Vec<Entry>, String> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        // toml's messages run over several lines; the first is enough,
        // with "field" said as a user of this file would say it.
        let msg = e.message().lines().next().unwrap_or("").trim();
        let msg = msg.replace("unknown field", "unknown key");
        let msg = match msg.find(", expected") {
            Some(i) => format!(
                "{} (see scripts/halfpipe.toml.example for the keys)",
                &msg[..i]
            ),
            None => msg,
        };
        format!("{name} {}: {msg}", where_(text, e.span()))
    })?;
    let mut out = Vec::new();
    for ((key, kind), value) in KEYS.iter().zip(raw.into_values()) {
        let Some(value) = value else { continue };
        let line = line_of(text, value.span().start);
        let shown = show(value.get_ref());
        let value = match (kind, value.into_inner()) {
            (Kind::Text, toml::Value::String(s)) => s,
            (Kind::Count, toml::Value::Integer(n)) if n >= 0 => n.to_string(),
            (Kind::Text, v) => {
                return Err(format!(
                    "{name} line {line}: {key} = {}: expected a string in quotes",
                    show(&v)
                ))
            }
            (Kind::Count, v) => {
                return Err(format!(
                    "{name} line {line}: {key} = {}: expected a whole number",
                    show(&v)
                ))
            }
        };
        out.push(Entry {
            key,
            value,
            shown,
            line,
        });
    }
    Ok(out)
}

/// Reads and checks the file at `path`.
pub fn load(path: &std::path::Path) -> Result<Vec<Entry>, String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {name}: {e}"))?;
    parse(&name, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_values_and_lines() {
        let text = "# a comment\nlisten = \"127.0.0.1:9101\"\n\nmax-streams = 100\nidle-timeout = \"5m\"\n";
        let e = parse("f.toml", text).unwrap();
        assert_eq!(e[0].value, "127.0.0.1:9101");
        assert_eq!(e[1].value, "5m");
        assert_eq!(e[2].value, "100");
        let keys: Vec<_> = e.iter().map(|e| (e.key, e.line)).collect();
        assert_eq!(
            keys,
            [("listen", 2), ("idle-timeout", 5), ("max-streams", 4)]
        );
    }

    #[test]
    fn the_example_file_parses_with_every_key_uncommented() {
        let text = include_str!("../scripts/halfpipe.toml.example");
        assert!(parse("example", text).is_ok());
        let all: String = text
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|r| r.starts_with(|c: char| c.is_ascii_lowercase()))
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse("example", &all).unwrap().len(), KEYS.len());
    }

    #[test]
    fn every_key_is_known() {
        let text: String = KEYS
            .iter()
            .map(|(k, kind)| match kind {
                Kind::Text => format!("{k} = \"x\"\n"),
                Kind::Count => format!("{k} = 1\n"),
            })
            .collect();
        assert_eq!(parse("f", &text).unwrap().len(), KEYS.len());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("f.toml", "grace = \"1s\"\n\nlisten-on = \"x\"\n").unwrap_err();
        assert!(err.starts_with("f.toml line 3: "), "{err}");
        assert!(err.contains("unknown key `listen-on`"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn wrong_types_name_key_and_line() {
        let err = parse("f", "circuits = \"two\"\n").unwrap_err();
        assert_eq!(err, "f line 1: circuits = \"two\": expected a whole number");
        let err = parse("f", "\ngrace = 10\n").unwrap_err();
        assert_eq!(err, "f line 2: grace = 10: expected a string in quotes");
        let err = parse("f", "max-streams = -1\n").unwrap_err();
        assert!(err.starts_with("f line 1: max-streams = -1"), "{err}");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let err = parse("f", "grace = \"1s\"\nlisten = \n").unwrap_err();
        assert!(err.starts_with("f line 2: "), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
