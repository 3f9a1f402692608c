//! Test support for the lorakit crates (a dev-dependency only; not published).
//!
//! # Tolerances
//!
//! Float results differ in their last bits between machines: libtorch, MKL and
//! oneDNN pick their kernels (and so their reduction orders) by CPU, and a
//! result that passes through many steps amplifies those bits. A test that
//! compares floats therefore does one of two things:
//!
//! * it compares quantities that are **bit-exact by construction** (the same
//!   operations on the same inputs in one process, a copy, an integer count):
//!   then it says so and uses `assert_eq!`;
//! * or it bounds the difference by a [`Tolerance`]: a **noise floor that was
//!   measured** (the same computation in fp64, with 1 vs 2 threads, or with
//!   the BLAS and ATen held to AVX2 — see `scripts/tolerance-report.sh`) times
//!   a **margin of at least 4**, and a sentence saying where the floor comes
//!   from.
//!
//! Every check prints one line to standard error, which the test harness
//! shows with `--nocapture` and `scripts/tolerance-report.sh` collects:
//!
//! ```text
//! tolerance | prodigy: relative error | 1.27e-6 | limit 1.60e-5 = 4.0e-6 × 4 | 8% | fp32 vs fp64 replay
//! ```
//!
//! ```
//! use lora_testkit::Tolerance;
//! /// fp32 vs fp64 of the same sum: 3.1e-7 on AVX-512 and on AVX2.
//! const SUM: Tolerance = Tolerance::new(4e-7, 4.0, "fp32 vs fp64 of the same sum");
//! SUM.check("sum of squares", 2.5e-7);
//! ```

use std::fmt::Display;

/// The margin below which a tolerance is a guess at the edge of one run.
pub const MIN_MARGIN: f64 = 4.0;

/// An upper bound on a float difference: a measured noise `floor` times a
/// `margin` (≥ [`MIN_MARGIN`]), with the `source` of the floor.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    floor: f64,
    margin: f64,
    source: &'static str,
}

impl Tolerance {
    /// A tolerance of `floor × margin`. Panics (at compile time in a
    /// `const`) when the margin is under [`MIN_MARGIN`] or the floor is not
    /// positive.
    pub const fn new(floor: f64, margin: f64, source: &'static str) -> Self {
        assert!(floor > 0.0, "a noise floor is positive");
        assert!(margin >= MIN_MARGIN, "a margin is at least 4");
        Self {
            floor,
            margin,
            source,
        }
    }

    /// The same margin and source over a floor measured at run time (e.g. the
    /// same computation in fp64), never below `at_least` — a floor that
    /// happens to be tiny in one run must not make the bound a hair trigger.
    pub fn with_floor(self, measured: f64, at_least: f64) -> Self {
        let floor = if measured.is_finite() {
            measured.max(at_least)
        } else {
            measured
        };
        Self { floor, ..self }
    }

    /// `floor × margin`.
    pub fn limit(&self) -> f64 {
        self.floor * self.margin
    }

    /// The noise floor this tolerance was derived from.
    pub fn floor(&self) -> f64 {
        self.floor
    }

    /// Asserts `measured ≤ limit` (a NaN fails) and reports the measurement
    /// on standard error, so a run with `--nocapture` shows how much of the
    /// limit each check uses.
    #[track_caller]
    pub fn check(&self, what: impl Display, measured: f64) {
        let limit = self.limit();
        eprintln!(
            "tolerance | {what} | {measured:.3e} | limit {limit:.2e} = {:.2e} × {} | {:.0}% | {}",
            self.floor,
            self.margin,
            100.0 * measured / limit,
            self.source
        );
        assert!(
            measured <= limit,
            "{what}: {measured:.3e} is over the tolerance {limit:.2e} ({:.2e} × {}: {})",
            self.floor,
            self.margin,
            self.source
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Tolerance = Tolerance::new(1e-6, 4.0, "test");

    #[test]
    fn a_measurement_under_the_limit_passes() {
        T.check("ok", 3.9e-6);
        assert_eq!(T.limit(), 4e-6);
    }

    #[test]
    #[should_panic(expected = "over the tolerance")]
    fn a_measurement_over_the_limit_fails() {
        T.check("too far", 4.1e-6);
    }

    #[test]
    #[should_panic(expected = "over the tolerance")]
    fn nan_fails() {
        T.check("nan", f64::NAN);
    }

    #[test]
    fn a_runtime_floor_is_kept_above_its_minimum() {
        assert_eq!(T.with_floor(1e-9, 1e-7).limit(), 4e-7);
        assert_eq!(T.with_floor(2e-6, 1e-7).limit(), 8e-6);
        assert!(T.with_floor(f64::NAN, 1e-7).limit().is_nan());
    }

    #[test]
    #[should_panic(expected = "margin")]
    fn a_margin_under_four_is_refused() {
        let _ = Tolerance::new(1e-6, 2.0, "edge");
    }
}
