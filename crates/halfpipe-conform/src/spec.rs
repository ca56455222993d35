//! The requirement table, read from docs/protocol.md itself: each case
//! quotes the sentences it checks from here, and `--coverage` compares the
//! IDs a case names with every ID the document has.

use std::collections::BTreeMap;

/// The normative document the kit is written from.
pub const PROTOCOL_MD: &str = include_str!("../../../docs/protocol.md");

/// A requirement ID such as `R7.3`, ordered by section, then number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id {
    pub section: u16,
    pub number: u16,
}

impl Id {
    pub fn parse(s: &str) -> Option<Id> {
        let (a, b) = s.strip_prefix('R')?.split_once('.')?;
        Some(Id {
            section: a.parse().ok()?,
            number: b.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "R{}.{}", self.section, self.number)
    }
}

/// Every requirement of the document, with its text: a paragraph that
/// begins `**Rn.m**`, or a table row whose first cell is `**Rn.m**`.
pub fn requirements() -> BTreeMap<Id, String> {
    let mut out = BTreeMap::new();
    let mut paragraph: Vec<&str> = Vec::new();
    let flush = |lines: &mut Vec<&str>, out: &mut BTreeMap<Id, String>| {
        let text = lines.join(" ");
        lines.clear();
        let Some(rest) = text.strip_prefix("**R") else {
            return;
        };
        let Some((id, sentence)) = rest.split_once("**") else {
            return;
        };
        if let Some(id) = Id::parse(&format!("R{id}")) {
            out.insert(id, collapse(sentence));
        }
    };
    for line in PROTOCOL_MD.lines() {
        let t = line.trim();
        if let Some(row) = t.strip_prefix("| **R") {
            flush(&mut paragraph, &mut out);
            let Some((id, rest)) = row.split_once("**") else {
                continue;
            };
            let cells: Vec<&str> = rest
                .split('|')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            if let Some(id) = Id::parse(&format!("R{id}")) {
                out.insert(id, collapse(&cells.join(" | ")));
            }
        } else if t.is_empty() {
            flush(&mut paragraph, &mut out);
        } else {
            paragraph.push(t);
        }
    }
    flush(&mut paragraph, &mut out);
    out
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_section_of_the_document_is_read() {
        let reqs = requirements();
        // Paragraphs and table rows alike, in every section with rules.
        for id in [
            "R1.1", "R1.11", "R5.5", "R7.2", "R8.2", "R10.2", "R11.7", "R14.16",
        ] {
            let id = Id::parse(id).unwrap();
            assert!(reqs.contains_key(&id), "{id} not found");
        }
        assert!(reqs[&Id::parse("R4.5").unwrap()].contains("FIN is 31"));
        let ids_in_text = PROTOCOL_MD
            .split("**R")
            .skip(1)
            .filter(|rest| {
                rest.split_once("**")
                    .is_some_and(|(id, _)| Id::parse(&format!("R{id}")).is_some())
            })
            .count();
        assert_eq!(
            reqs.len(),
            ids_in_text,
            "an ID written in bold was not read"
        );
    }
}
