//! passthrough (mergekit 0.1.5, `merge_methods/passthrough.py`): one input, copied, or
//! scaled by its `scale`. With `slices` it stacks layers of models into a new one
//! ("frankenmerges", depth up-scaling).
//!
//! In the working dtype W: `out = x`, or `R(x * f32(scale))` (torch's tensor-times-Python
//! float keeps the scalar in float32; a 0.0 scale keeps the sign of zero). Elementwise.

use safetensors::Dtype;

use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::{par_windows, wide, InputView, Kernel, WorkDtype};
use crate::params::{ParamDef, Scope};

/// `scale`, optional with no default: NaN stands for mergekit's `None` (no scaling).
pub const PARAMS: &[ParamDef] = &[ParamDef::per_input("scale", Scope::Input, Some(f64::NAN))];

const MICRO: usize = 512;

pub fn apply(k: &Kernel, scale: Option<f64>, inputs: &[InputView], len: usize, out: &mut [u8]) {
    let od = k.out.st_dtype();
    let s = scale.map(|s| s as f32);
    par_windows(len, k.out.size(), out, |start, len, out| match k.work {
        WorkDtype::BF16 => apply_range::<Bf16>(&inputs[0], start, len, s, od, out),
        WorkDtype::F16 => apply_range::<F16>(&inputs[0], start, len, s, od, out),
        WorkDtype::F32 => apply_range::<F32>(&inputs[0], start, len, s, od, out),
        WorkDtype::F64 => apply_f64(&inputs[0], start, len, scale, od, out),
    })
}

fn apply_range<R: Round>(
    input: &InputView,
    start: usize,
    len: usize,
    scale: Option<f32>,
    od: Dtype,
    out: &mut [u8],
) {
    let osz = out.len() / len.max(1);
    let mut x = [0f32; MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        decode::<R>(input.bytes, input.dtype, start + off, &mut x[..m]);
        if let Some(s) = scale {
            for v in &mut x[..m] {
                *v = R::round(*v * s);
            }
        }
        encode_with::<R>(&x[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}

/// float64: the values as float64, scaled by the float64 scale (torch keeps a Python float
/// at the tensor's precision).
fn apply_f64(
    input: &InputView,
    start: usize,
    len: usize,
    scale: Option<f64>,
    od: Dtype,
    out: &mut [u8],
) {
    let osz = out.len() / len.max(1);
    let mut x = [0f64; MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        wide::decode(input.bytes, input.dtype, start + off, &mut x[..m]);
        if let Some(s) = scale {
            for v in &mut x[..m] {
                *v *= s;
            }
        }
        wide::encode(&x[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}
