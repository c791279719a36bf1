//! Debezium's value encodings turned into the canonical text pgoutput sends
//! for the same column, so that one mapping renders the same keys from
//! either source.
//!
//! The Postgres source asks its walsender for `TimeZone=UTC` and
//! `DateStyle=ISO`, so timestamps with a time zone read `... +00` on both
//! paths. The table of encodings is in `docs/KAFKA.md`.

/// Days from 0000-03-01 to 1970-01-01 in the proleptic Gregorian calendar.
const EPOCH_SHIFT_DAYS: i64 = 719_468;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// `(year, month, day)` of a day counted from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + EPOCH_SHIFT_DAYS;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).expect("1..=31");
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).expect("1..=12");
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to `(year, month, day)`.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - EPOCH_SHIFT_DAYS
}

/// A date as Postgres prints it with `DateStyle=ISO`: `2024-01-31`, or
/// `0044-03-15 BC` before year 1.
pub fn date_from_days(days: i64) -> String {
    let (year, month, day) = civil_from_days(days);
    if year <= 0 {
        format!("{:04}-{month:02}-{day:02} BC", 1 - year)
    } else {
        format!("{year:04}-{month:02}-{day:02}")
    }
}

/// `HH:MM:SS` plus the fraction Postgres prints: trailing zeros dropped, none
/// when whole.
fn time_of_day(micros: i64) -> String {
    let seconds = micros / 1_000_000;
    let fraction = micros % 1_000_000;
    let mut text = format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    );
    if fraction != 0 {
        let digits = format!(".{fraction:06}");
        text.push_str(digits.trim_end_matches('0'));
    }
    text
}

/// A time of day from microseconds since midnight.
pub fn time_from_micros(micros: i64) -> String {
    time_of_day(micros.rem_euclid(MICROS_PER_DAY))
}

/// Debezium's encoding of Postgres' `infinity` timestamp (the JDBC
/// driver's sentinel), the same number in every timestamp precision.
pub const INFINITY_SENTINEL: i64 = 9_223_372_036_825_200_000;
/// Debezium's encoding of `-infinity`.
pub const NEGATIVE_INFINITY_SENTINEL: i64 = -9_223_372_036_832_400_000;

/// `infinity` or `-infinity`, as Postgres prints them, for Debezium's
/// sentinel numbers (`io.debezium.time.Timestamp`, `MicroTimestamp`,
/// `NanoTimestamp`: the same number in each).
pub fn infinite_timestamp(raw: i64) -> Option<&'static str> {
    match raw {
        INFINITY_SENTINEL => Some("infinity"),
        NEGATIVE_INFINITY_SENTINEL => Some("-infinity"),
        _ => None,
    }
}

/// A `timestamp` (without time zone) from microseconds since the epoch.
pub fn timestamp_from_micros(micros: i64) -> String {
    let days = micros.div_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let time = time_of_day(micros.rem_euclid(MICROS_PER_DAY));
    if year <= 0 {
        format!("{:04}-{month:02}-{day:02} {time} BC", 1 - year)
    } else {
        format!("{year:04}-{month:02}-{day:02} {time}")
    }
}

/// A `timestamptz` as the walsender prints it in UTC, from Debezium's
/// ISO-8601 text (`2024-01-31T12:34:56.789Z`, or with an offset).
pub fn timestamptz_from_iso(text: &str) -> Option<String> {
    // Debezium sends an infinite timestamptz as the word itself.
    if matches!(text, "infinity" | "-infinity") {
        return Some(text.to_owned());
    }
    let micros = parse_iso_micros(text)?;
    let plain = timestamp_from_micros(micros);
    Some(match plain.strip_suffix(" BC") {
        Some(date_time) => format!("{date_time}+00 BC"),
        None => format!("{plain}+00"),
    })
}

/// Microseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.f][Z|±HH[:MM]]`.
fn parse_iso_micros(text: &str) -> Option<i64> {
    let (date, rest) = text.split_once(['T', ' '])?;
    let mut parts = date.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let zone_at = rest.find(['Z', 'z', '+', '-']).unwrap_or(rest.len());
    let (time, zone) = rest.split_at(zone_at);
    let (clock, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut clock = clock.splitn(3, ':');
    let hours: i64 = clock.next()?.parse().ok()?;
    let minutes: i64 = clock.next()?.parse().ok()?;
    let seconds: i64 = clock.next().unwrap_or("0").parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut micros_text: String = fraction.chars().take(6).collect();
    while micros_text.len() < 6 {
        micros_text.push('0');
    }
    let fraction: i64 = micros_text.parse().ok()?;
    let offset_seconds = match zone {
        "" | "Z" | "z" => 0,
        zone => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let digits: String = zone[1..].chars().filter(char::is_ascii_digit).collect();
            let hours: i64 = digits.get(..2)?.parse().ok()?;
            let minutes: i64 = digits.get(2..4).unwrap_or("0").parse().ok()?;
            sign * (hours * 3600 + minutes * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let local = (days * 86_400 + hours * 3600 + minutes * 60 + seconds) * 1_000_000 + fraction;
    Some(local - offset_seconds * 1_000_000)
}

/// A `timetz` from Debezium's `HH:MM:SS[.f]Z`, as the walsender prints it.
pub fn timetz_from_iso(text: &str) -> Option<String> {
    let micros = parse_iso_micros(&format!("1970-01-01T{text}"))?;
    Some(format!("{}+00", time_from_micros(micros)))
}

/// A decimal from Kafka Connect's encoding: the unscaled value as a
/// big-endian two's-complement integer, and the scale.
pub fn decimal_from_bytes(bytes: &[u8], scale: u32) -> String {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut magnitude: Vec<u8> = bytes.to_vec();
    if negative {
        // Two's complement: invert and add one.
        for byte in &mut magnitude {
            *byte = !*byte;
        }
        for byte in magnitude.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
    }
    // Repeated division by ten of the big-endian magnitude.
    let mut digits = Vec::new();
    while magnitude.iter().any(|&b| b != 0) {
        let mut remainder = 0u32;
        for byte in &mut magnitude {
            let value = (remainder << 8) | u32::from(*byte);
            *byte = u8::try_from(value / 10).expect("below 256");
            remainder = value % 10;
        }
        digits.push(b'0' + u8::try_from(remainder).expect("a digit"));
    }
    let scale = scale as usize;
    while digits.len() <= scale {
        digits.push(b'0');
    }
    digits.reverse();
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    let mut text = String::with_capacity(digits.len() + 2);
    if negative {
        text.push('-');
    }
    text.push_str(std::str::from_utf8(whole).expect("ASCII digits"));
    if scale > 0 {
        text.push('.');
        text.push_str(std::str::from_utf8(fraction).expect("ASCII digits"));
    }
    text
}

/// Standard base64 (with or without padding), as Kafka Connect's JSON
/// converter writes bytes.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn sextet(byte: u8) -> Option<u32> {
        Some(u32::from(match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        }))
    }
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut acc = 0u32;
        for &byte in chunk {
            acc = (acc << 6) | sextet(byte)?;
        }
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// `bytea` as Postgres prints it (`bytea_output = hex`).
pub fn bytea_hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(2 + bytes.len() * 2);
    text.push_str("\\x");
    for byte in bytes {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(date_from_days(0), "1970-01-01");
        assert_eq!(date_from_days(19_753), "2024-01-31");
        assert_eq!(date_from_days(-1), "1969-12-31");
        assert_eq!(date_from_days(11_016), "2000-02-29");
        assert_eq!(date_from_days(-719_528), "0001-01-01 BC");
        assert_eq!(date_from_days(-719_529), "0002-12-31 BC");
        for days in [-800_000, -1, 0, 59, 60, 11_016, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn timestamps_drop_trailing_zeros_like_postgres() {
        assert_eq!(
            timestamp_from_micros(1_706_704_496_789_000),
            "2024-01-31 12:34:56.789"
        );
        assert_eq!(
            timestamp_from_micros(1_706_704_496_000_000),
            "2024-01-31 12:34:56"
        );
        assert_eq!(timestamp_from_micros(-1), "1969-12-31 23:59:59.999999");
        assert_eq!(time_from_micros(45_296_500_000), "12:34:56.5");
    }

    #[test]
    fn zoned_timestamps_become_utc() {
        assert_eq!(
            timestamptz_from_iso("2024-01-31T12:34:56.789Z").unwrap(),
            "2024-01-31 12:34:56.789+00"
        );
        assert_eq!(
            timestamptz_from_iso("2024-01-31T14:34:56+02:00").unwrap(),
            "2024-01-31 12:34:56+00"
        );
        assert_eq!(
            timestamptz_from_iso("2024-01-01T00:30:00-01:00").unwrap(),
            "2024-01-01 01:30:00+00"
        );
        assert_eq!(timetz_from_iso("12:34:56Z").unwrap(), "12:34:56+00");
        assert_eq!(timestamptz_from_iso("yesterday"), None);
    }

    #[test]
    fn decimals_from_twos_complement() {
        // 1250 with scale 2.
        assert_eq!(decimal_from_bytes(&[0x04, 0xE2], 2), "12.50");
        assert_eq!(decimal_from_bytes(&[0xFB, 0x1E], 2), "-12.50");
        assert_eq!(decimal_from_bytes(&[0x05], 3), "0.005");
        assert_eq!(decimal_from_bytes(&[0x00], 0), "0");
        assert_eq!(decimal_from_bytes(&[], 2), "0.00");
        assert_eq!(decimal_from_bytes(&[0xFF], 0), "-1");
        let big = [0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decimal_from_bytes(&big, 0),
            "340282366920938463463374607431768211456"
        );
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("BOI=").unwrap(), [0x04, 0xE2]);
        assert_eq!(base64_decode("BOI").unwrap(), [0x04, 0xE2]);
        assert_eq!(base64_decode("AQID").unwrap(), [1, 2, 3]);
        assert_eq!(base64_decode("").unwrap(), Vec::<u8>::new());
        assert_eq!(base64_decode("A"), None);
        assert_eq!(base64_decode("a b="), None);
        assert_eq!(bytea_hex(&[0xDE, 0xAD]), "\\xdead");
    }
}
