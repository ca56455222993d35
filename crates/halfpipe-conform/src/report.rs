//! What a run found: a line per case as it ends, the closing count, and
//! the JUnit and JSON files that CI systems and the results matrix read.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// What the requirement says should have happened, and what did.
    Fail {
        expected: String,
        got: String,
    },
    /// Why the case did not run.
    Skip(String),
}

/// A case's result, with the files kept when it failed.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: &'static str,
    pub ids: Vec<String>,
    pub outcome: Outcome,
    pub took: Duration,
    /// The implementation's log and the case's cell trace, kept on failure.
    pub kept: Vec<PathBuf>,
}

impl CaseResult {
    /// The line printed when the case ends.
    pub fn line(&self) -> String {
        let ids = self.ids.join(",");
        match &self.outcome {
            Outcome::Pass => format!("PASS {} [{ids}]", self.name),
            Outcome::Skip(why) => format!("SKIP {} [{ids}]: {why}", self.name),
            Outcome::Fail { expected, got } => {
                let mut s = format!(
                    "FAIL {} [{ids}]\n     expected: {expected}\n     got:      {got}",
                    self.name
                );
                for p in &self.kept {
                    let _ = write!(s, "\n     kept:     {}", p.display());
                }
                s
            }
        }
    }
}

/// Counts of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Tally {
    pub fn of(results: &[CaseResult]) -> Tally {
        let mut t = Tally::default();
        for r in results {
            match r.outcome {
                Outcome::Pass => t.passed += 1,
                Outcome::Fail { .. } => t.failed += 1,
                Outcome::Skip(_) => t.skipped += 1,
            }
        }
        t
    }

    pub fn line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 has no escape for most control characters.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: one testsuite, a testcase per case, its IDs as the class.
pub fn junit(results: &[CaseResult], subject: &str) -> String {
    let t = Tally::of(results);
    let total: f64 = results.iter().map(|r| r.took.as_secs_f64()).sum();
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<testsuite name=\"halfpipe-conform\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{total:.3}\">",
        results.len(),
        t.failed,
        t.skipped
    );
    let _ = writeln!(
        s,
        "  <properties><property name=\"implementation\" value=\"{}\"/></properties>",
        xml_escape(subject)
    );
    for r in results {
        let _ = write!(
            s,
            "  <testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\"",
            xml_escape(r.name),
            xml_escape(&r.ids.join(",")),
            r.took.as_secs_f64()
        );
        match &r.outcome {
            Outcome::Pass => s.push_str("/>\n"),
            Outcome::Skip(why) => {
                let _ = writeln!(s, "><skipped message=\"{}\"/></testcase>", xml_escape(why));
            }
            Outcome::Fail { expected, got } => {
                let kept: Vec<String> = r.kept.iter().map(|p| p.display().to_string()).collect();
                let _ = writeln!(
                    s,
                    "><failure message=\"expected: {}\">got: {}\nkept: {}</failure></testcase>",
                    xml_escape(expected),
                    xml_escape(got),
                    xml_escape(&kept.join(" "))
                );
            }
        }
    }
    s.push_str("</testsuite>\n");
    s
}

/// The JSON report: the subject, the counts, and every case.
pub fn json(results: &[CaseResult], subject: &str) -> serde_json::Value {
    let t = Tally::of(results);
    let cases: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            let (status, detail) = match &r.outcome {
                Outcome::Pass => ("pass", serde_json::Value::Null),
                Outcome::Skip(why) => ("skip", serde_json::json!({ "reason": why })),
                Outcome::Fail { expected, got } => (
                    "fail",
                    serde_json::json!({ "expected": expected, "got": got }),
                ),
            };
            serde_json::json!({
                "name": r.name,
                "requirements": r.ids,
                "status": status,
                "detail": detail,
                "seconds": r.took.as_secs_f64(),
                "kept": r.kept.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "implementation": subject,
        "passed": t.passed,
        "failed": t.failed,
        "skipped": t.skipped,
        "cases": cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &'static str, outcome: Outcome) -> CaseResult {
        CaseResult {
            name,
            ids: vec!["R7.4".into()],
            outcome,
            took: Duration::from_millis(1500),
            kept: vec![PathBuf::from("/tmp/x/trace.txt")],
        }
    }

    #[test]
    fn reports_count_and_escape() {
        let results = vec![
            result("a", Outcome::Pass),
            result(
                "b",
                Outcome::Fail {
                    expected: "FIN <after> \"data\"".into(),
                    got: "a reset & nothing\u{1}".into(),
                },
            ),
            result("c", Outcome::Skip("no RESOLVE".into())),
        ];
        let t = Tally::of(&results);
        assert_eq!(t.line(), "1 passed, 1 failed, 1 skipped");
        let x = junit(&results, "cmd <x>");
        assert!(x.contains(r#"tests="3" failures="1" skipped="1""#), "{x}");
        assert!(
            x.contains("expected: FIN &lt;after&gt; &quot;data&quot;"),
            "{x}"
        );
        assert!(x.contains("got: a reset &amp; nothing?"), "{x}");
        assert!(x.contains(r#"<skipped message="no RESOLVE"/>"#), "{x}");
        assert!(x.contains("value=\"cmd &lt;x&gt;\""), "{x}");
        let j = json(&results, "cmd");
        assert_eq!(j["failed"], 1);
        assert_eq!(j["cases"][1]["status"], "fail");
        assert_eq!(j["cases"][1]["detail"]["got"], "a reset & nothing\u{1}");
        assert_eq!(j["cases"][2]["detail"]["reason"], "no RESOLVE");
        assert!(results[1]
            .line()
            .starts_with("FAIL b [R7.4]\n     expected: FIN"));
    }
}
