//! Merging equals the adapted forward pass for Linear, 1x1 conv and strided 3x3 conv.

use lora_core::{Geometry, LoraAdapter};
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

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
    assert!(max_abs(&y, &adapted) < 1e-5, "{}", max_abs(&y, &adapted));
    let back = a.unmerged_weight(&merged, 0.8).unwrap();
    assert!(max_abs(&back, &w) < 1e-6);
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
    assert!(max_abs(&adapted, &base) > 1e-3);
    let merged = a.merged_weight(&w, 1.0).unwrap();
    let d = max_abs(&conv(&merged), &adapted);
    assert!(d < 1e-4, "kernel {kernel} stride {stride}: {d}");
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
    assert!(merged.equal(&want));
    let wrong = Tensor::randn([8, 9], CPU);
    let e = a.merged_weight(&wrong, 1.0).unwrap_err().to_string();
    assert!(e.contains("[8, 9]") && e.contains("[8, 8]"), "{e}");
}
