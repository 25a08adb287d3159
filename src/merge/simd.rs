//! Hot loops compiled twice: for the baseline target and, on x86-64, with AVX2, FMA and
//! F16C, chosen at run time. Rust never contracts `a * b + c` into an FMA, and an explicit
//! `mul_add` is fused in both builds (in hardware, or by libm), so both give the same bits.

/// A dispatcher that runs its body compiled with AVX2, FMA and F16C when the CPU has them,
/// else compiled for the baseline target. The generic form takes a kernel generic over the
/// rounding; its fast build uses `R::Fast` (the CPU's float16 conversions).
#[macro_export]
#[doc(hidden)]
macro_rules! twice {
    (generic $name:ident ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        pub fn $name<R: Round>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn fast<R: Round>($($arg: $ty),*) $(-> $ret)? {
                super::$name::<R::Fast>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::merge::simd::has_fast() {
                // SAFETY: the CPU supports every feature `fast` is compiled with.
                return unsafe { fast::<R>($($arg),*) };
            }
            super::$name::<R>($($arg),*)
        }
    };
    ($name:ident ($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:expr) => {
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                $body
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::merge::simd::has_fast() {
                // SAFETY: the CPU supports every feature `fast` is compiled with.
                return unsafe { fast($($arg),*) };
            }
            $body
        }
    };
}

/// Tests set this to run the baseline build on a CPU that has AVX2, so both builds are
/// compared on one machine (the results must not depend on the CPU).
#[cfg(test)]
pub static BASELINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Every feature the fast functions are compiled with (f16c too: a CPU may have AVX2
/// without it, for example under some hypervisors).
#[cfg(target_arch = "x86_64")]
pub fn has_fast() -> bool {
    #[cfg(test)]
    if BASELINE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}
