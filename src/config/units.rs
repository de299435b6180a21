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

impl Signal {
    /// Parses `SIGTERM`, `TERM`, `term` or a number from 1 to 64.
    pub fn parse(s: &str) -> Result<Signal, String> {
        let upper = s.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        if let Some((_, n)) = SIGNALS.iter().find(|(name, _)| *name == bare) {
            return Ok(Signal(*n));
        }
        match s.trim().parse::<i32>() {
            Ok(n) if (1..=64).contains(&n) => Ok(Signal(n)),
            _ => Err(format!(
                "unknown signal {s:?}: use a name ({}) with or without SIG, or a number from 1 to 64",
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

/// Parses `250ms`, `30s`, `1.5s`, `5m`, `1h` (a number and a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => f64::NAN,
    };
    let value: f64 = num.parse().unwrap_or(f64::NAN);
    let secs = value * scale;
    if !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(format!(
            "invalid duration {s:?}: use a number and a unit (ms, s, m, h), e.g. \"250ms\" or \"30s\""
        ));
    }
    Ok(Duration::from_secs_f64(secs))
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

/// Parses a size: bytes, or a number with `K`/`KiB`, `M`/`MiB`, `G`/`GiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => 0,
    };
    match num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)) {
        Some(v) if mult != 0 => Ok(v),
        _ => Err(format!(
            "invalid size {s:?}: use a number of bytes or a number with K, M or G (KiB, MiB, GiB), e.g. \"10M\""
        )),
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
        for bad in ["", "10", "s", "-1s", "10 parsecs", "1e9h"] {
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
        assert!(parse_size("10X").is_err());
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
    }
}
