//! nearswap (mergekit 0.1.5, `merge_methods/nearswap.py`): take the other model's value
//! where it is near the base's, the base's where they are far apart.
//!
//! Op by op in the working dtype W: `w = clamp(t / max(|base - x|, 1e-6), 0, 1)` (torch's
//! `t / y` is a reciprocal then a product: two roundings), then
//! `out = w * x + (1 - w) * base`. Elementwise.

use safetensors::Dtype;

use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::{par_windows, InputView, Kernel, WorkDtype};
use crate::params::{Kind, ParamDef};

pub const PARAMS: &[ParamDef] = &[ParamDef {
    name: "t",
    kind: Kind::Float,
    scope: crate::params::Scope::Shared,
    default: None,
}];

const MICRO: usize = 512;

pub fn apply(k: &Kernel, t: f64, inputs: &[InputView], len: usize, out: &mut [u8]) {
    let od = k.out.st_dtype();
    par_windows(len, k.out.size(), out, |start, len, out| match k.work {
        WorkDtype::BF16 => apply_range::<Bf16>(inputs, start, len, t as f32, od, out),
        WorkDtype::F16 => apply_range::<F16>(inputs, start, len, t as f32, od, out),
        WorkDtype::F32 => apply_range::<F32>(inputs, start, len, t as f32, od, out),
        WorkDtype::F64 => unreachable!("the plan refuses float64 for nearswap"),
    })
}

fn apply_range<R: Round>(
    inputs: &[InputView],
    start: usize,
    len: usize,
    t: f32,
    od: Dtype,
    out: &mut [u8],
) {
    let osz = out.len() / len.max(1);
    let floor = R::round(1e-6);
    let mut base = [0f32; MICRO];
    let mut x = [0f32; MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        decode::<R>(
            inputs[0].bytes,
            inputs[0].dtype,
            start + off,
            &mut base[..m],
        );
        decode::<R>(inputs[1].bytes, inputs[1].dtype, start + off, &mut x[..m]);
        for k in 0..m {
            let (a, b) = (base[k], x[k]);
            let diff = R::round((a - b).abs()).max(floor);
            let w = R::round(R::round(1.0 / diff) * t).clamp(0.0, 1.0);
            x[k] = R::round(R::round(w * b) + R::round(R::round(1.0 - w) * a));
        }
        encode_with::<R>(&x[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}
