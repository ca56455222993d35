//! `--config FILE`: one flat TOML table whose keys are the long flags
//! (`connect-timeout = "5s"`, `max-streams = 100`, `status-allow-remote =
//! true`). This module reads the file into entries; which keys exist and
//! what their values mean is the command line's business (`main.rs` checks
//! every entry against the flags of the command, with the flag's own
//! parser), so the flags and the keys are one list. Every error is one
//! line naming the file, the line and the key.

use std::collections::BTreeMap;
use std::ops::Range;
use toml::Spanned;

/// One key of the file: its value as the flag would spell it, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key, spelled like the long flag (`exit-policy`).
    pub key: String,
    /// The value as a command-line string: text as it is, whole numbers in
    /// decimal, `true` or `false`.
    pub value: String,
    /// What kind of TOML value it was.
    pub kind: Kind,
    /// The value as the file spells it, for error messages.
    pub shown: String,
    /// 1-based line of the value.
    pub line: usize,
}

/// The TOML kinds a value may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string: an address, a duration, a policy, a filter.
    Text,
    /// A non-negative whole number.
    Count,
    /// `true` or `false`, for a flag that takes no value.
    Switch,
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

/// Reads `text` (the contents of the file `name`) into its entries, in
/// the order of their lines, or one line saying what is wrong, where.
pub fn parse(name: &str, text: &str) -> Result<Vec<Entry>, String> {
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(text).map_err(|e| {
            // toml's messages run over several lines; the first is enough.
            let msg = e.message().lines().next().unwrap_or("").trim();
            format!("{name} {}: {msg}", where_(text, e.span()))
        })?;
    let mut out = Vec::new();
    for (key, value) in table {
        let line = line_of(text, key.span().start);
        let key = key.into_inner();
        let shown = show(value.get_ref());
        let (value, kind) = match value.into_inner() {
            toml::Value::String(s) => (s, Kind::Text),
            toml::Value::Integer(n) if n >= 0 => (n.to_string(), Kind::Count),
            toml::Value::Boolean(b) => (b.to_string(), Kind::Switch),
            _ => {
                return Err(format!(
                    "{name} line {line}: {key} = {shown}: expected a string in quotes, \
                     a whole number, or true/false"
                ))
            }
        };
        out.push(Entry {
            key,
            value,
            kind,
            shown,
            line,
        });
    }
    out.sort_by_key(|e| e.line);
    Ok(out)
}

/// Reads and parses the file at `path`.
pub fn load(path: &std::path::Path) -> Result<Vec<Entry>, String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {name}: {e}"))?;
    parse(&name, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_values_kinds_and_lines() {
        let text = "# a comment\nlisten = \"127.0.0.1:9101\"\n\nmax-streams = 100\n\
                    idle-timeout = \"5m\"\nstatus-allow-remote = true\n";
        let e = parse("f.toml", text).unwrap();
        let got: Vec<_> = e
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str(), e.kind, e.line))
            .collect();
        assert_eq!(
            got,
            [
                ("listen", "127.0.0.1:9101", Kind::Text, 2),
                ("max-streams", "100", Kind::Count, 4),
                ("idle-timeout", "5m", Kind::Text, 5),
                ("status-allow-remote", "true", Kind::Switch, 6),
            ]
        );
    }

    #[test]
    fn values_of_no_flag_kind_name_key_and_line() {
        let err = parse("f", "\nmax-streams = -1\n").unwrap_err();
        assert!(
            err.starts_with("f line 2: max-streams = -1: expected"),
            "{err}"
        );
        let err = parse("f", "grace = 1.5\n").unwrap_err();
        assert!(err.starts_with("f line 1: grace = 1.5: expected"), "{err}");
        let err = parse("f", "log = [\"info\"]\n").unwrap_err();
        assert!(
            err.starts_with("f line 1: log = (a array): expected"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let err = parse("f", "grace = \"1s\"\nlisten = \n").unwrap_err();
        assert!(err.starts_with("f line 2: "), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        let err = parse("f", "grace = \"1s\"\ngrace = \"2s\"\n").unwrap_err();
        assert!(err.starts_with("f line 2: "), "a key given twice: {err}");
    }
}
