//! The SVG checks shared by tests/tune.rs and the crate's own tune tests (src/tune/tests.rs
//! includes this file by path).

/// `text` is one well-formed SVG document holding every string of `must_contain`.
pub fn assert_svg(text: &str, must_contain: &[&str]) {
    assert!(text.starts_with("<svg"), "not an SVG: {}", &text[..text.len().min(80)]);
    assert!(text.trim_end().ends_with("</svg>"));
    assert_eq!(text.matches("<svg").count(), 1);
    assert_eq!(text.matches("<text").count(), text.matches("</text>").count());
    for s in must_contain {
        assert!(text.contains(s), "the SVG lacks {s:?}");
    }
}
