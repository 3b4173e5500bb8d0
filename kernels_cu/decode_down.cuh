// The down half of the decode kernels (twell_decode.cu, decode_fused.cu): one block per (token, D-chunk) sums
// its token's entries (j, h) against rows of DownT, for the chunk's columns only, in a fixed order (so the
// result is bitwise reproducible and the same whichever kernel listed the entries).
#pragma once
#include "common.cuh"

#define DECODE_THREADS 512
#define DECODE_CAP 1024  // entries per batch in shared memory; longer lists are processed in batches

// offs[0..n) := exclusive scan of offs[0..n), offs[n] := the total. Called by one whole warp.
__device__ __forceinline__ void warp_exclusive_scan(int* offs, int n, int lane) {
    int carry = 0;
    for (int base = 0; base < n; base += 32) {
        const int v = base + lane < n ? offs[base + lane] : 0;
        const int incl = warp_incl_scan(v, lane);
        if (base + lane < n) offs[base + lane] = carry + incl - v;
        carry += __shfl_sync(SPARSIFY_FULL_MASK, incl, 31);
    }
    if (lane == 0) offs[n] = carry;
}

// The block's chunk of D: column vectors (8 columns each) [v_beg, v_end), CVr = the chunk's width rounded up to
// a multiple of 32 (<= DECODE_THREADS / 2, see the launchers' decode_chunks).
struct DecodeChunk {
    int v_beg, v_end, CVr;
    __device__ __forceinline__ DecodeChunk(int D) {
        const int nvec = D >> 3;
        const int CV = (nvec + gridDim.y - 1) / gridDim.y;
        CVr = (CV + 31) & ~31;
        v_beg = blockIdx.y * CV;
        v_end = min(nvec, v_beg + CV);
    }
};

// accrow[0 .. CVr*8) += Σ_{e < nb} eh[e] · DownT[ej[e]] over the chunk's columns (ej, eh, accrow, part in shared
// memory; part holds DECODE_THREADS * 8 floats). G = DECODE_THREADS / CVr groups of CVr threads: group g owns a
// contiguous share of the entries, thread v of a group one column vector; 8 row loads in flight per thread;
// the groups' partial sums are added in group order. Every thread of the block calls it; it ends synchronized.
__device__ __forceinline__ void decode_down_batch(const int* ej, const float* eh, int nb,
                                                  const unsigned short* __restrict__ down_t, int D,
                                                  const DecodeChunk& ch, float* accrow, float* part) {
    const int tid = threadIdx.x, CVr = ch.CVr;
    const int G = DECODE_THREADS / CVr;
    const int g = tid / CVr, v = tid % CVr, vi = ch.v_beg + v;
    const int per = (nb + G - 1) / G;
    const int e_beg = min(nb, g * per), e_end = min(nb, e_beg + per);
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    if (g < G && vi < ch.v_end) {
        int e = e_beg;
        for (; e + 8 <= e_end; e += 8) {
            uint4 q[8];
#pragma unroll
            for (int u = 0; u < 8; ++u)
                q[u] = __ldg(reinterpret_cast<const uint4*>(down_t + (long long)ej[e + u] * D) + vi);
#pragma unroll
            for (int u = 0; u < 8; ++u) axpy8(acc, eh[e + u], q[u]);
        }
        uint4 q[8];
#pragma unroll
        for (int u = 0; u < 8; ++u)
            q[u] = e + u < e_end ? __ldg(reinterpret_cast<const uint4*>(down_t + (long long)ej[e + u] * D) + vi)
                                 : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (e + u < e_end) axpy8(acc, eh[e + u], q[u]);
    }
    if (g < G) {
#pragma unroll
        for (int i = 0; i < 8; ++i) part[(g * CVr + v) * 8 + i] = acc[i];
    }
    __syncthreads();
    for (int idx = tid; idx < CVr * 8; idx += DECODE_THREADS) {
        float sum = accrow[idx];
        for (int gg = 0; gg < G; ++gg) sum += part[gg * CVr * 8 + idx];
        accrow[idx] = sum;
    }
    __syncthreads();
}

// out_row's chunk := accrow rounded to bf16 (once).
__device__ __forceinline__ void decode_store_chunk(const float* accrow, unsigned short* __restrict__ out_row,
                                                   const DecodeChunk& ch) {
    uint4* og = reinterpret_cast<uint4*>(out_row);
    for (int vi = ch.v_beg + threadIdx.x; vi < ch.v_end; vi += DECODE_THREADS) {
        const float* a8 = accrow + 8 * (vi - ch.v_beg);
        og[vi] = make_uint4(pack_bf16x2(a8[0], a8[1]), pack_bf16x2(a8[2], a8[3]), pack_bf16x2(a8[4], a8[5]),
                            pack_bf16x2(a8[6], a8[7]));
    }
}
