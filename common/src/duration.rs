//! Human-friendly durations for flags and config files.

use std::time::Duration;

/// The longest duration a flag or config file may give: 100 years. Far
/// beyond any useful timeout, and far below what a clock reading plus a
/// duration can hold (`Instant + Duration` panics past about 292 billion
/// years; `Duration` arithmetic such as a backoff's doubling overflows near
/// 584 billion): a longer value would be accepted at start and panic on
/// first use.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86400);

/// Why [`parse_duration_checked`] refused a value; both carry the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not a duration at all (no number, an unknown unit).
    Invalid(String),
    /// A duration, but longer than [`MAX_DURATION`].
    TooLong(String),
}

impl Refused {
    /// The message for the user.
    pub fn message(self) -> String {
        match self {
            Refused::Invalid(m) | Refused::TooLong(m) => m,
        }
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h` or a bare number of seconds, up to
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_checked(s).map_err(Refused::message)
}

/// As [`parse_duration`], saying whether a refused value was no duration
/// or too long a one.
pub fn parse_duration_checked(s: &str) -> Result<Duration, Refused> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let too_long = || Refused::TooLong(format!("`{s}` is too long (at most 100 years: 36500d)"));
    let n: u64 = match num.parse() {
        Ok(n) => n,
        // Digits only, past u64: a number, just a huge one.
        Err(_) if !num.is_empty() => return Err(too_long()),
        Err(_) => {
            return Err(Refused::Invalid(format!(
                "`{s}` is not a duration (examples: 500ms, 10s, 5m, 1h)"
            )));
        }
    };
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(too_long)
    };
    let d = match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => Err(Refused::Invalid(format!(
            "`{s}` has an unknown unit `{unit}` (use ms, s, m, h or d)"
        ))),
    }?;
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// As [`parse_duration`], refusing zero: for delays and deadlines where
/// zero would mean a busy loop or a wait that always fails.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!(
            "`{}` is zero; give a duration above zero (examples: 500ms, 10s)",
            s.trim()
        )),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("99999999999999999d").is_err());
        // Accepted values can be added to a clock reading and doubled.
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
        for long in [
            "36501d",
            "18446744073709551615",
            "3153600001",
            "300000000000000d",
        ] {
            let err = parse_duration(long).unwrap_err();
            assert!(err.contains("too long"), "{long}: {err}");
            assert!(parse_positive_duration(long).is_err());
        }
        let longest = parse_duration("36500d").unwrap();
        let _ = std::time::Instant::now() + longest * 4;
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert!(parse_duration("10x").unwrap_err().contains("unknown unit"));
        // Which kind of refusal, without reading the message.
        for (value, too_long) in [
            ("too long", false),
            ("10x", false),
            ("", false),
            ("36501d", true),
            ("99999999999999999999999", true),
            ("300000000000000d", true),
        ] {
            let refused = parse_duration_checked(value).unwrap_err();
            assert_eq!(
                matches!(refused, Refused::TooLong(_)),
                too_long,
                "{value}: {refused:?}"
            );
        }
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(
            parse_positive_duration("0s")
                .unwrap_err()
                .contains("is zero")
        );
        assert!(parse_positive_duration("0ms").is_err());
        assert_eq!(parse_positive_duration("1ms"), Ok(Duration::from_millis(1)));
    }
}
