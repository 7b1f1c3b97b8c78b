//! The environment switches that turn one part of the CPU path off, to measure what it adds
//! ([`super::tract_opt::TRACT_ONLY_ENV`], [`super::direct_conv::WINOGRAD_ENV`],
//! [`super::tract::TRACT_THREADS_ENV`]). Each takes `0` or `1`. Any other value is refused
//! when a CPU model is loaded or its threads are made: read as "not the value that turns it
//! off", a typo (`off`, `false`, `no`) would silently measure the very path it meant to remove.

/// Every switch: its variable and its value when unset.
const SWITCHES: [(&str, bool); 3] = [
    (super::tract_opt::TRACT_ONLY_ENV, false),
    (super::direct_conv::WINOGRAD_ENV, true),
    (super::tract::TRACT_THREADS_ENV, true),
];

/// The value of switch `name`: `default` when unset, `0` / `1` (spaces around them allowed),
/// else an error naming the variable, its value and the two accepted ones.
pub(crate) fn switch(name: &str, default: bool) -> Result<bool, String> {
    let Some(value) = std::env::var_os(name) else { return Ok(default) };
    match value.to_str().map(str::trim) {
        Some("0") => Ok(false),
        Some("1") => Ok(true),
        _ => Err(format!("{name}={value:?}: use 0 or 1 (or leave it unset)")),
    }
}

/// [`switch`] where a bad value was already refused by [`check`]: the default then.
pub(crate) fn enabled(name: &str, default: bool) -> bool {
    switch(name, default).unwrap_or(default)
}

/// Refuses a bad value in any switch.
pub(crate) fn check() -> Result<(), String> {
    SWITCHES.iter().try_for_each(|&(name, default)| switch(name, default).map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_take_zero_or_one_and_refuse_anything_else() {
        // A variable of its own: the real ones are read by tests running in parallel.
        let name = "DIFFSHIELD_SWITCH_UNDER_TEST";
        std::env::remove_var(name);
        assert_eq!(switch(name, true), Ok(true));
        assert_eq!(switch(name, false), Ok(false));
        for (value, want) in [("0", false), (" 1\n", true), ("1", true)] {
            std::env::set_var(name, value);
            assert_eq!(switch(name, !want), Ok(want), "{value:?}");
        }
        for value in ["off", "false", "", "2", "yes"] {
            std::env::set_var(name, value);
            let e = switch(name, true).expect_err(value);
            assert!(e.contains(name) && e.contains("use 0 or 1"), "{e}");
            assert!(enabled(name, true) && !enabled(name, false), "a refused value is the default");
        }
        std::env::remove_var(name);
        assert_eq!(check(), Ok(()), "the real switches are unset under cargo test");
    }
}
