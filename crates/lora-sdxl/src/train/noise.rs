//! The training noise: plain Gaussian, plus one of kohya's noise options —
//! the offset (`noise_offset`, a per-channel constant) or multi-resolution
//! "pyramid" noise (`multires_noise_iterations` / `multires_noise_discount`,
//! kohya's `pyramid_noise_like`) — and input perturbation
//! (`ip_noise_gamma`), which noises the input with extra noise that the
//! target does not contain.

use super::job::TrainSection;
use rand::Rng;
use tch::{Kind, Tensor};

/// The noise for latents `x0` `[B, C, H, W]` (torch's generator, seeded by
/// the caller; `rng` draws the pyramid's scale factors).
pub fn training_noise(train: &TrainSection, x0: &Tensor, rng: &mut impl Rng) -> Tensor {
    let noise = x0.randn_like();
    let (b, c) = (x0.size()[0], x0.size()[1]);
    if train.noise_offset > 0.0 {
        noise + Tensor::randn([b, c, 1, 1], (Kind::Float, x0.device())) * train.noise_offset
    } else if train.multires_noise_iterations > 0 {
        let factors: Vec<f64> = (0..train.multires_noise_iterations)
            .map(|_| rng.gen::<f64>() * 2.0 + 2.0)
            .collect();
        multires_noise(
            &noise,
            train.multires_noise_discount,
            &factors,
            &mut |shape| Tensor::randn(shape, (Kind::Float, x0.device())),
        )
    } else {
        noise
    }
}

/// kohya's `pyramid_noise_like`: for level `i` with scale factor `r = factors[i]`
/// (drawn from [2, 4)), noise of size `⌊H/rⁱ⌋ × ⌊W/rⁱ⌋` (at least 1) is
/// upsampled bilinearly to the full size and added with weight `discountⁱ`,
/// stopping after the first level that reaches a side of 1; the sum is
/// divided by its standard deviation. `draw` gives the low-resolution noise.
pub fn multires_noise(
    noise: &Tensor,
    discount: f64,
    factors: &[f64],
    draw: &mut dyn FnMut(&[i64]) -> Tensor,
) -> Tensor {
    let s = noise.size();
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    let mut out = noise.copy();
    for (i, r) in factors.iter().enumerate() {
        let scale = r.powi(i as i32);
        let (hn, wn) = (
            ((h as f64 / scale) as i64).max(1),
            ((w as f64 / scale) as i64).max(1),
        );
        let low = draw(&[b, c, hn, wn]).to_device(noise.device());
        let up = low.upsample_bilinear2d([h, w], false, None, None);
        out += up * discount.powi(i as i32);
        if hn == 1 || wn == 1 {
            break;
        }
    }
    &out / out.std(true)
}

/// The noise the input is noised with: `noise + γ·ε'` with kohya's
/// `ip_noise_gamma` (γ drawn from [0, γ) per step with
/// `ip_noise_gamma_random_strength`); `noise` itself when γ is 0. The
/// training target keeps `noise`.
pub fn input_noise(train: &TrainSection, noise: &Tensor) -> Tensor {
    if train.ip_noise_gamma <= 0.0 {
        return noise.shallow_clone();
    }
    let extra = noise.randn_like();
    if train.ip_noise_gamma_random_strength {
        let strength = Tensor::rand([1], (Kind::Float, noise.device())) * train.ip_noise_gamma;
        noise + extra * strength
    } else {
        noise + extra * train.ip_noise_gamma
    }
}
