//! The conformance kit against this build of halfpipe: the test that
//! `scripts/mutants.sh` gives cargo-mutants. cargo-mutants mutates
//! halfpipe-proto and rebuilds halfpipe; this test then runs a kit built
//! beforehand from the unmutated tree (`HALFPIPE_CONFORM_BIN`), so that a
//! mutant of the cell codec, which the kit shares for framing, cannot
//! change the kit too. A mutant is killed when some case fails.
//!
//! Ignored by a plain `cargo test`: it takes minutes and needs that kit.
//! `HALFPIPE_CONFORM_ARGS` adds arguments (the script leaves out the cases
//! that only wait on halfpipe's clocks, which no proto mutant touches).

use std::process::Command;

#[test]
#[ignore = "mutation testing: needs HALFPIPE_CONFORM_BIN (scripts/mutants.sh)"]
fn the_conformance_kit_passes_against_this_build() {
    let kit = std::env::var("HALFPIPE_CONFORM_BIN")
        .expect("HALFPIPE_CONFORM_BIN: a halfpipe-conform built from the unmutated tree");
    let extra = std::env::var("HALFPIPE_CONFORM_ARGS").unwrap_or_default();
    let status = Command::new(kit)
        .arg("--impl")
        .arg(env!("CARGO_BIN_EXE_halfpipe"))
        .args(extra.split_whitespace())
        .status()
        .expect("the kit runs");
    assert!(
        status.success(),
        "the kit failed against this build: {status}"
    );
}
