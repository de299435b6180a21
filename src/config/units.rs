//! Durations, sizes and signals as a configuration file writes them, both ways.

use std::time::Duration;

/// A signal number, with its name for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub i32);

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// Other names of signals in the table, accepted when parsing (signal(7)).
const ALIASES: &[(&str, i32)] = &[
    ("IOT", libc::SIGABRT),
    ("CLD", libc::SIGCHLD),
    ("POLL", libc::SIGIO),
];

impl Signal {
    /// Parses a signal the way `kill(1)` names it: `SIGTERM`, `TERM` or `term` (any case,
    /// with or without `SIG`), every name of signal(7) (`HUP` ... `TTIN`, `TTOU`, `WINCH`,
    /// `IOT`, `POLL`), the real-time signals as `RTMIN`, `RTMIN+N`, `RTMAX-N`, `RTMAX`, or a
    /// number from 1 to 64. This is the one parser of signal names: the stop signals of a
    /// site file and `hatchery signal` both use it.
    pub fn parse(s: &str) -> Result<Signal, String> {
        let upper = s.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        if let Some((_, n)) = SIGNALS
            .iter()
            .chain(ALIASES)
            .find(|(name, _)| *name == bare)
        {
            return Ok(Signal(*n));
        }
        if let Some(n) = realtime(bare) {
            return Ok(Signal(n));
        }
        match s.trim().parse::<i32>() {
            Ok(n) if (1..=64).contains(&n) => Ok(Signal(n)),
            _ => Err(format!(
                "unknown signal {}: use a name ({}, RTMIN+N, RTMAX-N) with or without SIG, or a number from 1 to 64",
                super::quoted(s),
                SIGNALS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// `SIGTERM`, `SIGRTMIN+2`, or the number for signals without a name.
    pub fn name(self) -> String {
        match SIGNALS.iter().find(|(_, n)| *n == self.0) {
            Some((name, _)) => format!("SIG{name}"),
            None if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&self.0) => {
                format!("SIGRTMIN+{}", self.0 - libc::SIGRTMIN())
            }
            None => self.0.to_string(),
        }
    }
}

/// `RTMIN`, `RTMIN+N`, `RTMAX-N` or `RTMAX` (without `SIG`, upper case) as a signal
/// number, if within the real-time range of this C library.
fn realtime(bare: &str) -> Option<i32> {
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let offset = |rest: &str, sign: char| -> Option<i32> {
        match rest {
            "" => Some(0),
            r => r.strip_prefix(sign)?.parse::<i32>().ok(),
        }
    };
    let n = if let Some(rest) = bare.strip_prefix("RTMIN") {
        min.checked_add(offset(rest, '+')?)?
    } else if let Some(rest) = bare.strip_prefix("RTMAX") {
        max.checked_sub(offset(rest, '-')?)?
    } else {
        return None;
    };
    (min..=max).contains(&n).then_some(n)
}

/// The longest duration accepted: a year.
const MAX_DURATION: Duration = Duration::from_secs(86_400 * 365);

/// Parses a duration: `250ms`, `30s`, `5m`, `1h`, `1m30s`, `2h 15m` (the `humantime`
/// crate's format: numbers each with a unit, `ms`, `s`, `m` or `min`, `h`, `d`, ...), or a
/// decimal number with one unit (`1.5s`); at most a year.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let parsed = humantime::parse_duration(t)
        .ok()
        .or_else(|| decimal_duration(t));
    match parsed {
        Some(d) if d <= MAX_DURATION => Ok(d),
        Some(_) => Err(format!("{}: at most a year (\"365d\")", super::quoted(s))),
        None => Err(format!(
            "invalid duration {}: use numbers with units (ms, s, m, h, d), e.g. \"250ms\", \"30s\" or \"1m30s\"",
            super::quoted(s)
        )),
    }
}

/// `1.5s`: a decimal number and one unit (`ms`, `s`, `m`, `min`, `h`), which `humantime`
/// does not read.
fn decimal_duration(t: &str) -> Option<Duration> {
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    let value: f64 = num.parse().ok()?;
    let secs = value * scale;
    (secs.is_finite() && secs >= 0.0 && secs <= MAX_DURATION.as_secs_f64())
        .then(|| Duration::from_secs_f64(secs))
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses a size: a number of bytes, or a number (decimals allowed, `1.5G`) and a binary
/// unit: `K` or `KiB` (1024), `M` or `MiB`, `G` or `GiB`, `T` or `TiB`, with or without a
/// space. Decimal units (`KB`, `MB`, `GB`) are refused rather than guessed at. Parsed here,
/// not by a crate: the common ones (`bytesize`) read `M` as 10^6 bytes, and this format
/// has always meant MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "invalid size {}: {why}use a number of bytes or a number with K, M, G or T (binary: KiB, MiB, GiB, TiB), e.g. \"512M\" or \"2GiB\"",
            super::quoted(s)
        )
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        "KB" | "kB" | "MB" | "GB" | "TB" => {
            return Err(bad("decimal units are ambiguous: "));
        }
        _ => return Err(bad("")),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1 << shift).ok_or_else(|| bad("too large: "));
    }
    // A decimal: exact enough in f64 for any size that fits in u64 with a unit.
    match num.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 && num.contains('.') => {
            let bytes = f * (1u64 << shift) as f64;
            if bytes >= u64::MAX as f64 {
                Err(bad("too large: "))
            } else {
                // Finite, at least 0 and below u64::MAX (checked above): the cast only
                // drops the fraction of a byte.
                #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
                Ok(bytes as u64)
            }
        }
        _ => Err(bad("")),
    }
}

