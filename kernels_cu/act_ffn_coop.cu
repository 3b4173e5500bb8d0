// Sparse FFN up/down projection straight from the dense activation (prefill), a token's work shared by TW warps.
//
//   gated:  for each token m and active column j >= c_start (relu(act[m, j]) != 0):  h = a * (x_m . U_j)
//   plain:  h = a;   in both:  out_m = init_m + sum_j h * DownT_j   (fp32 sums, one bf16 rounding)
//
// The same function, the same sums in the same order, as twell_ffn_kernel<NV, GATED, FROM_ACT=true> (one warp per
// token), so the same bits (GPU test). That kernel holds a whole 2048-column row of accumulators per lane (64
// registers), which caps it at 16 warps per SM, and one warp walks the token's whole latency chain (scan the
// activation row, then the up dots, then the down rows); ncu found it latency-bound (BENCHMARKS.md, session 8).
// Here the TW warps of a token group split all three phases:
//   scan:    warp w lists the active columns of its contiguous part of [c_start, H) into its own list;
//   phase A: the group's listed entries are dealt round-robin over its warps, h into shared memory;
//   phase B: warp w accumulates every entry's DownT row over its own D-chunk (256 * NV columns, NV vectors per
//            lane), in the lists' order: ascending column, as the one-warp kernel.
// Fewer accumulators per lane (8 * NV) let more warps reside per SM. A group's warps meet at a named barrier
// (one per group, so groups of a block never wait for each other); a list holds up to COOP_CAP entries, more go
// in further passes, so any number of active columns is handled exactly.
// Template parameters: NV (vectors per lane per chunk), GATED, TW (warps per token: 2 or 4).
#include "common.cuh"

#define COOP_WARPS 4  // warps per block: 4 / TW token groups
#ifndef COOP_MIN_BLOCKS
#define COOP_MIN_BLOCKS 5  // blocks per SM the register budget is cut for (5 x 4 warps: <= 102 registers)
#endif
#define COOP_CAP 1024  // entries one warp's list holds per pass (>= one 512-column scan step)

// The named barrier of token group `group` (barrier 1 + group; 0 is __syncthreads') over its TW warps. Immediate
// barrier ids: with a register id the compiler reserves all 16 of the block's barriers.
template <int TW>
__device__ __forceinline__ void group_sync(int group) {
    static_assert(COOP_WARPS / TW <= 4, "barrier ids 1..4");
    switch (group) {
        case 0: asm volatile("bar.sync 1, %0;" ::"n"(32 * TW) : "memory"); break;
        case 1: asm volatile("bar.sync 2, %0;" ::"n"(32 * TW) : "memory"); break;
        case 2: asm volatile("bar.sync 3, %0;" ::"n"(32 * TW) : "memory"); break;
        default: asm volatile("bar.sync 4, %0;" ::"n"(32 * TW) : "memory"); break;
    }
}

