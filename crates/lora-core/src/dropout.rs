//! kohya's training-only dropouts on an adapter, and what a trainer tells
//! its adapters about the step being trained:
//!
//! * **module dropout** is drawn by the caller, once per adapter per
//!   forward (kohya draws `torch.rand(1)` on the host), and set on the
//!   adapter's [`ModuleSwitch`]. A dropped adapter is left out of the
//!   forward: the layer returns its base output, the adapter's tensors are
//!   not in the graph and get no gradient, so every optimizer skips them
//!   (kohya clears gradients with `set_to_none`: a dropped module is not
//!   moved by momentum or weight decay, and its step count does not
//!   advance). A host draw needs no device sync, and the trainer, which
//!   draws it, knows which modules the optimizer must freeze.
//! * **neuron and rank dropout** masks are drawn on the device for the
//!   *global* batch and sliced to this process's rows ([`BatchRows`]), so
//!   the ranks of a data-parallel run apply the masks one process with the
//!   whole batch would (issue 28, item 10).

use crate::error::{LoraError, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// Training-only regularisation with kohya's semantics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Dropouts {
    /// Neuron dropout on the rank activations (`--network_dropout`), inverted.
    pub dropout: f64,
    /// Drops whole rank channels per sample; scale is divided by `1 − p`.
    pub rank_dropout: f64,
    /// Leaves the whole adapter out of a training forward with probability
    /// `p`: see [`Dropouts::drops_module`] and [`ModuleSwitch`].
    pub module_dropout: f64,
}

impl Dropouts {
    /// Validates that every rate is in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("dropout", self.dropout),
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(LoraError::Invalid(format!(
                    "{name} must be in [0, 1), got {p}"
                )));
            }
        }
        Ok(())
    }

    /// Module dropout's choice for one forward given the caller's uniform
    /// draw `u` in `[0, 1)` (kohya: `torch.rand(1) < module_dropout`).
    pub fn drops_module(&self, u: f64) -> bool {
        u < self.module_dropout
    }
}

/// Whether module dropout leaves an adapter out of the current training
/// forward. A handle: clones share the switch, so a trainer keeps one per
/// adapter while the adapters sit inside a model.
///
/// ```
/// use lora_core::{Dropouts, Geometry, LoraAdapter};
/// use tch::{Device, Kind, Tensor};
/// let mut a = LoraAdapter::new(4, 4, 2, None, Geometry::Linear, Kind::Float, Device::Cpu)?;
/// let d = Dropouts { module_dropout: 0.5, ..Default::default() };
/// a.set_dropouts(d)?;
/// let switch = a.module_switch();
/// switch.set_dropped(d.drops_module(0.25)); // the caller's draw, per forward
/// let x = Tensor::ones([1, 4], (Kind::Float, Device::Cpu));
/// assert!(a.delta(&x, true).is_none()); // left out of training
/// assert!(a.delta(&x, false).is_some()); // never in evaluation
/// # Ok::<(), lora_core::LoraError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ModuleSwitch(Arc<AtomicBool>);

impl ModuleSwitch {
    /// Drops (or restores) the adapter for the training forwards to come.
    pub fn set_dropped(&self, dropped: bool) {
        self.0.store(dropped, Ordering::Relaxed);
    }
    /// Whether training forwards leave the adapter out.
    pub fn is_dropped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Which rows of the global batch a process holds (data-parallel
/// training). A handle shared by a run's adapters: the trainer sets it
/// before each forward. A fresh one says "the whole batch is local".
///
/// A forward's tensors may hold several rows per sample (e.g. a caption's
/// text-encoder chunks, one after the other for each sample): the rows of
/// sample `i` are then `k·i .. k·(i + 1)`, where `k` is the tensor's rows
/// over the local samples.
#[derive(Debug, Clone, Default)]
pub struct BatchRows(Arc<[AtomicUsize; 3]>);

impl BatchRows {
    /// This process holds samples `start .. start + len` of `total`
    /// (`len = total`, `start = 0`: the whole batch).
    pub fn set(&self, start: usize, len: usize, total: usize) {
        for (slot, v) in self.0.iter().zip([start, len, total]) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    /// For a local tensor of `rows` rows: the global tensor's rows and
    /// where the local ones start in it. The whole batch when unset, or
    /// when `rows` is not a whole number of rows per local sample.
    fn window(&self, rows: i64) -> (i64, i64) {
        let [start, len, total] = [0, 1, 2].map(|i| self.0[i].load(Ordering::Relaxed) as i64);
        if len == 0 || total <= len || rows % len != 0 {
            return (rows, 0);
        }
        let k = rows / len;
        (total * k, start * k)
    }
}

/// A 0/1 keep mask in `kind` shaped like `local` but for dim 0, which is
/// `local[0]` rows of the global batch that `rows` places: drawn for every
/// global row (keep where `rand > p`, as kohya's rank dropout) and sliced,
/// so each process keeps what one process with the whole batch keeps.
pub(crate) fn keep_mask(
    local: &[i64],
    p: f64,
    rows: Option<&BatchRows>,
    kind: Kind,
    device: tch::Device,
) -> Tensor {
    let (global, offset) = rows.map_or((local[0], 0), |r| r.window(local[0]));
    let mut shape = local.to_vec();
    shape[0] = global;
    let mask = Tensor::rand(shape.as_slice(), (kind, device))
        .gt(p)
        .to_kind(kind);
    if global == local[0] {
        mask
    } else {
        mask.narrow(0, offset, local[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The ranks' masks are the rows of one process's mask: chunks of the
    /// same global draw.
    #[test]
    fn masks_of_the_ranks_are_rows_of_the_global_mask() {
        let _rng = crate::test_rng_lock();
        let opts = (Kind::Float, Device::Cpu);
        tch::manual_seed(5);
        let whole = keep_mask(&[6, 8], 0.5, None, opts.0, opts.1);
        let rows = BatchRows::default();
        for (rank, (start, len)) in [(0, 3), (3, 3)].into_iter().enumerate() {
            rows.set(start, len, 6);
            tch::manual_seed(5);
            let part = keep_mask(&[len as i64, 8], 0.5, Some(&rows), opts.0, opts.1);
            assert!(
                part.equal(&whole.narrow(0, start as i64, len as i64)),
                "rank {rank}"
            );
            // two rows per sample (text-encoder chunks)
            tch::manual_seed(5);
            let chunks = keep_mask(&[2 * len as i64, 8], 0.5, Some(&rows), opts.0, opts.1);
            tch::manual_seed(5);
            let whole2 = keep_mask(&[12, 8], 0.5, None, opts.0, opts.1);
            assert!(chunks.equal(&whole2.narrow(0, 2 * start as i64, 2 * len as i64)));
        }
        // unset: the whole batch is local
        tch::manual_seed(5);
        let local = keep_mask(&[6, 8], 0.5, Some(&BatchRows::default()), opts.0, opts.1);
        assert!(local.equal(&whole));
        let kept = whole.sum(Kind::Float).double_value(&[]);
        assert!((8.0..40.0).contains(&kept), "kept {kept} of 48 at p = 0.5");
    }

    #[test]
    fn module_draws_follow_the_rate() {
        let d = Dropouts {
            module_dropout: 0.25,
            ..Default::default()
        };
        assert!(d.drops_module(0.0) && d.drops_module(0.2499));
        assert!(!d.drops_module(0.25) && !d.drops_module(0.99));
        assert!(!Dropouts::default().drops_module(0.0));
    }
}
