// Shared helpers for the sparsify kernels. No CUDA headers are needed (NVRTC and nvcc both work without
// cuda_bf16.h): bf16 values travel as raw 16-bit patterns and are widened/rounded by bit manipulation.
#pragma once

#define SPARSIFY_FULL_MASK 0xffffffffu

// bf16 bit pattern -> float (exact).
__device__ __forceinline__ float bf16_lo(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float bf16_to_f(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }

// float -> bf16 bit pattern, round to nearest even (as torch's .to(torch.bfloat16)); NaN stays NaN.
__device__ __forceinline__ unsigned short f_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    return (unsigned int)f_to_bf16(lo) | ((unsigned int)f_to_bf16(hi) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SPARSIFY_FULL_MASK, v, o);
    return v;
}

// acc[0..7] += h * (8 bf16 in q)
__device__ __forceinline__ void axpy8(float* acc, float h, uint4 q) {
    acc[0] = fmaf(h, bf16_lo(q.x), acc[0]); acc[1] = fmaf(h, bf16_hi(q.x), acc[1]);
    acc[2] = fmaf(h, bf16_lo(q.y), acc[2]); acc[3] = fmaf(h, bf16_hi(q.y), acc[3]);
    acc[4] = fmaf(h, bf16_lo(q.z), acc[4]); acc[5] = fmaf(h, bf16_hi(q.z), acc[5]);
    acc[6] = fmaf(h, bf16_lo(q.w), acc[6]); acc[7] = fmaf(h, bf16_hi(q.w), acc[7]);
}

// s + dot(8 bf16 in p, 8 bf16 in q)
__device__ __forceinline__ float dot8(float s, uint4 p, uint4 q) {
    s = fmaf(bf16_lo(p.x), bf16_lo(q.x), s); s = fmaf(bf16_hi(p.x), bf16_hi(q.x), s);
    s = fmaf(bf16_lo(p.y), bf16_lo(q.y), s); s = fmaf(bf16_hi(p.y), bf16_hi(q.y), s);
    s = fmaf(bf16_lo(p.z), bf16_lo(q.z), s); s = fmaf(bf16_hi(p.z), bf16_hi(q.z), s);
    s = fmaf(bf16_lo(p.w), bf16_lo(q.w), s); s = fmaf(bf16_hi(p.w), bf16_hi(q.w), s);
    return s;
}

// Inclusive prefix sum of v over the warp's lanes (lane l gets v_0 + ... + v_l). Every lane calls it.
__device__ __forceinline__ int warp_incl_scan(int v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(SPARSIFY_FULL_MASK, v, o);
        if (lane >= o) v += y;
    }
    return v;
}

// relu that keeps NaN (as torch does), so a NaN in the activation is not hidden
__device__ __forceinline__ float relu_keep_nan(float v) { return (v > 0.f || v != v) ? v : 0.f; }

// relu(a) * u on 8 bf16 at once (16-byte vectors of a and u), each product in fp32 rounded once to bf16: the
// hybrid's hot glue (relu_mul.cu, relu_list.cu), the values of torch's relu then multiply
__device__ __forceinline__ uint4 relu_mul8(uint4 qa, uint4 qu) {
    return make_uint4(
        pack_bf16x2(relu_keep_nan(bf16_lo(qa.x)) * bf16_lo(qu.x), relu_keep_nan(bf16_hi(qa.x)) * bf16_hi(qu.x)),
        pack_bf16x2(relu_keep_nan(bf16_lo(qa.y)) * bf16_lo(qu.y), relu_keep_nan(bf16_hi(qa.y)) * bf16_hi(qu.y)),
        pack_bf16x2(relu_keep_nan(bf16_lo(qa.z)) * bf16_lo(qu.z), relu_keep_nan(bf16_hi(qa.z)) * bf16_hi(qu.z)),
        pack_bf16x2(relu_keep_nan(bf16_lo(qa.w)) * bf16_lo(qu.w), relu_keep_nan(bf16_hi(qa.w)) * bf16_hi(qu.w)));
}

