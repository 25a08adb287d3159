//! Byte sizes as users write them (`5B`, `60K`, `8GiB`) and as we print them.

/// Parse a size: a number with an optional suffix. Decimal K, M, B/G, T (mergekit's
/// `--out-shard-size` convention: `5B` is five billion bytes) or binary KiB, MiB, GiB, TiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size: write a number with an optional K, M, B/G, T or KiB, MiB, GiB suffix"))?;
    let mult: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "b" | "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "`{s}`: unknown size suffix `{other}` (use K, M, B/G, T or KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 {
        return Err(format!("`{s}` is not a usable size"));
    }
    Ok(v.round() as u64)
}

/// Parse a duration: `500ms`, `30s`, `5m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (write 500ms, 30s, 5m or 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("`{s}` must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// A human-readable size, decimal units.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Rate (bytes per second) and seconds left of a transfer `done` of `total` bytes after
/// `secs` seconds; the time left is unknown (None) until some bytes are done.
pub fn rate_and_eta(done: u64, total: u64, secs: f64) -> (f64, Option<f64>) {
    let rate = done as f64 / secs.max(1e-9);
    let eta = (rate > 0.0).then(|| total.saturating_sub(done) as f64 / rate);
    (rate, eta)
}

/// Seconds left as `N s`, or `unknown` before anything is done.
pub fn fmt_eta(eta: Option<f64>) -> String {
    eta.map_or_else(|| "unknown".to_string(), |s| format!("{s:.0} s"))
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian calendar).
pub fn fmt_unix_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5B").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("60K").unwrap(), 60_000);
        assert_eq!(parse_size("1.5M").unwrap(), 1_500_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size(" 8 gb ").unwrap(), 8_000_000_000);
        for bad in ["", "x", "5X", "-1", "0", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        for bad in ["", "x", "0s", "5d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_bytes(999), "999 B");
        assert_eq!(fmt_bytes(1_500_000), "1.50 MB");
        assert_eq!(fmt_unix_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_unix_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_unix_time(1_795_999_999), "2026-11-30 00:53:19 UTC");
    }

    #[test]
    fn eta_is_unknown_before_the_first_byte() {
        assert_eq!(rate_and_eta(0, 100, 5.0), (0.0, None));
        assert_eq!(fmt_eta(rate_and_eta(0, 100, 0.0).1), "unknown");
        assert_eq!(rate_and_eta(50, 100, 5.0), (10.0, Some(5.0)));
        assert_eq!(fmt_eta(Some(5.0)), "5 s");
    }
}
