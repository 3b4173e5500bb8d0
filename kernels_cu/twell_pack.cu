// ReLU + TwELL packing of an activation [M, H] bf16 (docs/TWELL_SPEC_DRAFT.md, TwELL v1).
//
// One warp per (token m, tile t). Lane l owns the EPL = T/32 consecutive columns t*T + l*EPL ...; a warp
// prefix sum of the per-lane non-zero counts gives each lane its first slot, so entries land in ascending
// column order. words[m, t, 0] = the TRUE count (may exceed K = S - 1); only the first K entries are stored;
// unused slots are zeroed. Columns >= H (the padded last tile) count as zero.
#include "common.cuh"

template <int EPL>
__global__ void twell_pack_kernel(const unsigned short* __restrict__ act,  // (M, H) bf16 bits
                                  int* __restrict__ words,                // (M, NT, S)
                                  long long M, int H, int NT, int S, int vec_ok) {
    const int lane = threadIdx.x & 31;
    const long long gw = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (gw >= M * NT) return;
    const long long m = gw / NT;
    const int t = (int)(gw - m * NT);
    const int K = S - 1;
    const int c0 = t * (EPL * 32) + lane * EPL;
    const unsigned short* row = act + m * (long long)H;

    unsigned short v[EPL];
    if constexpr (EPL == 8) {
        load8(row, c0, H, vec_ok != 0, v);  // one 16-byte load when aligned and inside the row
    } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) v[e] = (c0 + e < H) ? row[c0 + e] : (unsigned short)0;
    }

    unsigned int nzmask = 0;
    int n = 0;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
        if (relu_active(v[e])) { nzmask |= 1u << e; ++n; }
    }
    const int incl = warp_incl_scan(n, lane);
    const int total = __shfl_sync(SPARSIFY_FULL_MASK, incl, 31);
    int slot = 1 + incl - n;
    int* out = words + gw * (long long)S;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
        if (nzmask & (1u << e)) {
            if (slot <= K) out[slot] = (int)(((unsigned int)(c0 + e) << 16) | (unsigned int)v[e]);
            ++slot;
        }
    }
    const int stored = total < K ? total : K;
    for (int s = 1 + stored + lane; s < S; s += 32) out[s] = 0;
    if (lane == 0) out[0] = total;
}

template __global__ void twell_pack_kernel<1>(const unsigned short*, int*, long long, int, int, int, int);
template __global__ void twell_pack_kernel<2>(const unsigned short*, int*, long long, int, int, int, int);
template __global__ void twell_pack_kernel<4>(const unsigned short*, int*, long long, int, int, int, int);
template __global__ void twell_pack_kernel<8>(const unsigned short*, int*, long long, int, int, int, int);
template __global__ void twell_pack_kernel<16>(const unsigned short*, int*, long long, int, int, int, int);
template __global__ void twell_pack_kernel<32>(const unsigned short*, int*, long long, int, int, int, int);
