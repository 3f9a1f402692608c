//! **The sampling room**: making images with a model and its LoRAs.
//!
//! | concept | file |
//! |---|---|
//! | samplers (euler, euler_ancestral, dpmpp_2m, ddim) and σ schedules | [`samplers`] |
//! | text-to-image: seeded noise, CFG, VAE decode | [`txt2img`] |
//! | prompts × checkpoints / strengths grids, PNG parameters | [`grid`] |

pub mod grid;
pub mod samplers;
pub mod txt2img;

pub use samplers::{SamplerSpec, SAMPLER_NAMES};
