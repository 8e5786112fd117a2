//! Seeded mutations of file bytes for robustness tests of the readers (safetensors, JSON
//! configs, tokenizers, LoRA files, PLY, checkpoints): every mutated input must give a clean
//! error or a valid result, never a panic or an abort. The same seed gives the same cases.

use crate::SeededRng;

/// Numbers that break readers which trust declared sizes, counts and offsets.
const NASTY_NUMBERS: [&str; 10] = [
    "0",
    "-1",
    "1",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1e308",
    "-0.0",
];

/// Bytes that matter to text formats (JSON, PLY headers) and to binary length fields.
const NASTY_BYTES: [u8; 10] = [0x00, 0xFF, 0x7F, 0x80, b'{', b'}', b'"', b'[', b'\n', b'9'];

/// One kind of mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Cut the input at a random length.
    Truncate,
    /// Flip one random bit.
    FlipBit,
    /// Set a random byte to a random or a significant value.
    SetByte,
    /// Insert a few random bytes.
    Insert,
    /// Remove a random range.
    Delete,
    /// Repeat a random range.
    Duplicate,
    /// Replace a run of ASCII digits (a declared size, count, offset or value in a text
    /// header) with a huge, negative, zero or overflowing number.
    Number,
    /// Overwrite 8 bytes at a random offset (a little-endian length field) with a huge value.
    HugeU64,
}

impl Mutation {
    pub const ALL: [Mutation; 8] = [
        Mutation::Truncate,
        Mutation::FlipBit,
        Mutation::SetByte,
        Mutation::Insert,
        Mutation::Delete,
        Mutation::Duplicate,
        Mutation::Number,
        Mutation::HugeU64,
    ];
}

/// A seeded generator of mutated inputs.
#[derive(Debug, Clone)]
pub struct Mutator {
    rng: SeededRng,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self { rng: SeededRng::new(seed) }
    }

    /// `input` with one to three random mutations applied; also returns their kinds (to
    /// describe a failing case).
    pub fn mutate(&mut self, input: &[u8]) -> (Vec<u8>, Vec<Mutation>) {
        let n = 1 + self.rng.below(3);
        let mut out = input.to_vec();
        let mut kinds = Vec::with_capacity(n);
        for _ in 0..n {
            let m = Mutation::ALL[self.rng.below(Mutation::ALL.len())];
            self.apply(&mut out, m);
            kinds.push(m);
        }
        (out, kinds)
    }

    /// Applies one mutation of kind `m` to `data`.
    pub fn apply(&mut self, data: &mut Vec<u8>, m: Mutation) {
        let len = data.len();
        let pos = |rng: &mut SeededRng, n: usize| if n == 0 { 0 } else { rng.below(n) };
        match m {
            Mutation::Truncate => {
                let at = pos(&mut self.rng, len);
                data.truncate(at);
            }
            Mutation::FlipBit if len > 0 => {
                let i = pos(&mut self.rng, len);
                data[i] ^= 1 << self.rng.below(8);
            }
            Mutation::SetByte if len > 0 => {
                let i = pos(&mut self.rng, len);
                data[i] = if self.rng.below(2) == 0 {
                    NASTY_BYTES[self.rng.below(NASTY_BYTES.len())]
                } else {
                    self.rng.below(256) as u8
                };
            }
            Mutation::Insert => {
                let at = pos(&mut self.rng, len + 1);
                let k = 1 + self.rng.below(8);
                let bytes: Vec<u8> = (0..k).map(|_| self.rng.below(256) as u8).collect();
                data.splice(at..at, bytes);
            }
            Mutation::Delete if len > 0 => {
                let at = pos(&mut self.rng, len);
                let k = 1 + self.rng.below(16.min(len - at));
                data.drain(at..at + k);
            }
            Mutation::Duplicate if len > 0 => {
                let at = pos(&mut self.rng, len);
                let k = 1 + self.rng.below(32.min(len - at));
                let chunk = data[at..at + k].to_vec();
                data.splice(at..at, chunk);
            }
            Mutation::Number => {
                let runs = digit_runs(data);
                if runs.is_empty() {
                    return;
                }
                let (a, b) = runs[self.rng.below(runs.len())];
                let with = NASTY_NUMBERS[self.rng.below(NASTY_NUMBERS.len())];
                data.splice(a..b, with.bytes());
            }
            Mutation::HugeU64 if len >= 8 => {
                // mostly the start (the 8-byte header length of safetensors)
                let at = if self.rng.below(2) == 0 { 0 } else { pos(&mut self.rng, len - 7) };
                let v: u64 = match self.rng.below(4) {
                    0 => u64::MAX,
                    1 => 1 << 40,
                    2 => len as u64,
                    _ => u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"))
                        .wrapping_add(1),
                };
                data[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            // a mutation that needs a longer input leaves a short one as it is
            _ => {}
        }
    }
}

/// `(start, end)` of every run of ASCII digits.
fn digit_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if data[i].is_ascii_digit() {
            let a = i;
            while i < data.len() && data[i].is_ascii_digit() {
                i += 1;
            }
            runs.push((a, i));
        } else {
            i += 1;
        }
    }
    runs
}

