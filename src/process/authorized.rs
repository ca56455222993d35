//! The clients an exit serves (`--authorized-clients FILE`, R13.7): one
//! fingerprint per line; `#` starts a comment, to the end of the line;
//! blank lines are allowed. A malformed line is an error that names it:
//! at start-up the exit does not start, on SIGHUP the list in force stays.

use halfpipe_proto::identity::Fingerprint;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizedClients {
    set: HashSet<Fingerprint>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorizedError {
    #[error("cannot read the authorized clients file {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{path} line {line}: {problem}")]
    Line {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

impl AuthorizedClients {
    pub fn load(path: &Path) -> Result<AuthorizedClients, AuthorizedError> {
        let text = std::fs::read_to_string(path).map_err(|err| AuthorizedError::Read {
            path: path.to_owned(),
            err,
        })?;
        Self::parse(&text).map_err(|(line, problem)| AuthorizedError::Line {
            path: path.to_owned(),
            line,
            problem,
        })
    }

    /// Parses the file's text; an error gives the line (from 1) and why.
    pub fn parse(text: &str) -> Result<AuthorizedClients, (usize, String)> {
        let mut set = HashSet::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fp = line
                .parse::<Fingerprint>()
                .map_err(|e| (i + 1, format!("{line:?}: {e}")))?;
            set.insert(fp);
        }
        Ok(AuthorizedClients { set })
    }

    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.set.contains(fp)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Only `fp` (an exit serving its own client, `halfpipe run`).
    pub fn only(fp: Fingerprint) -> AuthorizedClients {
        AuthorizedClients {
            set: HashSet::from([fp]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const B: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn fingerprints_comments_and_blank_lines() {
        let text = format!("# our clients\n\n{A}   # alice\n  {B}\n{A}\n");
        let list = AuthorizedClients::parse(&text).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list.contains(&A.parse().unwrap()));
        assert!(list.contains(&B.parse().unwrap()));
        assert!(AuthorizedClients::parse("# nobody\n").unwrap().is_empty());
    }

    #[test]
    fn a_bad_line_is_named() {
        let text = format!("{A}\n\nnot-a-fingerprint\n");
        let (line, why) = AuthorizedClients::parse(&text).unwrap_err();
        assert_eq!(line, 3);
        assert!(why.contains("64 hexadecimal digits"), "{why}");
        // Two fingerprints on one line are one bad fingerprint.
        let (line, _) = AuthorizedClients::parse(&format!("{A} {B}")).unwrap_err();
        assert_eq!(line, 1);
    }
}
