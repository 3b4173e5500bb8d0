// out = x · Wᵀ for very few tokens (decode, M <= 2): x (M, D), W (H, D), out (M, H), bf16 in and out, fp32 sums.
//
// Memory-bound: W is read once. One warp per ROWS rows of W; lane l owns the 16-byte vectors l, l+32, ... of
// each 2048-column chunk; the ROWS x 8 row loads (and the M x 8 x loads, L1-resident) of a chunk are issued
// before any arithmetic (ROWS * 4 KB per warp in flight). ROWS = 4 with 12 warps/SM keeps H = 5632 rows in a
// single wave (1408 warps <= 1584 slots); ROWS = 2 needed 1.33 waves and lost to cuBLAS (BENCHMARKS.md).
#include "gemv.cuh"

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
    float s[MT][ROWS];
    gemv_partial<MT, ROWS>(x, w, j0, H, D, lane, s);
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
