//! Any text, and any mutation of a valid config, gives a config or an error
//! that names file:line:col: never a panic. A property standing in for
//! coverage-guided fuzzing (see shared/tests/decoders.rs).

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn any_text_is_a_config_or_a_located_error(text in "\\PC{0,400}") {
        if let Err(e) = udpshard_config::parse(&text, "f.toml") {
            prop_assert!(e.to_string().starts_with("f.toml:"), "{e}");
        }
    }

    #[test]
    fn a_mangled_default_config_is_a_config_or_a_located_error(
        at in any::<prop::sample::Index>(), cut in 0usize..40, insert in "\\PC{0,12}",
    ) {
        let text = udpshard_config::DEFAULT_CONFIG_TOML;
        let start = at.index(text.len());
        let start = (0..=start).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let end = (start + cut).min(text.len());
        let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        let mangled = format!("{}{insert}{}", &text[..start], &text[end..]);
        if let Err(e) = udpshard_config::parse(&mangled, "f.toml") {
            prop_assert!(e.to_string().starts_with("f.toml:"), "{e}");
        }
    }
}
