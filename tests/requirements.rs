//! Every requirement of docs/protocol.md is cited by the code that applies
//! it and by a test that checks it, and every citation names a requirement
//! that exists (docs/protocol.md, "How requirements are marked").
//!
//! A requirement is defined where its ID stands in bold (`**R7.3**`). A
//! citation is the ID anywhere in a Rust file (`// R7.3`, `R7.3, R7.4`).
//! Code is what `src/` and `crates/*/src/` hold before their test module
//! (the first `#[cfg(test)]` or `#[cfg(all(test, ...))]` that stands on a
//! `mod`); tests are the rest of those files, `tests/` and
//! `crates/*/tests/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// `R<section>.<n>` IDs in `text`, with where each stands (byte offset).
fn ids(text: &str) -> Vec<(usize, String)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 3 < b.len() {
        let word_start = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if b[i] == b'R' && word_start && b[i + 1].is_ascii_digit() {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j + 1 < b.len() && b[j] == b'.' && b[j + 1].is_ascii_digit() {
                let mut k = j + 1;
                while k < b.len() && b[k].is_ascii_digit() {
                    k += 1;
                }
                let word_end = k == b.len() || !(b[k].is_ascii_alphanumeric() || b[k] == b'_');
                if word_end {
                    out.push((i, text[i..k].to_owned()));
                    i = k;
                    continue;
                }
            }
        }
        i += 1;
    }
    out
}

/// The requirements docs/protocol.md defines, in order.
fn defined(root: &Path) -> Vec<String> {
    let text = fs::read_to_string(root.join("docs/protocol.md")).expect("docs/protocol.md");
    ids(&text)
        .into_iter()
        .filter(|(at, id)| {
            let before = &text[..*at];
            let after = &text[at + id.len()..];
            before.ends_with("**") && after.starts_with("**")
        })
        .map(|(_, id)| id)
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// Where a source file's test module starts: the first `#[cfg(test)]` or
/// `#[cfg(all(test, ...))]` line whose next line declares a `mod` (a
/// `#[cfg(test)]` on a helper function is code's). The end if none.
fn test_module_start(text: &str) -> usize {
    let mut at = 0;
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") || t.starts_with("#[cfg(all(test") {
            let next = lines.peek().map(|l| l.trim_start()).unwrap_or("");
            if next.starts_with("mod ") || next.starts_with("pub mod ") {
                return at;
            }
        }
        at += line.len();
    }
    text.len()
}

/// Citations in code and in tests: ID -> files citing it.
type Cited = BTreeMap<String, BTreeSet<String>>;

fn citations(root: &Path) -> (Cited, Cited) {
    let (mut code, mut tests) = (Cited::new(), Cited::new());
    let mut sources = Vec::new();
    rust_files(&root.join("src"), &mut sources);
    let mut test_files = Vec::new();
    rust_files(&root.join("tests"), &mut test_files);
    for krate in fs::read_dir(root.join("crates"))
        .expect("crates/")
        .flatten()
    {
        rust_files(&krate.path().join("src"), &mut sources);
        rust_files(&krate.path().join("tests"), &mut test_files);
    }
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    for path in &sources {
        let text = fs::read_to_string(path).expect("readable");
        // The model check is a test module of its own.
        let split = if text.contains("#![cfg(") || path.ends_with("loom_check.rs") {
            0
        } else {
            test_module_start(&text)
        };
        for (at, id) in ids(&text) {
            let into = if at < split { &mut code } else { &mut tests };
            into.entry(id).or_default().insert(rel(path));
        }
    }
    for path in &test_files {
        if path.ends_with("tests/requirements.rs") {
            continue;
        }
        let text = fs::read_to_string(path).expect("readable");
        for (_, id) in ids(&text) {
            tests.entry(id).or_default().insert(rel(path));
        }
    }
    (code, tests)
}

#[test]
fn every_requirement_is_applied_and_tested_and_every_citation_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let defined = defined(root);
    assert!(
        defined.len() > 50,
        "docs/protocol.md defines {} IDs",
        defined.len()
    );
    let unique: BTreeSet<&String> = defined.iter().collect();
    assert_eq!(unique.len(), defined.len(), "an ID is defined twice");
    let (code, tests) = citations(root);
    let missing = |cited: &Cited| -> Vec<&String> {
        defined
            .iter()
            .filter(|id| !cited.contains_key(*id))
            .collect()
    };
    let unknown: Vec<String> = code
        .iter()
        .chain(tests.iter())
        .filter(|(id, _)| !unique.contains(id))
        .map(|(id, files)| {
            format!(
                "{id} (in {})",
                files.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    let (no_code, no_test) = (missing(&code), missing(&tests));
    assert!(
        no_code.is_empty() && no_test.is_empty() && unknown.is_empty(),
        "requirements no code cites: {no_code:?}\n\
         requirements no test cites: {no_test:?}\n\
         citations of IDs docs/protocol.md does not define: {unknown:?}"
    );
}

#[test]
fn the_test_module_starts_at_its_mod_not_at_a_test_helper() {
    let text =
        "fn a() {} // R1.1\n#[cfg(test)]\nfn helper() {}\n// R2.2\n#[cfg(test)]\nmod tests {\n}\n";
    let at = test_module_start(text);
    assert_eq!(&text[at..at + 12], "#[cfg(test)]");
    assert!(text[..at].contains("R2.2") && text[at..].contains("mod tests"));
    assert_eq!(test_module_start("fn a() {}\n"), "fn a() {}\n".len());
}

#[test]
fn the_id_scanner_finds_ids_and_only_ids() {
    let found: Vec<String> = ids("// R7.3, R10.12; not FR7.3 nor R7.3x nor R7. nor R.3 **R1.1**")
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(found, ["R7.3", "R10.12", "R1.1"]);
}