// "Non-zero" after relu: v > 0, and NaN counts (it must not disappear silently). -0.0 is zero.
__device__ __forceinline__ bool relu_active(unsigned short b) {
    float f = bf16_to_f(b);
    return !(f <= 0.0f);
}

// The sweep of a row u (16-byte vectors) that the warp dots share: per 2048 columns, the lane's 8 row vectors are
// loaded before any arithmetic, so they are in flight together, then s = step(s, vi, u[vi]) in vector order;
// summed over the warp (all lanes get it).
template <typename Step>
__device__ __forceinline__ float warp_row_sweep(const uint4* __restrict__ ug, int nvec_d, int lane, Step step) {
    float s = 0.f;
    for (int base = 0; base < nvec_d; base += 256) {
        uint4 u[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int vi = base + k * 32 + lane;
            u[k] = vi < nvec_d ? __ldg(ug + vi) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int vi = base + k * 32 + lane;
            if (vi < nvec_d) s = step(s, vi, u[k]);
        }
    }
    return warp_sum(s);
}

// x . u over D = 8 * nvec_d bf16 (x, u: rows of 16-byte vectors), summed over the warp (all lanes get it).
// x is expected to be L1-resident (re-read for every entry), or in shared memory (X_SHARED: plain loads, since
// __ldg is a global-memory load).
template <bool X_SHARED = false>
__device__ __forceinline__ float warp_dot(const uint4* __restrict__ xg, const uint4* __restrict__ ug, int nvec_d,
                                          int lane) {
    return warp_row_sweep(ug, nvec_d, lane,
                          [&](float s, int vi, uint4 u) { return dot8(s, X_SHARED ? xg[vi] : __ldg(xg + vi), u); });
}

// warp_dot with x in shared memory as fp32, split by halves of each 8-column vector (xlo[vi] = columns 8 vi ..
// 8 vi + 3, xhi[vi] = 8 vi + 4 .. 8 vi + 7: conflict-free 16-byte reads): the same products summed in the same order
// as warp_dot (fmaf(x, u, s) = fmaf(u, x, s)), so the same bits, without unpacking x for every row it meets.
__device__ __forceinline__ float warp_dot_xf(const float4* xlo, const float4* xhi, const uint4* __restrict__ ug,
                                             int nvec_d, int lane) {
    return warp_row_sweep(ug, nvec_d, lane, [&](float s, int vi, uint4 u) {
        const float4 a = xlo[vi], b = xhi[vi];
        s = fmaf(a.x, bf16_lo(u.x), s); s = fmaf(a.y, bf16_hi(u.x), s);
        s = fmaf(a.z, bf16_lo(u.y), s); s = fmaf(a.w, bf16_hi(u.y), s);
        s = fmaf(b.x, bf16_lo(u.z), s); s = fmaf(b.y, bf16_hi(u.z), s);
        s = fmaf(b.z, bf16_lo(u.w), s); return fmaf(b.w, bf16_hi(u.w), s);
    });
}

// 16-byte load / store of data touched once (a dense activation row, the hybrid's init, the output):
// ld/st.global.cs allocate the lines evict-first in L1 and L2, so streaming hundreds of MB past the gather does
// not push out the weight rows it keeps re-reading from L2. Same values as __ldg / a plain store.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void st_stream16(void* p, uint4 v) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// Ask L2 for the bytes [p, p + n) ahead of the loads that will read them (p 16-byte aligned, n a multiple of 16):
// one bulk prefetch from lane 0 on Hopper, 128-byte line prefetches over the lanes before it. A hint: no register
// and no value changes, so the loads that follow return the same data, sooner.
__device__ __forceinline__ void warp_prefetch_l2(const void* p, int n, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (lane == 0 && n > 0) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(n) : "memory");
#else
    for (int off = lane * 128; off < n; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(p) + off));
#endif
}

// Load act[c0 .. c0+8) (bf16 bits) into v, zero past c_end; one 16-byte load when allowed (STREAM: evict-first).
template <bool STREAM = false>
__device__ __forceinline__ void load8(const unsigned short* __restrict__ arow, int c0, int c_end, bool vec_ok,
                                      unsigned short* v) {
    if (vec_ok && c0 + 8 <= c_end) {
        const uint4 q = STREAM ? ld_stream16(arow + c0) : __ldg(reinterpret_cast<const uint4*>(arow + c0));
        const unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            v[2 * e] = (unsigned short)(w[e] & 0xffffu);
            v[2 * e + 1] = (unsigned short)(w[e] >> 16);
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = (c0 + e < c_end) ? arow[c0 + e] : (unsigned short)0;
    }
}