/// Runs `cases` seeded mutations of `base` (seeds `0..cases`, see [`Mutator`]) through `read`
/// and returns `(valid results, errors)`. For tests: a case that panics, or errors with an
/// empty message, panics here once all cases have run, listing every such case with its seed
/// and mutations (so the test fails and names them).
pub fn run_cases<E: std::fmt::Display>(
    name: &str,
    base: &[u8],
    cases: u64,
    mut read: impl FnMut(&[u8]) -> Result<(), E>,
) -> (usize, usize) {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let (mut ok, mut err, mut bad) = (0, 0, Vec::new());
    for seed in 0..cases {
        let (bytes, kinds) = Mutator::new(seed).mutate(base);
        match catch_unwind(AssertUnwindSafe(|| read(&bytes))) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) if e.to_string().is_empty() => {
                bad.push(format!("case {seed} {kinds:?}: an error with an empty message"))
            }
            Ok(Err(_)) => err += 1,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                bad.push(format!("case {seed} {kinds:?}: panic: {msg}"));
            }
        }
    }
    assert!(bad.is_empty(), "{name}: {} bad cases:\n{}", bad.len(), bad.join("\n"));
    eprintln!("{name}: {cases} cases, {ok} valid, {err} clean errors");
    (ok, err)
}

#[cfg(test)]
mod tests {

    #[test]
    fn run_cases_counts_results_and_errors() {
        let (ok, err) = run_cases("count", b"0123456789", 50, |b| {
            if b.len() % 2 == 0 {
                Ok(())
            } else {
                Err("odd length")
            }
        });
        assert_eq!(ok + err, 50);
        assert!(ok > 0 && err > 0, "{ok} {err}");
    }

    #[test]
    #[should_panic(expected = "bad cases")]
    fn run_cases_fails_on_a_panicking_reader() {
        run_cases("panic", b"0123456789", 20, |b| -> Result<(), String> {
            assert!(b.len() < 12, "too long");
            Ok(())
        });
    }

    use super::*;

    #[test]
    fn same_seed_same_cases_and_every_kind_changes_the_input() {
        let input = br#"{"a": 12, "b": [3, 45]} and some more bytes"#.to_vec();
        let (a, ka) = Mutator::new(5).mutate(&input);
        let (b, kb) = Mutator::new(5).mutate(&input);
        assert_eq!((a, ka), (b, kb));
        let mut m = Mutator::new(1);
        for kind in Mutation::ALL {
            let mut changed = false;
            for _ in 0..20 {
                let mut d = input.clone();
                m.apply(&mut d, kind);
                changed |= d != input;
            }
            assert!(changed, "{kind:?} never changed the input");
        }
        assert_eq!(digit_runs(b"a12b3"), vec![(1, 3), (4, 5)]);
    }
}
