"""Bit-exact numpy emulation of the torch 2.15 CPU (single thread) reductions
used by mergekit 0.1.5's model_stock, and of model_stock itself.

All data is carried as numpy float32 arrays holding values exactly
representable in the working dtype ("bf16", "f16", "f32").  `lanes` is the
float lane count of the kernel that actually runs (see torch_reduce.md:
for norm/sum this is 8 on both AVX2 and AVX512 capability, because those
kernels are registered with REGISTER_DISPATCH, which leaves the AVX512 slot
empty so the AVX2 kernel is used).

Public functions
  round_to(x, dt)                 RNE rounding of float32 values to dt
  norm_lastdim(x, dt, lanes)      torch.norm(x, dim=-1) (== linalg.vector_norm(x, 2, [-1]))
  sum_lastdim(x, dt, lanes)       x.sum(dim=-1)
  mean_dim0(s, dt, lanes)         torch.stack(list).mean(dim=0)
  model_stock(w0, ws, dt, filter_wise, lanes)
Everything returns float32 arrays holding dt values.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


# ----------------------------------------------------------------- rounding
def round_to(x, dt: str) -> np.ndarray:
    x = np.asarray(x, dtype=F32)
    if dt == "f32":
        return x
    if dt == "f16":
        return x.astype(np.float16).astype(F32)
    if dt == "bf16":
        b = x.view(np.uint32).astype(np.uint64)
        nan = np.isnan(x)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        out = (r << 16).astype(np.uint32).view(F32)
        if nan.any():
            out = np.where(nan, np.float32(np.nan), out)
        return out.astype(F32)
    raise ValueError(dt)


def ceil_log2(x: int) -> int:
    # at::native::utils::CeilLog2: 1 for x <= 2, else ceil(log2(x))
    return 1 if x <= 2 else int(x - 1).bit_length()


# ------------------------------------------------ sequential float32 helpers
def _seq_accumulate(a: np.ndarray, axis: int, init=None, chunk: int = 1 << 16) -> np.ndarray:
    """Strictly left-to-right float32 sum along `axis` (init + a0 + a1 + ...).

    np.add.accumulate is sequential (unlike np.sum, which is pairwise).
    Done in chunks along `axis` to bound memory."""
    a = np.moveaxis(np.asarray(a, dtype=F32), axis, 0)
    acc = np.zeros(a.shape[1:], F32) if init is None else np.array(init, dtype=F32, copy=True)
    n = a.shape[0]
    for s in range(0, n, chunk):
        blk = a[s:s + chunk]
        tmp = np.empty((blk.shape[0] + 1,) + blk.shape[1:], F32)
        tmp[0] = acc
        tmp[1:] = blk
        acc = np.add.accumulate(tmp, axis=0, dtype=F32)[-1]
    return acc


# ------------------------------------------------------------- multi_row_sum
def multi_row_sum(rows: np.ndarray) -> np.ndarray:
    """SumKernel.cpp multi_row_sum.  rows: (B, size, nrows, W) float32
    (B = independent problems, `size` = summed index, nrows = the kernel's
    nrows accumulators, W = vector width or 1).  Returns (B, nrows, W)."""
    B, size, nrows, W = rows.shape
    num_levels = 4
    level_power = max(4, ceil_log2(size) // num_levels)
    level_step = 1 << level_power
    level_mask = level_step - 1
    acc = [np.zeros((B, nrows, W), F32) for _ in range(num_levels)]
    nblocks = size // level_step
    i = 0
    if nblocks:
        # each full block: acc0 (== 0 at block start) + r_i + r_{i+1} + ...
        blk = rows[:, : nblocks * level_step].reshape(B, nblocks, level_step, nrows, W)
        bsum = _seq_accumulate(blk, axis=2)  # (B, nblocks, nrows, W), starts from 0
        for b in range(nblocks):
            i += level_step
            acc[0] = bsum[:, b]  # acc[0] was zero at the start of the block
            for j in range(1, num_levels):
                acc[j] = (acc[j] + acc[j - 1]).astype(F32)
                acc[j - 1] = np.zeros_like(acc[j - 1])
                if i & (level_mask << (j * level_power)):
                    break
    rem = rows[:, nblocks * level_step:]
    if rem.shape[1]:
        acc[0] = _seq_accumulate(rem, axis=1, init=acc[0])
    for j in range(1, num_levels):
        acc[0] = (acc[0] + acc[j]).astype(F32)
    return acc[0]


def row_sum(vecs: np.ndarray) -> np.ndarray:
    """SumKernel.cpp row_sum (ilp_factor 4).  vecs: (B, size, W) -> (B, W)."""
    B, size, W = vecs.shape
    size_ilp = size // 4
    part = multi_row_sum(vecs[:, : size_ilp * 4].reshape(B, size_ilp, 4, W))  # (B,4,W)
    p0 = part[:, 0]
    for i in range(size_ilp * 4, size):
        p0 = (p0 + vecs[:, i]).astype(F32)
    for k in range(1, 4):
        p0 = (p0 + part[:, k]).astype(F32)
    return p0


# ----------------------------------------------------------------------- sum
def sum_lastdim(x: np.ndarray, dt: str, lanes: int = 8) -> np.ndarray:
    """x.sum(dim=-1) for a contiguous tensor (cascade_sum, contiguous inner
    reduction).  Returns dt values (float32 array of shape x.shape[:-1])."""
    x = np.asarray(x, dtype=F32)
    lead = x.shape[:-1]
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    R = x2.shape[0]
    vec_t_size = lanes if dt == "f32" else 2 * lanes  # Vectorized<scalar_t>::size()
    if n == 0:
        return np.zeros(lead, F32)
    if n >= vec_t_size:
        # vectorized_inner_sum
        vec_numel = vec_t_size
        vec_size = n // vec_numel
        body = x2[:, : vec_size * vec_numel].reshape(R, vec_size, vec_numel)
        if dt == "f32":
            vecs = body
        else:  # InnerSumCastLoadPolicy for bf16/f16: first half + second half
            vecs = (body[:, :, :lanes] + body[:, :, lanes:]).astype(F32)
        vacc = row_sum(vecs)  # (R, lanes)
        final = np.zeros(R, F32)
        for k in range(vec_size * vec_numel, n):
            final = (final + x2[:, k]).astype(F32)
        for k in range(lanes):
            final = (final + vacc[:, k]).astype(F32)
    else:
        # scalar_inner_sum / scalar_outer_sum(size1 == 1): row_sum over scalars
        final = row_sum(x2[:, :, None])[:, 0]
    # CastStoreAccumulate: out(dt) = dt(float(0) + final)
    final = (np.float32(0) + final).astype(F32)
    return round_to(final, dt).reshape(lead)


# ---------------------------------------------------------------------- norm
def _fma32(a, b, c):
    """float32 fma(a, b, c) = round32(a*b + c) computed exactly via float64
    (exact when a*b+c fits: true for the magnitudes used here; the float64
    product of two float32 is exact, the float64 sum may round once before
    the final float32 rounding -- double rounding is possible only in
    pathological cases)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(F32)


