//! Unit tests of [`super`] (kept apart: the adapter file holds the maths).
use super::*;
use lora_testkit::Tolerance;

/// The sampling error of a 400-draw mean of rank dropout (seed 3), relative
/// to max |ΔW·x|: 2.9e-2 measured with 2 threads, 1 thread and ATen/MKL held
/// to AVX2 / no SIMD (torch's CPU generator draws the same masks on each);
/// its expected size is ≈ 1/√(3·400) of an element. Margin 6.5: without
/// the 1/(1 − p) rescale the mean is off by p = 0.25 (measured 0.25).
const DROPOUT_MEAN: Tolerance =
    Tolerance::new(3.0e-2, 6.5, "sampling error of 400 rank-dropout draws");

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn zero_up_leaves_base_unchanged() {
    let _rng = crate::test_rng_lock();
    tch::manual_seed(1);
    let a = LoraAdapter::new(
        8,
        6,
        4,
        Some(2.0),
        Geometry::Linear,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    let x = Tensor::randn([3, 5, 8], (Kind::Float, Device::Cpu));
    let base = Tensor::randn([3, 5, 6], (Kind::Float, Device::Cpu));
    let y = a.forward(&x, &base, true);
    // exact: a zero `up` makes the branch add exact zeros
    assert_eq!(max_abs(&y, &base), 0.0);
    // down is kaiming-uniform: bounded by 1/sqrt(in) and not all zero.
    let bound = 1.0 / 8f64.sqrt();
    assert!(a.down().unwrap().abs().max().double_value(&[]) <= bound);
    assert!(a.down().unwrap().abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn alpha_defaults_to_rank() {
    let _rng = crate::test_rng_lock();
    let d = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
    let u = Tensor::ones([5, 4], (Kind::Float, Device::Cpu));
    let a = LoraAdapter::from_weights(d.copy(), u.copy(), None).unwrap();
    assert_eq!(a.alpha(), 4.0);
    assert_eq!(a.scale(), 1.0);
    let a = LoraAdapter::from_weights(d, u, Some(0.0)).unwrap();
    assert_eq!(a.alpha(), 4.0);
}

#[test]
fn rank_mismatch_is_an_error() {
    let _rng = crate::test_rng_lock();
    let d = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
    let u = Tensor::ones([5, 2], (Kind::Float, Device::Cpu));
    let e = LoraAdapter::from_weights(d, u, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank mismatch"), "{e}");
}

/// Module dropout (issue 28, item 1): a dropped adapter is left out of a
/// training forward — no branch, so its tensors get no gradient and an
/// optimizer skips them, as kohya's — and never out of an evaluation.
#[test]
fn module_dropout_leaves_a_dropped_adapter_out_of_training_forwards() {
    let _rng = crate::test_rng_lock();
    tch::manual_seed(0);
    let mut a =
        LoraAdapter::new(4, 4, 2, None, Geometry::Linear, Kind::Float, Device::Cpu).unwrap();
    let (down, up) = (
        a.down().unwrap().copy().set_requires_grad(true),
        Tensor::ones([4, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true),
    );
    a.set_weights(down.shallow_clone(), up.shallow_clone())
        .unwrap();
    let d = Dropouts {
        module_dropout: 0.5,
        ..Default::default()
    };
    a.set_dropouts(d).unwrap();
    let x = Tensor::ones([1, 4], (Kind::Float, Device::Cpu));
    let switch = a.module_switch();
    // kept: the branch takes part and gets gradients
    switch.set_dropped(d.drops_module(0.75));
    let kept = a.delta(&x, true).unwrap();
    kept.sum(Kind::Float).backward();
    assert!(down.grad().defined() && up.grad().defined());
    // dropped: no branch at all in training (not a branch times 0)
    switch.set_dropped(d.drops_module(0.25));
    assert!(switch.is_dropped());
    assert!(a.delta(&x, true).is_none());
    let base = x.shallow_clone();
    assert!(a.forward(&x, &base, true).equal(&base));
    // never in evaluation, and the switch is shared by clones of the handle
    let eval = a.delta(&x, false).unwrap();
    assert!(eval.equal(&kept.detach()));
    a.module_switch().set_dropped(false);
    assert!(a.delta(&x, true).is_some());
}

#[test]
fn rank_dropout_keeps_expectation() {
    let _rng = crate::test_rng_lock();
    tch::manual_seed(3);
    let mut a =
        LoraAdapter::new(16, 8, 64, None, Geometry::Linear, Kind::Float, Device::Cpu).unwrap();
    a.set_weights(
        a.down().unwrap().copy(),
        Tensor::randn([8, 64], (Kind::Float, Device::Cpu)),
    )
    .unwrap();
    let x = Tensor::randn([1, 16], (Kind::Float, Device::Cpu));
    let exact = a.delta(&x, false).unwrap();
    a.set_dropouts(Dropouts {
        rank_dropout: 0.25,
        ..Default::default()
    })
    .unwrap();
    let n = 400;
    let mut acc = exact.zeros_like();
    for _ in 0..n {
        acc += a.delta(&x.repeat([1, 1]), true).unwrap();
    }
    let mean = acc / n as f64;
    let rel = max_abs(&mean, &exact) / exact.abs().max().double_value(&[]);
    DROPOUT_MEAN.check("rank dropout: mean of 400 draws vs eval", rel);
    assert!(Dropouts {
        dropout: 1.0,
        ..Default::default()
    }
    .validate()
    .is_err());
}
