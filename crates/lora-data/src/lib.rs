//! Datasets for LoRA training (work in progress: see the project issues).
