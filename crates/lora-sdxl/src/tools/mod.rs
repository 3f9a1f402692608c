//! **The tools room**: offline operations on checkpoints and LoRA files.
//!
//! | concept | file |
//! |---|---|
//! | baking LoRAs into a checkpoint (kohya's `sdxl_merge_lora`) | [`merge`] |
//! | a LoRA from a fine-tune and its base (kohya's `extract_lora_from_models`) | [`extract`] |

pub mod extract;
pub mod merge;
