//! Print what a LoRA file holds (the library side of `lorakit lora inspect`).
//!
//! ```text
//! cargo run --example inspect_lora -- path/to/lora.safetensors
//! ```

use lorakit::core::{load_lora, LoraSummary, UnknownKeys};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: inspect_lora FILE.safetensors")?;
    let loaded = load_lora(&path, UnknownKeys::Report)?;
    print!("{}", LoraSummary::new(&loaded));
    // The normalised set can be used directly, whatever format the file was in:
    for (key, adapter) in loaded.set.iter().take(3) {
        println!(
            "{key}: rank {}, alpha {}, ΔW norm {:.4}",
            adapter.rank(),
            adapter.alpha(),
            adapter.delta_weight().norm().double_value(&[])
        );
    }
    Ok(())
}
