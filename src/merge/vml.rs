//! float32 `acos`, `sin`, `cos`, `exp` and `ln` as torch computes them.
//!
//! torch's float32 transcendental functions on CPU are Intel MKL's vector math (VML), whose
//! last bit differs from the C library's on a few percent of inputs; slerp's coefficients
//! come from four such calls per tensor, so a float32 slerp is bit-exact only with MKL's.
//! MKL is not ours to ship: a user who wants those bits points `MERGEFLEET_MKL_RT` at the
//! `libmkl_rt.so.2` of the MKL torch bundles (2024.2, e.g. PyPI's `mkl==2024.2.2`), and we
//! call its `vsAcos`/`vsSin`/`vsCos`/`vsExp`/`vsLn` on one element. Without it, the C library's functions
//! are used (16-bit results are nearly always the same; see docs/numerics.md).

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::OnceLock;

/// The environment variable naming MKL's single dynamic library.
pub const ENV: &str = "MERGEFLEET_MKL_RT";

type Unary = unsafe extern "C" fn(n: c_int, a: *const f32, y: *mut f32);

struct Vml {
    acos: Unary,
    sin: Unary,
    cos: Unary,
    exp: Unary,
    ln: Unary,
}

static VML: OnceLock<Option<Vml>> = OnceLock::new();

/// MKL could not be loaded from the path the environment names.
#[derive(Debug, thiserror::Error)]
#[error("{ENV}={path}: {message}; unset it to use the C library's acos/sin/cos (float32 slerp may then differ from mergekit's in the last bit)")]
pub struct VmlError {
    pub path: String,
    pub message: String,
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by the loader.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn load(path: &str) -> Result<Vml, VmlError> {
    let err = |message: String| VmlError {
        path: path.to_string(),
        message,
    };
    let c = CString::new(path).map_err(|_| err("the path holds a NUL byte".into()))?;
    // SAFETY: dlopen with a valid C string; the library stays loaded for the process.
    let lib: *mut c_void = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        return Err(err(dlerror()));
    }
    let sym = |name: &str| -> Result<Unary, VmlError> {
        let n = CString::new(name).expect("symbol names hold no NUL");
        // SAFETY: dlsym on a handle dlopen returned.
        let f = unsafe { libc::dlsym(lib, n.as_ptr() as *const c_char) };
        if f.is_null() {
            return Err(err(format!("it has no `{name}`: not MKL's libmkl_rt")));
        }
        // SAFETY: MKL's `vsX(n, a, y)` has this signature (MKL_INT n: 32-bit in the
        // LP64 interface libmkl_rt selects by default).
        Ok(unsafe { std::mem::transmute::<*mut c_void, Unary>(f) })
    };
    // One element at a time needs no threads, and MKL's default (Intel OpenMP) threading
    // layer is not loaded here: the sequential layer, before any other call.
    let layer = sym("MKL_Set_Threading_Layer")?;
    // SAFETY: `int MKL_Set_Threading_Layer(int)`; 1 is MKL_THREADING_SEQUENTIAL.
    unsafe {
        let set: unsafe extern "C" fn(c_int) -> c_int = std::mem::transmute(layer);
        set(1);
    }
    Ok(Vml {
        acos: sym("vsAcos")?,
        sin: sym("vsSin")?,
        cos: sym("vsCos")?,
        exp: sym("vsExp")?,
        ln: sym("vsLn")?,
    })
}

/// Load MKL when the environment names it (once per process; a failure is an error for the
/// caller to report). Whether MKL's functions are in use.
pub fn init() -> Result<bool, VmlError> {
    if let Some(v) = VML.get() {
        return Ok(v.is_some());
    }
    let loaded = match std::env::var(ENV) {
        Ok(path) if !path.is_empty() => Some(load(&path)?),
        _ => None,
    };
    let using = loaded.is_some();
    let _ = VML.set(loaded);
    Ok(using)
}

fn call(f: impl Fn(&Vml) -> Unary, x: f32, fallback: fn(f32) -> f32) -> f32 {
    // Not initialised (a library caller): the environment decides, a failure falls back.
    let vml = VML.get_or_init(|| match std::env::var(ENV) {
        Ok(path) if !path.is_empty() => load(&path).ok(),
        _ => None,
    });
    match vml {
        Some(v) => {
            let mut y = 0f32;
            // SAFETY: one element in, one out.
            unsafe { f(v)(1, &x, &mut y) };
            y
        }
        None => fallback(x),
    }
}

pub fn acos(x: f32) -> f32 {
    call(|v| v.acos, x, f32::acos)
}

pub fn sin(x: f32) -> f32 {
    call(|v| v.sin, x, f32::sin)
}

pub fn cos(x: f32) -> f32 {
    call(|v| v.cos, x, f32::cos)
}

pub fn exp(x: f32) -> f32 {
    call(|v| v.exp, x, f32::exp)
}

pub fn ln(x: f32) -> f32 {
    call(|v| v.ln, x, f32::ln)
}