def norm_lastdim(x: np.ndarray, dt: str, lanes: int = 8, tail_fma: bool = True) -> np.ndarray:
    """torch.norm(x, dim=-1) / torch.linalg.vector_norm(x, 2, dim=-1).

    tail_fma: True for the AVX2 kernel (used at capability AVX2 *and* AVX512);
    False for ATEN_CPU_CAPABILITY=default (scalar tail = separate mul + add).
    Only matters for float32 inputs whose last dim is not a multiple of 8."""
    x = np.asarray(x, dtype=F32)
    lead = x.shape[:-1]
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    R = x2.shape[0]
    if n == 0:
        return np.zeros(lead, F32)
    if dt == "f16":
        # generic path: binary_kernel_reduce(NormTwoOps): acc = acc + x*x, sequential
        acc = _seq_accumulate(np.square(x2), axis=1)
        return round_to(np.sqrt(acc).astype(F32), dt).reshape(lead)
    V = lanes if dt == "f32" else 2 * lanes  # Vectorized<scalar_t>::size()
    m = n - n % V
    if m:
        body = x2[:, :m].reshape(R, m // lanes, lanes)
        lane_acc = _seq_accumulate(np.square(body), axis=1)  # (R, lanes)
    else:
        lane_acc = np.zeros((R, lanes), F32)
    acc = lane_acc[:, 0]
    for j in range(1, lanes):
        acc = (acc + lane_acc[:, j]).astype(F32)
    # scalar tail: buffer[0] += v*v (compiled: groups of 4 with separate mul,
    # the last < 4 as fma -- see torch_reduce.md; irrelevant for bf16)
    k = m
    if not tail_fma:
        while k < n:
            acc = (acc + np.square(x2[:, k])).astype(F32)
            k += 1
    while n - k >= 4:
        for _ in range(4):
            acc = (acc + np.square(x2[:, k])).astype(F32)
            k += 1
    while k < n:
        acc = _fma32(x2[:, k], x2[:, k], acc)
        k += 1
    return round_to(np.sqrt(acc).astype(F32), dt).reshape(lead)


# ---------------------------------------------------------------------- mean
def mean_dim0(s: np.ndarray, dt: str, lanes: int = 8) -> np.ndarray:
    """torch.stack(list).mean(dim=0) on CPU: input cast to float32 (bf16/f16),
    cascade_sum over dim 0 into a float32 result, div_(count) in float32,
    cast back to dt.  s: (P,) or (P, C) float32 holding dt values."""
    s = np.asarray(s, dtype=F32)
    P = s.shape[0]
    if s.ndim == 1 or s.shape[1] == 1:
        tot = sum_lastdim(s.reshape(1, P), "f32", lanes)[0]
        tot = np.array([tot], F32) if s.ndim == 2 else np.float32(tot)
    else:
        C = s.shape[1]
        tot = np.zeros(C, F32)
        L = lanes

        def seq_cascade(c0, c1):  # multi_row_sum order per column
            blk = s[:, c0:c1].T  # (ncols, P)
            return multi_row_sum(blk[:, :, None, None])[:, 0, 0]

        def ilp(c0, c1):  # row_sum order per column
            return row_sum(s[:, c0:c1].T[:, :, None])[:, 0]

        if C >= L:  # vectorized_outer_sum
            j = 0
            while j + 4 * L <= C:
                tot[j:j + 4 * L] = seq_cascade(j, j + 4 * L)
                j += 4 * L
            while j + L <= C:
                tot[j:j + L] = ilp(j, j + L)
                j += L
            if j < C:
                tot[j:] = ilp(j, C)
        else:  # scalar_outer_sum
            j = 0
            while j + 3 < C:
                tot[j:j + 4] = seq_cascade(j, j + 4)
                j += 4
            if j < C:
                tot[j:] = ilp(j, C)
        tot = (np.float32(0) + tot).astype(F32)
    res = (np.asarray(tot, F32) / np.float32(P)).astype(F32)
    return round_to(res, dt)


# --------------------------------------------------------------- model_stock
def model_stock(w0: np.ndarray, ws: list, dt: str, filter_wise: bool = False, lanes: int = 8) -> np.ndarray:
    """mergekit 0.1.5 model_stock on values of dtype dt (float32 arrays)."""
    R = lambda a: round_to(a, dt)
    out_shape = w0.shape
    if filter_wise:
        if w0.ndim == 1:
            w0 = w0[None]
            ws = [w[None] for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [R(w - w0) for w in ws]
    eps = R(np.float32(1e-6))
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            na = norm_lastdim(a, dt, lanes)
            nb = norm_lastdim(b, dt, lanes)
            npd = R(na * nb)
            s = sum_lastdim(R(a * b), dt, lanes)
            c = R(s / np.maximum(npd, eps))
            cos.append(np.clip(c, -1, 1).astype(F32))
    c = mean_dim0(np.stack(cos), dt, lanes)
    c = np.asarray(c, F32)[..., None]
    N = len(ws)
    den = R(np.float32(1) + R(np.float32(N - 1) * c))
    singular = np.abs(den) < eps
    safe = np.where(singular, np.float32(1), den).astype(F32)
    t = np.where(singular, np.float32(0), R(R(np.float32(N) * c) / safe)).astype(F32)
    tot = R(np.float32(0) + ws[0])
    for w in ws[1:]:
        tot = R(tot + w)
    avg = R(tot / np.float32(N))
    out = R(R(t * avg) + R(R(np.float32(1) - t) * w0))
    return out.reshape(out_shape)
