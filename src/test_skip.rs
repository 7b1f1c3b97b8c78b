//! A unit test that cannot run on this machine (a kernel level the CPU lacks) says so in the
//! test output itself: libtest keeps the `print!` / `eprint!` output of a passing test to itself,
//! so the note is written to the process's standard error directly.

use std::io::Write;

/// Prints `SKIPPED (test name): what` where `cargo test` shows it, passing or not (libtest
/// names each test's thread after the test).
pub(crate) fn note(what: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED ({test}): {what}");
}
