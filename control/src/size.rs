//! Sizes on the command line (`-e 2M`) and in human output (`(2.0MB)`).

/// Parses a size with an optional binary suffix: k, M, G, T, P, E (either
/// case), as `expand_number(3)` does. `0x` hex is accepted too.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let hex = t.starts_with("0x");
    let (num, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() && !hex => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(format!("invalid size '{s}': unknown suffix '{c}'")),
            };
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    let value = if let Some(hex) = num.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        num.parse::<u64>()
    }
    .map_err(|_| {
        format!("invalid size '{s}': expected a number with an optional k/M/G/T suffix")
    })?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

/// Formats bytes as the original's `%NB` does: `0B`, `512B`, `2.0MB`,
/// `128MB`, `1.0GB` (binary multiples, one decimal below 10).
pub fn humanize(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut unit = 0;
    let mut div = 1u128;
    while unit + 1 < UNITS.len() && u128::from(bytes) >= div * 1024 {
        div *= 1024;
        unit += 1;
    }
    let tenths = (u128::from(bytes) * 10 + div / 2) / div;
    if tenths < 100 {
        format!("{}.{}{}", tenths / 10, tenths % 10, UNITS[unit])
    } else {
        let whole = (u128::from(bytes) + div / 2) / div;
        if whole >= 1024 && unit + 1 < UNITS.len() {
            format!("1.0{}", UNITS[unit + 1])
        } else {
            format!("{whole}{}", UNITS[unit])
        }
    }
}

/// `N (human)` as printed in `list` and `dump`.
pub fn with_human(bytes: u64) -> String {
    format!("{bytes} ({})", humanize(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("3T"), Ok(3 << 40));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("20E").is_err());
    }

    #[test]
    fn humanizes_like_the_original() {
        assert_eq!(humanize(0), "0B");
        assert_eq!(humanize(512), "512B");
        assert_eq!(humanize(4 << 20), "4.0MB");
        assert_eq!(humanize(2 << 20), "2.0MB");
        assert_eq!(humanize(128 << 20), "128MB");
        assert_eq!(humanize(1 << 30), "1.0GB");
        assert_eq!(humanize((1 << 30) - 8192), "1.0GB");
        assert_eq!(with_human(4194304), "4194304 (4.0MB)");
    }
}
