//! Lines the user must see while a progress bar runs.
//!
//! indicatif's `ProgressBar::println` prints nothing when the bar is hidden (stderr is not a
//! terminal: a log file, a pipe, CI), so warnings and "wrote X" lines go through [`say`]: above
//! the bar on a terminal, plain lines on stderr otherwise.

use indicatif::ProgressBar;

/// Prints `line` to stderr above `bar` (terminal) or as a plain line (no terminal).
pub fn say(bar: &ProgressBar, line: impl AsRef<str>) {
    let line = line.as_ref();
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}