/// Formats a size the way [`parse_size`] reads it.
pub fn format_size(v: u64) -> String {
    if v > 0 && v % (1 << 30) == 0 {
        format!("{}G", v >> 30)
    } else if v > 0 && v % (1 << 20) == 0 {
        format!("{}M", v >> 20)
    } else if v > 0 && v % (1 << 10) == 0 {
        format!("{}K", v >> 10)
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_format_round_trip() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h 15m"), Ok(Duration::from_secs(8100)));
        assert_eq!(parse_duration("1min"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        for bad in ["", "10", "s", "-1s", "10 parsecs", "1e9h", "400d", "1.5.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        for d in [
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_secs(7200),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn sizes_parse_binary_units() {
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("100B"), Ok(100));
        let e = parse_size("2GB").unwrap_err();
        assert!(e.contains("decimal units are ambiguous"), "{e}");
        assert_eq!(
            parse_size("lots").unwrap_err(),
            "invalid size \"lots\": use a number of bytes or a number with K, M, G or T (binary: KiB, MiB, GiB, TiB), e.g. \"512M\" or \"2GiB\""
        );
        assert!(parse_size("10X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("20000000T").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(parse_size(&format_size(3 << 30)), Ok(3 << 30));
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(Signal::parse("SIGTERM"), Ok(Signal(libc::SIGTERM)));
        assert_eq!(Signal::parse("hup"), Ok(Signal(libc::SIGHUP)));
        assert_eq!(Signal::parse("9"), Ok(Signal(9)));
        assert!(Signal::parse("SIGFOO").unwrap_err().contains("TERM"));
        assert_eq!(Signal(libc::SIGUSR1).name(), "SIGUSR1");
        for (name, n) in [
            ("TTIN", libc::SIGTTIN),
            ("sigttou", libc::SIGTTOU),
            ("SIGWINCH", libc::SIGWINCH),
            ("IOT", libc::SIGABRT),
            ("SIGPOLL", libc::SIGIO),
            ("SIGRTMIN", libc::SIGRTMIN()),
            ("SIGRTMIN+3", libc::SIGRTMIN() + 3),
            ("rtmax-1", libc::SIGRTMAX() - 1),
            ("RTMAX", libc::SIGRTMAX()),
        ] {
            assert_eq!(Signal::parse(name), Ok(Signal(n)), "{name}");
        }
        // The name comes back as it parses.
        let rt = Signal::parse("SIGRTMIN+2").expect("rt");
        assert_eq!(rt.name(), "SIGRTMIN+2");
        assert_eq!(Signal::parse(&rt.name()), Ok(rt));
        for bad in [
            "SIGRTMIN+99",
            "RTMAX+1",
            "RTMIN-1",
            "0",
            "65",
            "SIG",
            "SIGRTMIN+x",
        ] {
            assert!(Signal::parse(bad).is_err(), "{bad}");
        }
        let e = Signal::parse("SIGFOO").unwrap_err();
        assert!(
            e.starts_with("unknown signal \"SIGFOO\": use a name (HUP, INT, QUIT,"),
            "{e}"
        );
    }
}
