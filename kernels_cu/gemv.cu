// out = x · Wᵀ for very few tokens (decode, M <= 2): x (M, D), W (H, D), out (M, H), bf16 in and out, fp32 sums.
//
// Memory-bound: W is read once. One warp per 2 rows of W; lane l owns the 16-byte vectors l, l+32, ... of
// each 2048-column chunk; the 2 x 8 row loads (and the M x 8 x loads, L1-resident) of a chunk are issued before
// any arithmetic, so 8 KB per warp are in flight. Used in front of the decode kernel, where cuBLAS's GEMV ran at
// ~1.9 TB/s (BENCHMARKS.md).
#include "common.cuh"

template <int MT>
__global__ void __launch_bounds__(256) gemv_kernel(const unsigned short* __restrict__ x,  // (MT, D)
                                                   const unsigned short* __restrict__ w,  // (H, D)
                                                   unsigned short* __restrict__ out,      // (MT, H)
                                                   int D, int H) {
    const int lane = threadIdx.x & 31;
    const int j0 = 2 * (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
    if (j0 >= H) return;
    const bool two = j0 + 1 < H;
    const int nvec = D >> 3;
    const uint4* w0 = reinterpret_cast<const uint4*>(w + (long long)j0 * D);
    const uint4* w1 = reinterpret_cast<const uint4*>(w + (long long)(two ? j0 + 1 : j0) * D);
    float s0[MT], s1[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) s0[m] = s1[m] = 0.f;
    for (int base = 0; base < nvec; base += 256) {
        uint4 a[8], b[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int vi = base + k * 32 + lane;
            const bool ok = vi < nvec;
            a[k] = ok ? __ldg(w0 + vi) : make_uint4(0u, 0u, 0u, 0u);
            b[k] = ok ? __ldg(w1 + vi) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const uint4* xg = reinterpret_cast<const uint4*>(x + (long long)m * D);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const int vi = base + k * 32 + lane;
                if (vi < nvec) {
                    const uint4 xv = __ldg(xg + vi);
                    s0[m] = dot8(s0[m], xv, a[k]);
                    s1[m] = dot8(s1[m], xv, b[k]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const float r0 = warp_sum(s0[m]);
        const float r1 = warp_sum(s1[m]);
        if (lane == 0) {
            out[(long long)m * H + j0] = f_to_bf16(r0);
            if (two) out[(long long)m * H + j0 + 1] = f_to_bf16(r1);
        }
    }
}

template __global__ void gemv_kernel<1>(const unsigned short*, const unsigned short*, unsigned short*, int, int);
template __global__ void gemv_kernel<2>(const unsigned short*, const unsigned short*, unsigned short*, int, int);
