//! Plain Rust kernels for CPUs without AVX2: one element at a time, blocks in order.

use std::ops::Range;

use super::{padded_blocks, OutPtr, QuantizedRows, QK};

/// Weights whose outputs the portable kernels compute one at a time.
pub(super) trait Dot {
    /// Output `c` of activation row `r`: row `c` of W dotted with row `r` of `x`.
    fn dot(&self, c: usize, x: &QuantizedRows, r: usize) -> f32;
}

/// Computes columns `cols` of every row of `x`·Wᵀ into `out` (row stride n).
///
/// # Safety
/// No other thread writes columns `cols` of `out`, which holds `x.rows × n` floats.
pub(super) unsafe fn run<W: Dot>(
    w: &W,
    x: &QuantizedRows,
    cols: Range<usize>,
    n: usize,
    out: OutPtr,
) {
    for r in 0..x.rows {
        for c in cols.clone() {
            // SAFETY: the caller's contract.
            unsafe { out.write(r * n + c, w.dot(c, x, r)) }
        }
    }
}

/// Row-major Q4_1 weights (scales padded per row).
pub(super) struct Q4_1Ref<'a> {
    pub nb: usize,
    pub qs: &'a [u8],
    pub d: &'a [f32],
    pub m: &'a [f32],
}

impl Dot for Q4_1Ref<'_> {
    fn dot(&self, c: usize, x: &QuantizedRows, r: usize) -> f32 {
        let w = self;

        let nb = w.nb;
        let nbp = padded_blocks(nb);
        let mut acc = 0f32;
        let mut mins = 0f32;
        for b in 0..nb {
            let wq = &w.qs[(c * nb + b) * 16..][..16];
            let xq = &x.qs[(r * nb + b) * QK..][..QK];
            let mut sum = 0i32;
            for j in 0..16 {
                sum += (wq[j] & 0x0F) as i32 * xq[j] as i32;
                sum += (wq[j] >> 4) as i32 * xq[j + 16] as i32;
            }
            acc += sum as f32 * (w.d[c * nbp + b] * x.d[r * nbp + b]);
            mins += w.m[c * nbp + b] * x.s[r * nbp + b];
        }
        acc + mins
    }
}

/// Row-major Q8_0 weights.
pub(super) struct Q8_0Ref<'a> {
    pub nb: usize,
    pub qs: &'a [i8],
    pub d: &'a [f32],
}

impl Dot for Q8_0Ref<'_> {
    fn dot(&self, c: usize, x: &QuantizedRows, r: usize) -> f32 {
        let w = self;

        let nb = w.nb;
        let nbp = padded_blocks(nb);
        let mut acc = 0f32;
        for b in 0..nb {
            let wq = &w.qs[(c * nb + b) * QK..][..QK];
            let xq = &x.qs[(r * nb + b) * QK..][..QK];
            let sum: i32 = wq.iter().zip(xq).map(|(&a, &b)| a as i32 * b as i32).sum();
            acc += sum as f32 * (w.d[c * nb + b] * x.d[r * nbp + b]);
        }
        acc
    }
}

/// Row-major f32 weights times f32 activations.
///
/// # Safety
/// As for [`run`].
pub(super) unsafe fn f32(
    w: &[f32],
    k: usize,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    n: usize,
    out: OutPtr,
) {
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for c in cols.clone() {
            let wr = &w[c * k..(c + 1) * k];
            // Eight partial sums, a fixed order the compiler can vectorize.
            let mut acc = [0f32; 8];
            let mut wc = wr.chunks_exact(8);
            let mut xc = xr.chunks_exact(8);
            for (a, b) in (&mut wc).zip(&mut xc) {
                for l in 0..8 {
                    acc[l] += a[l] * b[l];
                }
            }
            let mut sum = acc.iter().sum::<f32>();
            for (a, b) in wc.remainder().iter().zip(xc.remainder()) {
                sum += a * b;
            }
            unsafe { out.write(r * n + c, sum) }
        }
    }
}
