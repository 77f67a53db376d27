//! Text from peers, made fit to echo back or log.

use std::borrow::Cow;

/// `text` cut to at most `max` characters (an ellipsis marks the cut), for
/// echoing caller input back.
pub fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]).into(),
        None => text.into(),
    }
}

/// A peer's `text` as it is logged or passed on: cut to `max` characters,
/// control characters (which would forge log lines) as spaces.
pub fn tame(text: &str, max: usize) -> String {
    shorten(text, max)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortens_on_character_boundaries() {
        assert_eq!(shorten("héllo", 10), "héllo");
        assert_eq!(shorten("héllo", 2), "hé…");
    }

    #[test]
    fn tames_control_characters_and_length() {
        assert_eq!(tame("a\nb\rc\u{1b}[31m", 100), "a b c [31m");
        assert_eq!(tame(&"x".repeat(50), 4), "xxxx…");
    }
}
