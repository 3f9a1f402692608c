//! Merging equals the adapted forward pass for Linear, 1x1 conv and strided 3x3 conv.

use lora_core::{Geometry, LoraAdapter};
use lora_testkit::Tolerance;
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

// Floors measured on an AMD EPYC (AVX-512) with 2 threads, 1 thread
// (OMP_NUM_THREADS=1) and MKL, oneDNN and ATen held to AVX2 / no SIMD
// (MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
// ATEN_CPU_CAPABILITY=default), and against the same outputs in fp64.

/// The merged weight's output against the adapted forward, |y| ≤ 16 (an
/// fp32 ulp there is 1.9e-6): 3.8e-6 measured (2 and 1 threads), 1.9e-6
/// (AVX2-limited). Against fp64 each of the two is off by up to 2.5e-6, so
/// they may differ by 5.0e-6: the floor. Margin 4 (the bound was 1e-5, 2.6
/// × this machine's figure).
const LINEAR: Tolerance = Tolerance::new(5.0e-6, 4.0, "two fp32 outputs, each vs fp64");
/// Unmerging the merged weight, |W| < 4 (an fp32 ulp there is 2.4e-7): the
/// merge and the unmerge each round by half an ulp, so the floor is one
/// ulp; 1.2e-7 measured (2 and 1 threads), 6.0e-8 (AVX2-limited). Margin 4.
const UNMERGE: Tolerance =
    Tolerance::new(2.0 * f32::EPSILON as f64, 4.0, "one fp32 ulp of |W| < 4");
/// The convolution with the merged weight against the adapted forward,
/// |y| ≤ 25: 5.7e-6 measured (2 and 1 threads), 4.8e-6 (AVX2-limited).
/// Against fp64 each of the two is off by up to 5.0e-6, so they may differ
/// by 9.6e-6: the floor. Margin 10.
const CONV: Tolerance = Tolerance::new(9.6e-6, 10.0, "two fp32 outputs, each vs fp64");

fn trained(mut a: LoraAdapter) -> LoraAdapter {
    // A non-zero up, as after training.
    let up = Tensor::randn(a.up().unwrap().size().as_slice(), CPU) * 0.1;
    a.set_weights(a.down().unwrap().copy(), up).unwrap();
    a
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn merge_equals_forward_linear() {
    tch::manual_seed(11);
    let w = Tensor::randn([24, 16], CPU);
    let b = Tensor::randn([24], CPU);
    let mut a = trained(
        LoraAdapter::new(
            16,
            24,
            4,
            Some(2.0),
            Geometry::Linear,
            Kind::Float,
            Device::Cpu,
        )
        .unwrap(),
    );
    a.set_multiplier(0.8);
    let x = Tensor::randn([2, 7, 16], CPU);
    let base = x.linear(&w, Some(&b));
    let adapted = a.forward(&x, &base, false);
    assert!(
        max_abs(&adapted, &base) > 1e-3,
        "adapter must change the output"
    );
    let merged = a.merged_weight(&w, 0.8).unwrap();
    let y = x.linear(&merged, Some(&b));
    LINEAR.check("linear: merged vs forward", max_abs(&y, &adapted));
    let back = a.unmerged_weight(&merged, 0.8).unwrap();
    UNMERGE.check("linear: unmerged vs base weight", max_abs(&back, &w));
}

fn conv_case(kernel: i64, stride: i64, padding: i64) {
    tch::manual_seed(12);
    let (cin, cout) = (6, 10);
    let w = Tensor::randn([cout, cin, kernel, kernel], CPU);
    let mut a = trained(
        LoraAdapter::new(
            cin,
            cout,
            3,
            Some(1.5),
            Geometry::Conv2d {
                kernel: [kernel, kernel],
                stride: [stride, stride],
                padding: [padding, padding],
                dilation: [1, 1],
            },
            Kind::Float,
            Device::Cpu,
        )
        .unwrap(),
    );
    a.set_multiplier(1.0);
    assert_eq!(a.down().unwrap().size(), vec![3, cin, kernel, kernel]);
    assert_eq!(a.up().unwrap().size(), vec![cout, 3, 1, 1]);
    let x = Tensor::randn([2, cin, 9, 9], CPU);
    let conv =
        |w: &Tensor| x.conv2d::<&Tensor>(w, None, [stride, stride], [padding, padding], [1, 1], 1);
    let base = conv(&w);
    let adapted = a.forward(&x, &base, false);
    assert!(
        max_abs(&adapted, &base) > 1e-3,
        "adapter must change the output"
    );
    let merged = a.merged_weight(&w, 1.0).unwrap();
    let d = max_abs(&conv(&merged), &adapted);
    CONV.check(
        format!("conv {kernel}x{kernel} stride {stride}: merged vs forward"),
        d,
    );
}

#[test]
fn merge_equals_forward_conv1x1() {
    conv_case(1, 1, 0);
}

#[test]
fn merge_equals_forward_conv3x3() {
    conv_case(3, 1, 1);
}

#[test]
fn merge_equals_forward_conv3x3_strided() {
    conv_case(3, 2, 1);
}

#[test]
fn merge_in_half_precision_computes_in_fp32() {
    tch::manual_seed(13);
    let w = Tensor::randn([8, 8], CPU).to_kind(Kind::Half);
    let a = trained(
        LoraAdapter::new(8, 8, 2, None, Geometry::Linear, Kind::Float, Device::Cpu).unwrap(),
    );
    let merged = a.merged_weight(&w, 1.0).unwrap();
    assert_eq!(merged.kind(), Kind::Half);
    let want = (w.to_kind(Kind::Float) + a.delta_weight()).to_kind(Kind::Half);
    // exact: the same fp32 ops on the same inputs, then the same cast
    assert!(merged.equal(&want));
    let wrong = Tensor::randn([8, 9], CPU);
    let e = a.merged_weight(&wrong, 1.0).unwrap_err().to_string();
    assert!(e.contains("[8, 9]") && e.contains("[8, 8]"), "{e}");
}
