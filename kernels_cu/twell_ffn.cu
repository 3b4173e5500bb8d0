// Sparse FFN up/down projection reading TwELL (prefill: many tokens).
//
//   gated:  for each token m and entry (j, a) of its TwELL row:  h = a * (x_m . U_j);  out_m += h * DownT_j
//   plain:  out_m += a * DownT_j
// U and DownT are [H, D] bf16 row-major (DownT = Down^T, laid out offline), x/out are [M, D] bf16.
// Accumulation is fp32, out is rounded to bf16 once.
//
// Mapping: one warp per token and D-chunk (blockIdx.y); lane l owns the 16-byte vectors l, l+32, ... of the
// chunk, so every row read is one coalesced 512-byte sweep per 8 vectors. The warps of a block walk the tiles
// in lockstep (one __syncthreads per tile) so that the rows of neurons co-active in the block's tokens are
// served from L1 instead of L2.
//
// Overflowed tiles (true count > K = S - 1) are computed EXACTLY from `act`, the dense activation the words
// were packed from (relu applied here): the warp scans that tile's T columns and uses every non-zero.
//
// Template parameters: NV = 16-byte vectors per lane per chunk (chunk width DC = 256 * NV columns),
// GATED, XREG = the whole of x_m fits the chunk (single chunk): x is held in registers; otherwise the up dot
// loops over all of D reading x from global memory (L1-resident).
#include "common.cuh"

template <int NV, bool XREG>
__device__ __forceinline__ float up_dot(const uint4* xr, const uint4* __restrict__ xg, const uint4* __restrict__ ug,
                                        int nvec_d, int lane) {
    float s = 0.f;
    if (XREG) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int vi = k * 32 + lane;
            if (vi < nvec_d) s = dot8(s, xr[k], __ldg(ug + vi));
        }
    } else {
        for (int vi = lane; vi < nvec_d; vi += 32) s = dot8(s, __ldg(xg + vi), __ldg(ug + vi));
    }
    return warp_sum(s);
}

template <int NV, bool GATED, bool XREG>
__device__ __forceinline__ void ffn_entry(int j, float a, float* acc, const uint4* xr, const uint4* __restrict__ xg,
                                          const unsigned short* __restrict__ up,
                                          const unsigned short* __restrict__ down_t, int D, int d0, int nvec_d,
                                          int nvec_c, int lane) {
    const uint4* dg = reinterpret_cast<const uint4*>(down_t + (long long)j * D + d0);
    uint4 dq[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int vi = k * 32 + lane;
        dq[k] = vi < nvec_c ? __ldg(dg + vi) : make_uint4(0u, 0u, 0u, 0u);
    }
    float h = a;
    if (GATED) {
        const uint4* ug = reinterpret_cast<const uint4*>(up + (long long)j * D);
        h = a * up_dot<NV, XREG>(xr, xg, ug, nvec_d, lane);
    }
#pragma unroll
    for (int k = 0; k < NV; ++k) axpy8(acc + 8 * k, h, dq[k]);
}

template <int NV, bool GATED, bool XREG>
__global__ void __launch_bounds__(256) twell_ffn_kernel(
    const unsigned short* __restrict__ x,       // (M, D)
    const int* __restrict__ words,              // (M, NT, S)
    const unsigned short* __restrict__ up,      // (H, D)   (unused when !GATED)
    const unsigned short* __restrict__ down_t,  // (H, D)
    const unsigned short* __restrict__ act,     // (M, H)   dense activation, read for overflowed tiles only
    unsigned short* __restrict__ out,           // (M, D)
    long long M, int D, int H, int NT, int S, int T) {
    const int lane = threadIdx.x & 31;
    const long long m = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bool live = m < M;
    const long long mm = live ? m : 0;
    const int DC = 256 * NV;
    const int d0 = blockIdx.y * DC;
    const int nvec_d = D >> 3;                                   // 16-byte vectors in a row
    const int nvec_c = min(DC, D - d0) >> 3;                     // ... in this chunk
    const int K = S - 1;

    const uint4* xg = reinterpret_cast<const uint4*>(x + mm * D);
    uint4 xr[XREG ? NV : 1];
    if (XREG) {
#pragma unroll
        for (int k = 0; k < (XREG ? NV : 1); ++k) {
            const int vi = k * 32 + lane;
            xr[k] = vi < nvec_d ? __ldg(xg + vi) : make_uint4(0u, 0u, 0u, 0u);
        }
    }
    float acc[8 * NV];
#pragma unroll
    for (int i = 0; i < 8 * NV; ++i) acc[i] = 0.f;

    const int* wrow = words + mm * (long long)NT * S;
    for (int t = 0; t < NT; ++t) {
        if (live) {
            const int* tw = wrow + (long long)t * S;
            const int cnt = __ldg(tw);
            if (cnt <= K) {
                for (int g = 0; g < cnt; g += 32) {
                    const int mine = (g + lane < cnt) ? __ldg(tw + 1 + g + lane) : 0;
                    const int ng = min(32, cnt - g);
                    for (int i = 0; i < ng; ++i) {
                        const unsigned int w = (unsigned int)__shfl_sync(SPARSIFY_FULL_MASK, mine, i);
                        ffn_entry<NV, GATED, XREG>((int)(w >> 16), bf16_to_f((unsigned short)(w & 0xffffu)), acc,
                                                   xr, xg, up, down_t, D, d0, nvec_d, nvec_c, lane);
                    }
                }
            } else {  // overflowed tile: exact, from the dense activation
                const unsigned short* arow = act + mm * (long long)H;
                const int c_end = min(H, (t + 1) * T);
                for (int c = t * T; c < c_end; c += 32) {
                    const int col = c + lane;
                    const unsigned short b = col < c_end ? arow[col] : (unsigned short)0;
                    unsigned int bal = __ballot_sync(SPARSIFY_FULL_MASK, relu_active(b));
                    while (bal) {
                        const int src = __ffs(bal) - 1;
                        bal &= bal - 1;
                        const unsigned short bb = (unsigned short)__shfl_sync(SPARSIFY_FULL_MASK, (int)b, src);
                        ffn_entry<NV, GATED, XREG>(c + src, bf16_to_f(bb), acc, xr, xg, up, down_t, D, d0, nvec_d,
                                                   nvec_c, lane);
                    }
                }
            }
        }
        __syncthreads();  // keep the block's warps on the same tile (L1 reuse of shared rows)
    }
    if (!live) return;
    uint4* og = reinterpret_cast<uint4*>(out + m * D + d0);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int vi = k * 32 + lane;
        if (vi < nvec_c) {
            const float* a8 = acc + 8 * k;
            og[vi] = make_uint4(pack_bf16x2(a8[0], a8[1]), pack_bf16x2(a8[2], a8[3]), pack_bf16x2(a8[4], a8[5]),
                                pack_bf16x2(a8[6], a8[7]));
        }
    }
}

#define SPARSIFY_FFN_INST(NV, G, XR)                                                                        \
    template __global__ void twell_ffn_kernel<NV, G, XR>(const unsigned short*, const int*, const unsigned short*, \
                                                         const unsigned short*, const unsigned short*,          \
                                                         unsigned short*, long long, int, int, int, int, int);
SPARSIFY_FFN_INST(8, true, true)
SPARSIFY_FFN_INST(8, false, true)
SPARSIFY_FFN_INST(8, true, false)
SPARSIFY_FFN_INST(8, false, false)
