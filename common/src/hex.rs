//! Lower-case hexadecimal: session keys, certificate fingerprints, cache
//! names and listing cursors.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lower-case hexadecimal, two digits a byte.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// The bytes [`encode`] made `text` from; `None` for anything but pairs of
/// hexadecimal digits (either case; no sign, no prefix, no spaces).
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Exactly `N` bytes from `2 * N` hexadecimal digits.
pub fn decode_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    decode(text)?.try_into().ok()
}

fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_byte_as_two_lower_case_digits() {
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&all)), Some(all));
    }

    #[test]
    fn decodes_either_case() {
        assert_eq!(decode("DEADbeef"), Some(vec![0xde, 0xad, 0xbe, 0xef]));
    }

    #[test]
    fn refuses_what_is_not_pairs_of_digits() {
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("zz"), None);
        // `u8::from_str_radix` takes a sign: "+f" would be 15.
        assert_eq!(decode("+f"), None);
        assert_eq!(decode(" f"), None);
        assert_eq!(decode("éé"), None);
        assert_eq!(decode(""), Some(vec![]));
    }

    #[test]
    fn decodes_arrays_of_exactly_their_length() {
        assert_eq!(decode_array::<2>("0102"), Some([1, 2]));
        assert_eq!(decode_array::<2>("01"), None);
        assert_eq!(decode_array::<2>("010203"), None);
        assert_eq!(decode_array::<32>(&"é".repeat(32)), None);
    }
}
