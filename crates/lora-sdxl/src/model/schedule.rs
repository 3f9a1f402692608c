//! SDXL's noise schedule: the DDPM scaled-linear schedule (β from 0.00085 to
//! 0.012, 1000 steps), optionally rescaled to zero terminal SNR
//! (kohya-format.md §8). Samplers derive their σs from it and the trainer its
//! noise, targets and loss weights (`train::schedule`).

/// Timesteps of the training schedule.
pub const NUM_TIMESTEPS: usize = 1000;

/// ᾱ_t of the schedule (host copy) and its device tables.
#[derive(Debug)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
    /// SNR of the *original* schedule (kohya computes min-SNR weights before any ztsnr rescale).
    snr: Vec<f64>,
}

impl NoiseSchedule {
    /// SDXL's DDPM schedule; `zero_terminal_snr` rescales it (Lin et al. 2023).
    pub fn sdxl(zero_terminal_snr: bool) -> Self {
        let (b0, b1) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let n = NUM_TIMESTEPS;
        let mut ac = Vec::with_capacity(n);
        let mut prod = 1.0;
        for i in 0..n {
            let b = b0 + (b1 - b0) * i as f64 / (n - 1) as f64;
            prod *= 1.0 - b * b;
            ac.push(prod);
        }
        let snr = ac.iter().map(|a| a / (1.0 - a)).collect();
        if zero_terminal_snr {
            let s: Vec<f64> = ac.iter().map(|a| a.sqrt()).collect();
            let (first, last) = (s[0], s[n - 1]);
            ac = s
                .iter()
                .map(|x| ((x - last) * first / (first - last)).powi(2))
                .collect();
        }
        Self {
            alphas_cumprod: ac,
            snr,
        }
    }
    /// ᾱ_t.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }
    /// SNR ᾱ_t / (1 − ᾱ_t) of the *original* schedule (before any
    /// zero-terminal-SNR rescale), as kohya's min-SNR weighting uses it.
    pub fn snr(&self) -> &[f64] {
        &self.snr
    }
}
