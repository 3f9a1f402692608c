//! Samplers over the σ (variance-exploding) parametrisation, the way
//! ComfyUI's KSampler and k-diffusion run SDXL-family models.
//!
//! * σ_t = √((1 − ᾱ_t)/ᾱ_t) over the 1000 training timesteps; the model is
//!   called at the *nearest* integer timestep of a σ (ComfyUI's
//!   `ModelSamplingDiscrete.timestep`), with its input scaled by 1/√(σ²+1).
//! * σ schedules: `normal` (timesteps evenly spaced from 999 to 0, σ
//!   interpolated in log space, then 0) and `karras` (ρ = 7).
//! * Samplers: `euler`, `euler_ancestral` (η = 1), `dpmpp_2m` — exactly
//!   k-diffusion's update rules — and `ddim` (η = 0, diffusers' DDIMScheduler
//!   with SDXL's "leading" spacing and `steps_offset = 1`).
//!
//! A *denoiser* maps `(x, σ)` to the predicted clean latent; classifier-free
//! guidance is applied inside it (see [`crate::sample::txt2img`]).

use crate::model::schedule::{NoiseSchedule, NUM_TIMESTEPS};
use std::fmt;
use std::str::FromStr;
use tch::Tensor;

/// Sampler algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    /// Euler (first-order ODE), k-diffusion `sample_euler`.
    Euler,
    /// Euler ancestral (η = 1), k-diffusion `sample_euler_ancestral`.
    EulerAncestral,
    /// DPM-Solver++(2M), k-diffusion `sample_dpmpp_2m`.
    Dpmpp2m,
    /// DDIM (η = 0), diffusers `DDIMScheduler`.
    Ddim,
}

/// σ spacing of a sampler run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSchedule {
    /// ComfyUI's / k-diffusion's `normal`: timesteps linear from 999 to 0.
    Normal,
    /// Karras et al. (ρ = 7) between the model's σ_min and σ_max.
    Karras,
}

/// A sampler with its σ schedule, as written in job files and on the
/// command line: `euler`, `euler_ancestral`, `dpmpp_2m`, `dpmpp_2m_karras`,
/// `ddim` (any `_karras` suffix selects Karras σs; `euler_a` is accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerSpec {
    /// Algorithm.
    pub sampler: Sampler,
    /// σ schedule (ignored by `ddim`, which uses its own timesteps).
    pub schedule: SigmaSchedule,
}

impl Default for SamplerSpec {
    fn default() -> Self {
        Self {
            sampler: Sampler::Euler,
            schedule: SigmaSchedule::Normal,
        }
    }
}

/// The sampler names [`SamplerSpec`] accepts.
pub const SAMPLER_NAMES: &[&str] = &[
    "euler",
    "euler_karras",
    "euler_ancestral",
    "euler_ancestral_karras",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "ddim",
];

impl FromStr for SamplerSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let (base, schedule) = match lower.strip_suffix("_karras") {
            Some(b) => (b, SigmaSchedule::Karras),
            None => (lower.as_str(), SigmaSchedule::Normal),
        };
        let sampler = match base {
            "euler" => Sampler::Euler,
            "euler_ancestral" | "euler_a" => Sampler::EulerAncestral,
            "dpmpp_2m" | "dpm++_2m" => Sampler::Dpmpp2m,
            "ddim" if schedule == SigmaSchedule::Normal => Sampler::Ddim,
            _ => {
                return Err(format!(
                    "unknown sampler `{s}`; use one of: {}",
                    SAMPLER_NAMES.join(", ")
                ))
            }
        };
        Ok(Self { sampler, schedule })
    }
}

impl fmt::Display for SamplerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = match self.sampler {
            Sampler::Euler => "euler",
            Sampler::EulerAncestral => "euler_ancestral",
            Sampler::Dpmpp2m => "dpmpp_2m",
            Sampler::Ddim => "ddim",
        };
        match (self.sampler, self.schedule) {
            (Sampler::Ddim, _) | (_, SigmaSchedule::Normal) => write!(f, "{base}"),
            (_, SigmaSchedule::Karras) => write!(f, "{base}_karras"),
        }
    }
}

