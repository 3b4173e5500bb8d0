// The gemv sweep shared by gemv.cu and decode_fused.cu (so their gate values are the same bits).
#pragma once
#include "common.cuh"

// s[m][r] = this lane's partial sum of x_m · W_{j0+r} (rows past H read row H - 1; the caller ignores them):
// lane l owns the 16-byte vectors l, l + 32, ... of each 2048-column sweep, whose ROWS x 8 row loads are issued
// before any arithmetic (ROWS * 4 KB per warp in flight; x is expected to be L1-resident). warp_sum the result.
template <int MT, int ROWS>
__device__ __forceinline__ void gemv_partial(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                             int j0, int H, int D, int lane, float (&s)[MT][ROWS]) {
    const int nvec = D >> 3;
    const uint4* wr[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) wr[r] = reinterpret_cast<const uint4*>(w + (long long)min(j0 + r, H - 1) * D);
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
}
