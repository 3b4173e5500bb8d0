// out = x · Wᵀ for very few tokens (decode, M <= 2): x (M, D), W (H, D), out (M, H), bf16 in and out, fp32 sums.
//
// Memory-bound: W is read once. One warp per ROWS rows of W; lane l owns the 16-byte vectors l, l+32, ... of
// each 2048-column chunk; the ROWS x 8 row loads (and the M x 8 x loads, L1-resident) of a chunk are issued
// before any arithmetic (ROWS * 4 KB per warp in flight). ROWS = 4 with 12 warps/SM keeps H = 5632 rows in a
// single wave (1408 warps <= 1584 slots); ROWS = 2 needed 1.33 waves and lost to cuBLAS (BENCHMARKS.md).
#include "common.cuh"

#ifndef GEMV_MIN_BLOCKS
#define GEMV_MIN_BLOCKS 3
#endif

template <int MT, int ROWS>
__global__ void __launch_bounds__(128, GEMV_MIN_BLOCKS) gemv_kernel(
    const unsigned short* __restrict__ x,  // (MT, D)
    const unsigned short* __restrict__ w,  // (H, D)
    unsigned short* __restrict__ out,      // (MT, H)
    int D, int H) {
    const int lane = threadIdx.x & 31;
    const int j0 = ROWS * (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
    if (j0 >= H) return;
    const int nvec = D >> 3;
    const uint4* wr[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) wr[r] = reinterpret_cast<const uint4*>(w + (long long)min(j0 + r, H - 1) * D);
    float s[MT][ROWS];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) s[m][r] = 0.f;
    for (int base = 0; base < nvec; base += 256) {
        uint4 a[ROWS][8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int vi = base + k * 32 + lane;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) a[r][k] = vi < nvec ? __ldg(wr[r] + vi) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const uint4* xg = reinterpret_cast<const uint4*>(x + (long long)m * D);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const int vi = base + k * 32 + lane;
                if (vi < nvec) {
                    const uint4 xv = __ldg(xg + vi);
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) s[m][r] = dot8(s[m][r], xv, a[r][k]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float v = warp_sum(s[m][r]);
            if (lane == 0 && j0 + r < H) out[(long long)m * H + j0 + r] = f_to_bf16(v);
        }
}

template __global__ void gemv_kernel<1, 2>(const unsigned short*, const unsigned short*, unsigned short*, int, int);
template __global__ void gemv_kernel<1, 4>(const unsigned short*, const unsigned short*, unsigned short*, int, int);
template __global__ void gemv_kernel<2, 2>(const unsigned short*, const unsigned short*, unsigned short*, int, int);
