//! Memory bounds: compare an estimate of what a run will allocate with what the machine has,
//! before allocating it, so that an oversized request is an error naming its flag instead of an
//! allocation failure that aborts the process.

use crate::{Error, Result};

/// Refused on every platform, whatever the machine reports: no machine this runs on has a
/// terabyte of memory for one run, and a request this large is a typo or an overflow.
pub const ABSOLUTE_CAP_BYTES: f64 = (1u64 << 40) as f64;

/// Memory the system can give a new allocation without swapping, in bytes: `MemAvailable` of
/// `/proc/meminfo` on Linux; `None` elsewhere or when it cannot be read.
pub fn available_bytes() -> Option<u64> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

/// `MemAvailable` (kB in the file) of a `/proc/meminfo` text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// `bytes` in binary units with three significant digits ("1.50 GiB").
pub fn format_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes.max(0.0);
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Errors (naming `what`, typically the flags and values that set the size) when the estimate
/// `needed` bytes is not finite, above [`ABSOLUTE_CAP_BYTES`], or above `available` (when known,
/// see [`available_bytes`]). `detail` says what the estimate counts.
pub fn check_fits(what: &str, needed: f64, detail: &str, available: Option<u64>) -> Result<()> {
    let too_big = |limit: String| {
        Error::invalid(
            what,
            format!(
                "needs about {} of memory ({detail}), more than {limit}; choose a smaller value",
                format_bytes(needed),
            ),
        )
    };
    if !needed.is_finite() || needed > ABSOLUTE_CAP_BYTES {
        return Err(too_big(format!("the sanity cap of {}", format_bytes(ABSOLUTE_CAP_BYTES))));
    }
    if let Some(avail) = available {
        if needed > avail as f64 {
            return Err(too_big(format!(
                "the {} available (MemAvailable)",
                format_bytes(avail as f64)
            )));
        }
    }
    Ok(())
}

/// [`check_fits`] against this machine's [`available_bytes`].
pub fn check_fits_here(what: &str, needed: f64, detail: &str) -> Result<()> {
    check_fits(what, needed, detail, available_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let text =
            "MemTotal:       16318480 kB\nMemFree:         1000 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(8_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn formats_binary_units() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(1536.0), "1.50 KiB");
        assert_eq!(format_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.00 GiB");
        assert_eq!(format_bytes(200.0 * 1024.0 * 1024.0), "200 MiB");
    }

    #[test]
    fn refuses_above_available_and_above_the_cap() {
        let gib = 1024.0 * 1024.0 * 1024.0;
        check_fits("--size 64", gib, "x", Some(2 << 30)).unwrap();
        let e = check_fits("--size 9999", 3.0 * gib, "UNet activations", Some(2 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--size 9999") && e.contains("3.00 GiB") && e.contains("2.00 GiB available"),
            "{e}"
        );
        // without a known amount, only the cap applies
        check_fits("--size 9999", 3.0 * gib, "x", None).unwrap();
        let e =
            check_fits("--size 1e9", 2.0 * ABSOLUTE_CAP_BYTES, "x", None).unwrap_err().to_string();
        assert!(e.contains("sanity cap of 1.00 TiB"), "{e}");
        assert!(check_fits("--count", f64::INFINITY, "x", None).is_err());
    }
}
