//! SDXL over libtorch (work in progress).