// Visit the relu-active entries of act row columns [c_beg, c_end) in ascending column order, 256 * STEP columns
// (STEP 16-byte loads per lane, all in flight) per step: f(rank, col, bits) with rank = 0, 1, ... in order.
// Every lane of the warp must call it. c_beg must be a multiple of 8. Returns the number visited.
// STREAM: the row is read evict-first (ld_stream16).
template <bool STREAM = false, int STEP = 2, typename F>
__device__ __forceinline__ int warp_for_each_active(const unsigned short* __restrict__ arow, int c_beg, int c_end,
                                                    bool vec_ok, int lane, F f) {
    int r = 0;
    for (int c = c_beg; c < c_end; c += 256 * STEP) {
        unsigned short v[STEP][8];
#pragma unroll
        for (int h = 0; h < STEP; ++h) load8<STREAM>(arow, c + 256 * h + lane * 8, c_end, vec_ok, v[h]);
#pragma unroll
        for (int h = 0; h < STEP; ++h) {
            const int c0 = c + 256 * h + lane * 8;
            int n = 0;
#pragma unroll
            for (int e = 0; e < 8; ++e) n += relu_active(v[h][e]) ? 1 : 0;
            const int incl = warp_incl_scan(n, lane);
            int rank = r + incl - n;
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (relu_active(v[h][e])) f(rank++, c0 + e, v[h][e]);
            r += __shfl_sync(SPARSIFY_FULL_MASK, incl, 31);
        }
    }
    return r;
}

// Two dots x0.u0 and x1.u1 at once (16 row loads in flight per lane), summed over the warp (every lane gets both);
// u1 may be null (then s1 = 0). x0 and x1 may be rows of different tokens; x is expected to be L1-resident, or in
// shared memory (X_SHARED). Each sum is taken in warp_dot's order, so s0 and s1 are warp_dot's bits.
template <bool X_SHARED = false>
__device__ __forceinline__ void warp_dot2x(const uint4* __restrict__ x0, const uint4* __restrict__ u0,
                                           const uint4* __restrict__ x1, const uint4* __restrict__ u1, int nvec_d,
                                           int lane, float& s0, float& s1) {
    s0 = 0.f;
    s1 = 0.f;
    for (int base = 0; base < nvec_d; base += 256) {
        uint4 a[8], b[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int vi = base + k * 32 + lane;
            const bool ok = vi < nvec_d;
            a[k] = ok ? __ldg(u0 + vi) : make_uint4(0u, 0u, 0u, 0u);
            b[k] = (ok && u1 != nullptr) ? __ldg(u1 + vi) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int vi = base + k * 32 + lane;
            if (vi < nvec_d) {
                const uint4 xv0 = X_SHARED ? x0[vi] : __ldg(x0 + vi);
                s0 = dot8(s0, xv0, a[k]);
                if (u1 != nullptr) s1 = dot8(s1, x1 == x0 ? xv0 : (X_SHARED ? x1[vi] : __ldg(x1 + vi)), b[k]);
            }
        }
    }
    s0 = warp_sum(s0);
    s1 = warp_sum(s1);
}

// Two dots x.u0 and x.u1 with the same x (u1 may be null: then s1 = 0).
template <bool X_SHARED = false>
__device__ __forceinline__ void warp_dot2(const uint4* __restrict__ xg, const uint4* __restrict__ u0,
                                          const uint4* __restrict__ u1, int nvec_d, int lane, float& s0, float& s1) {
    warp_dot2x<X_SHARED>(xg, u0, xg, u1, nvec_d, lane, s0, s1);
}