template <int NV, bool GATED, int TW>
__global__ void __launch_bounds__(COOP_WARPS * 32, COOP_MIN_BLOCKS) act_ffn_coop_kernel(
    const unsigned short* __restrict__ x,       // (M, D)
    const unsigned short* __restrict__ up,      // (H, D)   (unused when !GATED)
    const unsigned short* __restrict__ down_t,  // (H, D)
    const unsigned short* __restrict__ act,     // (M, H)   dense activation (relu applied here)
    unsigned short* __restrict__ out,           // (M, D)
    long long M, int D, int H, int vec_ok,
    int c_start,                                // first column listed (hybrid: hot columns before it)
    const unsigned short* __restrict__ init) {  // (M, D) or null: added to the result (hybrid: the hot part)
    static_assert(COOP_WARPS % TW == 0, "whole token groups per block");
    constexpr int GROUPS = COOP_WARPS / TW;
    __shared__ unsigned int s_word[COOP_WARPS][COOP_CAP];
    __shared__ float s_h[COOP_WARPS][COOP_CAP];
    __shared__ int s_count[COOP_WARPS];  // entries in each warp's list this pass
    __shared__ int s_more[COOP_WARPS];   // each warp: columns of its part left for another pass
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = warp / TW, w = warp % TW;  // token group, and this warp's rank in it
    const long long m = (long long)blockIdx.x * GROUPS + group;
    if (m >= M) return;  // the whole group leaves: nobody waits at its barrier
    const int DC = 256 * NV;                                     // this warp's D-chunk
    const int d0 = (blockIdx.y * TW + w) * DC;
    const int nvec_c = d0 < D ? min(DC, D - d0) >> 3 : 0;        // its 16-byte vectors (0: scan and dots only)
    const int nvec_d = D >> 3;
    const uint4* xg = reinterpret_cast<const uint4*>(x + m * D);
    const unsigned short* arow = act + m * (long long)H;
    // this warp's contiguous part of the columns, a multiple of 8 wide
    const int part = ((H - c_start + TW - 1) / TW + 7) & ~7;
    const int c_end = min(H, c_start + (w + 1) * part);
    int cnext = min(H, c_start + w * part);

    float acc[8 * NV];
#pragma unroll
    for (int i = 0; i < 8 * NV; ++i) acc[i] = 0.f;
    if (init != nullptr) warp_load_bf16<NV, true>(acc, init + m * D + d0, nvec_c, lane);

    const int first = group * TW;  // the block-wide index of the group's first warp
    bool more = true;
    while (more) {
        // ---- scan: this warp's part, 512 columns a step, while a whole step still fits in its list
        unsigned int* lw = s_word[warp];
        int E = 0;
        while (cnext < c_end && E <= COOP_CAP - 512) {
            const int step_end = min(c_end, cnext + 512);
            const int base = E;
            E += warp_for_each_active<true>(arow, cnext, step_end, vec_ok != 0, lane,
                                            [&](int r, int col, unsigned short b) {
                                                lw[base + r] = ((unsigned int)col << 16) | (unsigned int)b;
                                            });
            cnext = step_end;
        }
        if (lane == 0) {
            s_count[warp] = E;
            s_more[warp] = cnext < c_end ? 1 : 0;
        }
        group_sync<TW>(group);
        // ---- phase A: h of every listed entry of the group, dealt round-robin over its warps
        int n[TW];
#pragma unroll
        for (int v = 0; v < TW; ++v) n[v] = s_count[first + v];
        if (GATED) {
            int gbase = 0;  // the group-wide index of list v's first entry
#pragma unroll
            for (int v = 0; v < TW; ++v) {
                const unsigned int* vw = s_word[first + v];
                float* vh = s_h[first + v];
                // first k with (gbase + k) % TW == w; one row in flight per warp (8 loads per lane), as in the
                // one-warp kernel: two would not fit the register budget beside the accumulators
                for (int k = ((w - gbase) % TW + TW) % TW; k < n[v]; k += TW) {
                    const unsigned int wd = vw[k];
                    const float u = warp_dot(xg, reinterpret_cast<const uint4*>(up + (long long)(wd >> 16) * D),
                                             nvec_d, lane);
                    if (lane == 0) vh[k] = bf16_to_f((unsigned short)(wd & 0xffffu)) * u;
                }
                gbase += n[v];
            }
        } else {
            for (int k = lane; k < n[w]; k += 32) s_h[warp][k] = bf16_to_f((unsigned short)(s_word[warp][k] & 0xffffu));
        }
        group_sync<TW>(group);
        // ---- phase B: every entry's DownT row over this warp's chunk, lists in order (ascending column)
        if (nvec_c > 0) {
#pragma unroll
            for (int v = 0; v < TW; ++v) {
                const unsigned int* vw = s_word[first + v];
                const float* vh = s_h[first + v];
                warp_down_rows<NV>(acc, down_t, D, d0, nvec_c, lane, n[v], [&](int e) { return (int)(vw[e] >> 16); },
                                   [&](int e) { return vh[e]; });
            }
        }
        more = false;
#pragma unroll
        for (int v = 0; v < TW; ++v) more = more || s_more[first + v] != 0;
        group_sync<TW>(group);  // lists, counts and flags are read: the next pass may overwrite them
    }
    if (nvec_c > 0) warp_store_bf16<NV, true>(out + m * D + d0, acc, nvec_c, lane);
}

#define SPARSIFY_COOP_INST(NV, G, TW)                                                                         \
    template __global__ void act_ffn_coop_kernel<NV, G, TW>(const unsigned short*, const unsigned short*,     \
                                                             const unsigned short*, const unsigned short*,     \
                                                             unsigned short*, long long, int, int, int, int, \
                                                             const unsigned short*);
SPARSIFY_COOP_INST(1, true, 2)
SPARSIFY_COOP_INST(2, true, 2)
SPARSIFY_COOP_INST(4, true, 2)
SPARSIFY_COOP_INST(1, false, 2)
SPARSIFY_COOP_INST(2, false, 2)
SPARSIFY_COOP_INST(4, false, 2)
SPARSIFY_COOP_INST(1, true, 4)
SPARSIFY_COOP_INST(2, true, 4)
SPARSIFY_COOP_INST(1, false, 4)
SPARSIFY_COOP_INST(2, false, 4)
