//! bitsandbytes-style blockwise dynamic 8-bit quantisation of optimizer
//! states (`create_dynamic_map`, `quantize_blockwise`).

use tch::{Kind, Tensor};

/// bitsandbytes' block size for 8-bit optimizer states.
pub const BLOCK_SIZE: i64 = 256;
/// Parameters smaller than this keep fp32 states (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: i64 = 4096;

/// bitsandbytes' dynamic quantisation map (`create_dynamic_map`, 7 exponent
/// bits, 8 bits): 256 sorted values in [-1, 1] (signed) or [0, 1] (unsigned),
/// dense near zero.
pub fn dynamic_map(signed: bool) -> Tensor {
    let (total_bits, max_exp) = (8i32, 7i32);
    let non_sign = total_bits - 1;
    let additional = 2i64.pow((non_sign - max_exp) as u32) - 1;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    // bitsandbytes multiplies a float32 tensor by a Python float: the product
    // is computed in f32.
    let means = |items: i64| -> Vec<f32> {
        let b = Tensor::linspace(0.1, 1.0, items, (Kind::Float, tch::Device::Cpu));
        let m = (b.narrow(0, 0, items - 1) + b.narrow(0, 1, items - 1)) / 2.0;
        Vec::<f32>::try_from(&m).expect("float tensor")
    };
    let mut last_scale = 1.0f32;
    for i in 0..max_exp {
        let items = if signed {
            2i64.pow((i + non_sign - max_exp) as u32) + 1
        } else {
            2i64.pow((i + non_sign - max_exp + 1) as u32) + 1
        };
        let scale = 10f64.powf(f64::from(-(max_exp - 1) + i)) as f32;
        last_scale = scale;
        for m in means(items) {
            data.push(scale * m);
            if signed {
                data.push(-scale * m);
            }
        }
    }
    if additional > 0 {
        for m in means(additional + 1) {
            data.push(last_scale * m);
            if signed {
                data.push(-last_scale * m);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    // Unsigned maps have fewer items: pad with zeros as bitsandbytes does.
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(f32::total_cmp);
    Tensor::from_slice(&data)
}

/// A tensor stored as 8-bit codes of a quantisation map with one absmax per
/// block of [`BLOCK_SIZE`] elements (of the flattened tensor).
#[derive(Debug)]
pub struct Quantized {
    /// Codes, `uint8`, the tensor's shape.
    pub codes: Tensor,
    /// Absmax per block, fp32.
    pub absmax: Tensor,
}

fn blocks(n: i64) -> i64 {
    (n + BLOCK_SIZE - 1) / BLOCK_SIZE
}

/// Per-element absmax of each element's block (`[n]`).
fn expand_blocks(per_block: &Tensor, n: i64) -> Tensor {
    per_block
        .repeat_interleave_self_int(BLOCK_SIZE, 0, None)
        .narrow(0, 0, n)
}

impl Quantized {
    /// Zeros of `shape` on `device`.
    pub fn zeros(shape: &[i64], device: tch::Device) -> Self {
        let n: i64 = shape.iter().product();
        Self {
            codes: Tensor::zeros(shape, (Kind::Uint8, device)),
            absmax: Tensor::zeros([blocks(n)], (Kind::Float, device)),
        }
    }
}

/// A quantisation map (256 sorted codes) and the midpoints between them.
#[derive(Debug)]
pub struct QuantMap {
    code: Tensor,
    bounds: Tensor,
}

impl QuantMap {
    /// bitsandbytes' dynamic map ([`dynamic_map`]) on `device`.
    pub fn dynamic(signed: bool, device: tch::Device) -> Self {
        let code = dynamic_map(signed).to_device(device);
        let bounds = (code.narrow(0, 0, 255) + code.narrow(0, 1, 255)) / 2.0;
        Self { code, bounds }
    }
    /// Blockwise quantisation (bitsandbytes: scale by 1/absmax, clamp to
    /// [-1, 1], nearest code via the midpoints between codes).
    pub fn quantize(&self, x: &Tensor) -> Quantized {
        let flat = x.to_kind(Kind::Float).reshape([-1]);
        let n = flat.size()[0];
        let nb = blocks(n);
        let padded = flat.constant_pad_nd([0, nb * BLOCK_SIZE - n]);
        let absmax = padded
            .view([nb, BLOCK_SIZE])
            .abs()
            .amax([1].as_slice(), false);
        let inv = absmax.clamp_min(1e-38).reciprocal();
        let scaled = (flat * expand_blocks(&inv, n)).clamp(-1.0, 1.0);
        let codes = scaled
            .bucketize(&self.bounds, true, false)
            .to_kind(Kind::Uint8)
            .view(x.size().as_slice());
        Quantized { codes, absmax }
    }
    /// Back to fp32.
    pub fn dequantize(&self, q: &Quantized) -> Tensor {
        let n = q.codes.numel() as i64;
        let values = self
            .code
            .index_select(0, &q.codes.reshape([-1]).to_kind(Kind::Int64));
        (values * expand_blocks(&q.absmax, n)).view(q.codes.size().as_slice())
    }
}
