//! Arbitrary bytes as a frame body: [`common::Command`] deserialisation
//! never panics, and whatever parses re-encodes to a frame that parses back
//! to the same command and encodes to the same bytes again.

#![no_main]

use common::Command;
use common::codec::encode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(cmd) = serde_json::from_slice::<Command>(body) else {
        return;
    };
    // A command that parsed from at most a frame's worth of JSON may still
    // encode larger (escapes), so encode without a limit here.
    let frame = encode(&cmd, usize::MAX).expect("a parsed command encodes");
    let len = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
    assert_eq!(len, frame.len() - 4, "header announces the body length");
    let again: Command = serde_json::from_slice(&frame[4..])
        .unwrap_or_else(|e| panic!("re-encoded {cmd:?} does not parse: {e}"));
    assert_eq!(again, cmd, "re-parsed command differs");
    let frame_again = encode(&again, usize::MAX).expect("encodes");
    assert_eq!(frame_again, frame, "encoding is not stable");
});