impl SamplerSpec {
    /// The A1111 names (`Sampler: …`, `Schedule type: …`) of this spec.
    pub fn a1111_names(&self) -> (&'static str, &'static str) {
        let name = match self.sampler {
            Sampler::Euler => "Euler",
            Sampler::EulerAncestral => "Euler a",
            Sampler::Dpmpp2m => "DPM++ 2M",
            Sampler::Ddim => "DDIM",
        };
        let schedule = match (self.sampler, self.schedule) {
            (Sampler::Ddim, _) => "Automatic",
            (_, SigmaSchedule::Normal) => "Normal",
            (_, SigmaSchedule::Karras) => "Karras",
        };
        (name, schedule)
    }
}

/// The model's discrete σ table (ComfyUI `ModelSamplingDiscrete`).
#[derive(Debug, Clone)]
pub struct ModelSigmas {
    alphas_cumprod: Vec<f64>,
    log_sigmas: Vec<f64>,
}

impl ModelSigmas {
    /// σs of a training schedule. With zero terminal SNR the last ᾱ (0) is
    /// replaced by 4.8973451890853435e-08 as ComfyUI does, so σ_max is finite.
    pub fn new(schedule: &NoiseSchedule) -> Self {
        let mut ac = schedule.alphas_cumprod().to_vec();
        if let Some(last) = ac.last_mut() {
            if *last <= 0.0 {
                *last = 4.897_345_189_085_343_5e-8;
            }
        }
        let log_sigmas = ac.iter().map(|a| ((1.0 - a) / a).sqrt().ln()).collect();
        Self {
            alphas_cumprod: ac,
            log_sigmas,
        }
    }
    /// σ_min (timestep 0).
    pub fn sigma_min(&self) -> f64 {
        self.log_sigmas[0].exp()
    }
    /// σ_max (timestep 999).
    pub fn sigma_max(&self) -> f64 {
        self.log_sigmas[NUM_TIMESTEPS - 1].exp()
    }
    /// ᾱ at an integer timestep.
    pub fn alpha_cumprod(&self, t: usize) -> f64 {
        self.alphas_cumprod[t]
    }
    /// The nearest timestep of σ (in log space), as the model is called with.
    pub fn timestep(&self, sigma: f64) -> usize {
        let l = sigma.ln();
        let mut best = 0;
        for (i, ls) in self.log_sigmas.iter().enumerate() {
            if (l - ls).abs() < (l - self.log_sigmas[best]).abs() {
                best = i;
            }
        }
        best
    }
    /// σ at a fractional timestep (log-linear interpolation).
    pub fn sigma(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, (NUM_TIMESTEPS - 1) as f64);
        let (lo, hi) = (t.floor() as usize, t.ceil() as usize);
        let w = t - lo as f64;
        ((1.0 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
    }
    /// `steps` σs of a schedule followed by 0.
    pub fn sigmas(&self, schedule: SigmaSchedule, steps: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(steps + 1);
        match schedule {
            SigmaSchedule::Normal => {
                let start = self.timestep(self.sigma_max()) as f64;
                let end = self.timestep(self.sigma_min()) as f64;
                for i in 0..steps {
                    let t = if steps == 1 {
                        start
                    } else {
                        start + (end - start) * i as f64 / (steps - 1) as f64
                    };
                    out.push(self.sigma(t));
                }
            }
            SigmaSchedule::Karras => {
                let rho = 7.0;
                let (min_inv, max_inv) = (
                    self.sigma_min().powf(1.0 / rho),
                    self.sigma_max().powf(1.0 / rho),
                );
                for i in 0..steps {
                    let ramp = if steps == 1 {
                        0.0
                    } else {
                        i as f64 / (steps - 1) as f64
                    };
                    out.push((max_inv + ramp * (min_inv - max_inv)).powf(rho));
                }
            }
        }
        out.push(0.0);
        out
    }
    /// DDIM's timesteps for `steps` steps: "leading" spacing with
    /// `steps_offset = 1` (SDXL's scheduler config), high to low.
    pub fn ddim_timesteps(&self, steps: usize) -> Vec<usize> {
        let ratio = NUM_TIMESTEPS / steps.max(1);
        (0..steps).rev().map(|i| i * ratio + 1).collect()
    }
}

/// Ancestral step sizes: `(σ_down, σ_up)` for η.
pub fn ancestral_step(sigma_from: f64, sigma_to: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 || sigma_to == 0.0 {
        return (sigma_to, 0.0);
    }
    let up = (eta
        * (sigma_to.powi(2) * (sigma_from.powi(2) - sigma_to.powi(2)) / sigma_from.powi(2)).sqrt())
    .min(sigma_to);
    ((sigma_to.powi(2) - up.powi(2)).sqrt(), up)
}

/// Runs a σ-space sampler from `x` (already at σ₀: noise × √(1+σ₀²) for a
/// full denoise, as ComfyUI scales it). `denoise(x, σ)` returns the predicted
/// clean latent; `noise()` draws the ancestral noise (ComfyUI: a CPU
/// generator seeded with the seed); `on_step(i)` is called after step `i`.
pub fn sample_sigmas(
    sampler: Sampler,
    sigmas: &[f64],
    mut x: Tensor,
    denoise: &mut dyn FnMut(&Tensor, f64) -> Tensor,
    noise: &mut dyn FnMut() -> Tensor,
    on_step: &mut dyn FnMut(usize),
) -> Tensor {
    let mut old_denoised: Option<Tensor> = None;
    let steps = sigmas.len().saturating_sub(1);
    for i in 0..steps {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = denoise(&x, s);
        x = match sampler {
            // DDIM is Euler in σ space; `sample_ddim` gives diffusers' timesteps.
            Sampler::Euler | Sampler::Ddim => {
                let d = (&x - &denoised) / s;
                &x + d * (s_next - s)
            }
            Sampler::EulerAncestral => {
                let (down, up) = ancestral_step(s, s_next, 1.0);
                let d = (&x - &denoised) / s;
                let mut nx = &x + d * (down - s);
                if s_next > 0.0 {
                    nx += noise() * up;
                }
                nx
            }
            Sampler::Dpmpp2m => {
                let t = -s.ln();
                let t_next = -s_next.ln();
                let h = t_next - t;
                let ratio = s_next / s;
                let coef = -(-h).exp_m1();
                let d = match (&old_denoised, s_next == 0.0) {
                    (Some(old), false) => {
                        let h_last = t + sigmas[i - 1].ln();
                        let r = h_last / h;
                        &denoised * (1.0 + 1.0 / (2.0 * r)) - old * (1.0 / (2.0 * r))
                    }
                    _ => denoised.shallow_clone(),
                };
                x * ratio + d * coef
            }
        };
        old_denoised = Some(denoised);
        on_step(i);
    }
    x
}

/// DDIM (η = 0) in the variance-preserving form of diffusers'
/// `DDIMScheduler` with SDXL's scheduler config (`set_alpha_to_one = false`):
/// starts from pure noise `x` (init σ = 1), `model(x, t)` returns the *raw*
/// model output (ε or v, with guidance applied); the last step lands on ᾱ₀
/// (σ ≈ 0.029), as diffusers' SDXL pipelines do.
pub fn sample_ddim(
    sigmas: &ModelSigmas,
    steps: usize,
    v_prediction: bool,
    mut x: Tensor,
    model: &mut dyn FnMut(&Tensor, usize) -> Tensor,
    on_step: &mut dyn FnMut(usize),
) -> Tensor {
    let ts = sigmas.ddim_timesteps(steps);
    let ratio = NUM_TIMESTEPS / steps.max(1);
    for (i, &t) in ts.iter().enumerate() {
        let a = sigmas.alpha_cumprod(t);
        let a_prev = if t >= ratio {
            sigmas.alpha_cumprod(t - ratio)
        } else {
            sigmas.alpha_cumprod(0)
        };
        let out = model(&x, t);
        let (x0, eps) = if v_prediction {
            let x0 = &x * a.sqrt() - &out * (1.0 - a).sqrt();
            let eps = &out * a.sqrt() + &x * (1.0 - a).sqrt();
            (x0, eps)
        } else {
            let x0 = (&x - &out * (1.0 - a).sqrt()) / a.sqrt();
            (x0, out)
        };
        x = x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt();
        on_step(i);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_testkit::Tolerance;

    /// Our σ range (f64 in Rust, no BLAS: the same in every configuration,
    /// libms at most an ulp apart) against ComfyUI's, which keeps its σs in
    /// fp32 (the literals below): 7.7e-7 apart at σ_max, 1.6e-7 at σ_min.
    /// Margin 12.8 (the old limit).
    const COMFYUI: Tolerance = Tolerance::new(
        7.8e-7,
        12.8,
        "our f64 σ range vs ComfyUI's fp32 one: 7.7e-7 measured",
    );

    /// Karras' ends: σ^(1/ρ) raised to ρ = 7 again, each power within an
    /// ulp, so within 8 ulps of σ_max (< 16): 64 × f64::EPSILON; measured 1
    /// ulp at σ_max, 2 at σ_min. Margin 70 000 keeps the old limit of 1e-9.
    const KARRAS_ENDS: Tolerance = Tolerance::new(
        64.0 * f64::EPSILON,
        70_000.0,
        "f64 rounding of (σ^(1/7))^7: 8 ulps of σ_max",
    );

    /// σ_down² + σ_up² − 1 from squares, a difference and square roots of
    /// values near 1 (IEEE-exact operations, no libm): a few f64 roundings,
    /// 4 × f64::EPSILON; measured 0. Margin 1100 keeps the old limit of 1e-12.
    const VARIANCE: Tolerance = Tolerance::new(
        4.0 * f64::EPSILON,
        1100.0,
        "f64 rounding of σ_down² + σ_up² near 1 (0 measured)",
    );

    #[test]
    fn parses_and_prints_names() {
        for n in SAMPLER_NAMES {
            let s: SamplerSpec = n.parse().unwrap();
            assert_eq!(&s.to_string(), n);
        }
        assert_eq!(
            "euler_a".parse::<SamplerSpec>().unwrap().sampler,
            Sampler::EulerAncestral
        );
        let e = "heun".parse::<SamplerSpec>().unwrap_err();
        assert!(e.contains("heun") && e.contains("dpmpp_2m_karras"), "{e}");
        assert!("ddim_karras".parse::<SamplerSpec>().is_err());
    }

    #[test]
    fn sigma_tables_match_comfyui() {
        let s = ModelSigmas::new(&NoiseSchedule::sdxl(false));
        // ComfyUI's SDXL σ range.
        COMFYUI.check("σ_min: |Δ|", (s.sigma_min() - 0.029167).abs());
        COMFYUI.check("σ_max: |Δ|", (s.sigma_max() - 14.614642).abs());
        let n = s.sigmas(SigmaSchedule::Normal, 4);
        assert_eq!(n.len(), 5);
        // the ends sit on timesteps 999 and 0, whose σs are these very values
        assert_eq!(n[0], s.sigma_max());
        assert_eq!(n[3], s.sigma_min());
        assert_eq!(n[4], 0.0);
        assert_eq!(s.timestep(n[1]), 666);
        let k = s.sigmas(SigmaSchedule::Karras, 3);
        KARRAS_ENDS.check("Karras σ_max: |Δ|", (k[0] - s.sigma_max()).abs());
        KARRAS_ENDS.check("Karras σ_min: |Δ|", (k[2] - s.sigma_min()).abs());
        assert_eq!(s.ddim_timesteps(4), vec![751, 501, 251, 1]);
        let z = ModelSigmas::new(&NoiseSchedule::sdxl(true));
        assert!(z.sigma_max().is_finite() && z.sigma_max() > 4000.0);
    }

    #[test]
    fn ancestral_step_conserves_variance() {
        let (down, up) = ancestral_step(2.0, 1.0, 1.0);
        VARIANCE.check("|σ_down² + σ_up² − 1|", (down * down + up * up - 1.0).abs());
        assert_eq!(ancestral_step(2.0, 0.0, 1.0), (0.0, 0.0));
    }
}
