//! Human-friendly sizes and durations (`"4MiB"`, `"60s"`).

use std::time::Duration;

use crate::file::IntOrStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnitError {
    /// Not of the form `<n><unit>` with a known unit.
    Malformed,
    /// A bare integer where a unit is required.
    MissingUnit,
    /// Well-formed but negative or beyond what the type can hold; callers
    /// report this as out of range rather than as a syntax problem.
    Overflow,
}

pub(crate) const SIZE_FORMS: &str =
    r#"an integer byte count or "<n>B|KiB|MiB|GiB|KB|MB|GB", e.g. "4MiB""#;
pub(crate) const DURATION_FORMS: &str = r#""<n>ms|s|m|h", e.g. "60s""#;

/// Bytes. A bare integer is a byte count.
pub(crate) fn parse_size(v: &IntOrStr) -> Result<u64, UnitError> {
    match v {
        IntOrStr::Int(n) => u64::try_from(*n).map_err(|_| UnitError::Overflow),
        IntOrStr::Str(s) => {
            let (n, unit) = split_number(s)?;
            let mult: u64 = match unit {
                "B" => 1,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                "KB" => 1_000,
                "MB" => 1_000_000,
                "GB" => 1_000_000_000,
                _ => return Err(UnitError::Malformed),
            };
            n.checked_mul(mult).ok_or(UnitError::Overflow)
        }
    }
}

/// A bare integer is rejected: "60" could mean seconds or milliseconds and
/// guessing wrong is a 1000x error.
pub(crate) fn parse_duration(v: &IntOrStr) -> Result<Duration, UnitError> {
    match v {
        IntOrStr::Int(_) => Err(UnitError::MissingUnit),
        IntOrStr::Str(s) => {
            let (n, unit) = split_number(s)?;
            let ms_per: u64 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                _ => return Err(UnitError::Malformed),
            };
            n.checked_mul(ms_per)
                .map(Duration::from_millis)
                .ok_or(UnitError::Overflow)
        }
    }
}

/// Splits `"<digits><unit>"`, tolerating spaces around and between them.
fn split_number(s: &str) -> Result<(u64, &str), UnitError> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(UnitError::Malformed);
    }
    let n = s[..digits_end]
        .parse::<u64>()
        .map_err(|_| UnitError::Overflow)?;
    Ok((n, s[digits_end..].trim_start()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> IntOrStr {
        IntOrStr::Str(v.to_owned())
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size(&IntOrStr::Int(4096)), Ok(4096));
        assert_eq!(parse_size(&s("7B")), Ok(7));
        assert_eq!(parse_size(&s("4KiB")), Ok(4096));
        assert_eq!(parse_size(&s("4MiB")), Ok(4 << 20));
        assert_eq!(parse_size(&s("1GiB")), Ok(1 << 30));
        assert_eq!(parse_size(&s("4KB")), Ok(4_000));
        assert_eq!(parse_size(&s("4MB")), Ok(4_000_000));
        assert_eq!(parse_size(&s("1GB")), Ok(1_000_000_000));
        assert_eq!(parse_size(&s(" 4 MiB ")), Ok(4 << 20));
        assert_eq!(parse_size(&s("4mib")), Err(UnitError::Malformed));
        assert_eq!(parse_size(&s("4096")), Err(UnitError::Malformed));
        assert_eq!(parse_size(&s("MiB")), Err(UnitError::Malformed));
        assert_eq!(parse_size(&s("-4MiB")), Err(UnitError::Malformed));
        assert_eq!(parse_size(&s("1.5MiB")), Err(UnitError::Malformed));
        assert_eq!(parse_size(&IntOrStr::Int(-1)), Err(UnitError::Overflow));
        assert_eq!(
            parse_size(&s("99999999999999GiB")),
            Err(UnitError::Overflow)
        );
        assert_eq!(
            parse_size(&s("999999999999999999999999B")),
            Err(UnitError::Overflow)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration(&s("250ms")), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(&s("60s")), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration(&s("5m")), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration(&s("24h")), Ok(Duration::from_secs(86_400)));
        assert_eq!(
            parse_duration(&IntOrStr::Int(60)),
            Err(UnitError::MissingUnit)
        );
        assert_eq!(parse_duration(&s("60")), Err(UnitError::Malformed));
        assert_eq!(parse_duration(&s("60x")), Err(UnitError::Malformed));
        assert_eq!(parse_duration(&s("1d")), Err(UnitError::Malformed));
        assert_eq!(
            parse_duration(&s("99999999999999999h")),
            Err(UnitError::Overflow)
        );
    }
}