// acc[8 * NV] += h(e) * DownT_{col(e)}[d0 .. d0 + 8 * nvec_c) for e = 0 .. n-1, in that order, two rows in flight:
// lane l owns the column vectors l, l + 32, ... of the chunk (NV per lane). The down half of the fused FFN
// kernels (twell_ffn.cu, train_ffn.cu), so they sum their entries in the same order.
template <int NV, typename Col, typename HVal>
__device__ __forceinline__ void warp_down_rows(float* acc, const unsigned short* __restrict__ down_t, int D, int d0,
                                               int nvec_c, int lane, int n, Col col, HVal hval) {
    int e = 0;
    for (; e + 2 <= n; e += 2) {
        const uint4* r0 = reinterpret_cast<const uint4*>(down_t + (long long)col(e) * D + d0);
        const uint4* r1 = reinterpret_cast<const uint4*>(down_t + (long long)col(e + 1) * D + d0);
        uint4 q0[NV], q1[NV];
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int vi = k * 32 + lane;
            q0[k] = vi < nvec_c ? __ldg(r0 + vi) : make_uint4(0u, 0u, 0u, 0u);
            q1[k] = vi < nvec_c ? __ldg(r1 + vi) : make_uint4(0u, 0u, 0u, 0u);
        }
        const float h0 = hval(e), h1 = hval(e + 1);
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            axpy8(acc + 8 * k, h0, q0[k]);
            axpy8(acc + 8 * k, h1, q1[k]);
        }
    }
    if (e < n) {
        const uint4* r0 = reinterpret_cast<const uint4*>(down_t + (long long)col(e) * D + d0);
        const float h0 = hval(e);
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int vi = k * 32 + lane;
            if (vi < nvec_c) axpy8(acc + 8 * k, h0, __ldg(r0 + vi));
        }
    }
}

// acc := chunk widened to fp32 (the lane's NV column vectors of 8, as warp_down_rows lays them out; lanes past
// nvec_c keep theirs); STREAM: evict-first loads (ld_stream16). The hybrid's init, the mirror of warp_store_bf16.
template <int NV, bool STREAM = false>
__device__ __forceinline__ void warp_load_bf16(float* acc, const unsigned short* __restrict__ chunk, int nvec_c,
                                               int lane) {
    const uint4* ig = reinterpret_cast<const uint4*>(chunk);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int vi = k * 32 + lane;
        if (vi < nvec_c) {
            const uint4 q = STREAM ? ld_stream16(ig + vi) : __ldg(ig + vi);
            acc[8 * k + 0] = bf16_lo(q.x); acc[8 * k + 1] = bf16_hi(q.x);
            acc[8 * k + 2] = bf16_lo(q.y); acc[8 * k + 3] = bf16_hi(q.y);
            acc[8 * k + 4] = bf16_lo(q.z); acc[8 * k + 5] = bf16_hi(q.z);
            acc[8 * k + 6] = bf16_lo(q.w); acc[8 * k + 7] = bf16_hi(q.w);
        }
    }
}

// out_chunk := acc rounded to bf16 (the lane's NV column vectors of 8, as warp_down_rows lays them out);
// STREAM: evict-first stores (st_stream16).
template <int NV, bool STREAM = false>
__device__ __forceinline__ void warp_store_bf16(unsigned short* __restrict__ out_chunk, const float* acc, int nvec_c,
                                                int lane) {
    uint4* og = reinterpret_cast<uint4*>(out_chunk);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int vi = k * 32 + lane;
        if (vi < nvec_c) {
            const float* a8 = acc + 8 * k;
            const uint4 q = make_uint4(pack_bf16x2(a8[0], a8[1]), pack_bf16x2(a8[2], a8[3]),
                                       pack_bf16x2(a8[4], a8[5]), pack_bf16x2(a8[6], a8[7]));
            if (STREAM)
                st_stream16(og + vi, q);
            else
                og[vi] = q;
        }
    }
}

// Programmatic dependent launch (Hopper; launchers.py asks for it where it pays). A kernel launched so may start
// while the kernel before it in the stream is still running: pdl_wait() blocks until that kernel has finished and
// its writes are visible, so nothing may read an input another kernel produces, or write any output, before it.
// pdl_launch_dependents() lets the next kernel (if launched so) start before this one ends. pdl_wait is a no-op
// for an ordinary launch; both are no-ops below sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
