// Sparse FFN up/down projection reading TwELL (prefill: many tokens).
//
//   gated:  for each token m and entry (j, a) of its TwELL row:  h = a * (x_m . U_j);  out_m += h * DownT_j
//   plain:  out_m += a * DownT_j
// U and DownT are [H, D] bf16 row-major (DownT = Down^T, laid out offline), x/out are [M, D] bf16.
// Accumulation is fp32, out is rounded to bf16 once.
//
// Mapping: one warp per token and D-chunk (blockIdx.y); lane l owns the 16-byte vectors l, l+32, ... of the
// chunk, so every row read is one coalesced 512-byte sweep per 8 vectors. Per batch of up to FFN_CAP entries:
//   gather: tile counts for 32 tiles in one load, a warp prefix sum places each tile's entries in a per-warp
//           shared-memory list (slot loads of 4 tiles in flight);
//   phase A (gated): h_e = a_e * (x_m . U_j) for every listed entry (x_m re-read from a copy in shared memory);
//   phase B: acc += h_e * DownT_j[chunk], two rows in flight; acc stays in registers across batches.
// Splitting A and B keeps at most one set of row registers live beside the accumulators (128 registers,
// 16 warps per SM, no spills), so the loads of many warps overlap.
//
// Overflowed tiles (true count > K = S - 1) are computed EXACTLY from `act`, the dense activation the words
// were packed from (relu applied here): the warp scans that tile's T columns and lists every non-zero.
//
// FROM_ACT = true fuses the packing: the list is built straight from the dense activation row (relu applied),
// `words` is null or a list (below). (Without a GEMM epilogue that writes TwELL, this saves the pack kernel's pass.)
// Hybrid use (neurons permuted hot-first at pack time): FROM_ACT lists only columns >= c_start, and `init`
// (the hot neurons' part, computed densely by cuBLAS) is added to the accumulators. FROM_ACT with `words` given:
// the row's entries come listed by relu_list.cu (words (M, S): count, then up to S - 1 words), not scanned.
//
// Template parameters: NV = 16-byte vectors per lane per chunk (chunk width DC = 256 * NV columns), GATED,
// FROM_ACT.
#include "common.cuh"

#define FFN_WARPS 4
#ifndef FFN_MIN_BLOCKS
#define FFN_MIN_BLOCKS 3  // blocks per SM the register budget is cut for (3 x 4 warps: <= 168 registers)
#endif
#define FFN_CAP 1024  // entries gathered per warp and batch (>= any tile's count: T <= 1024)
#ifndef FFN_ACT_CAP
#define FFN_ACT_CAP 512  // FROM_ACT's per-warp list (>= 512: one scan step per batch); half of FFN_CAP leaves the
// block's shared memory room for wider x rows (below). Same speed as 1024 on an H200 (BENCHMARKS.md, session 15)
#endif
// The gated up dots read the token's x row from a copy in shared memory, FFN_X_SMEM (TwELL) or FFN_ACT_X_SMEM
// (FROM_ACT) columns per warp at most; wider rows read it through L1. Every entry's up dot re-reads x, and through
// L1 the weight rows streaming past evicted it: Nsight Compute on the hybrid's cold kernel (M = 65536, nnz 29)
// showed a 22% L1 hit rate and 1 GB of the 8.6 GB of L2 traffic going to x re-reads; with the copy the kernel took
// 20% less time (H200, BENCHMARKS.md, session 15). 0 turns the copy off; the values are the same either way.
// Static shared memory per block: FFN_WARPS * (CAP * 8 + X * 2) bytes, at most 48 KB.
#ifndef FFN_X_SMEM
#define FFN_X_SMEM 2048
#endif
#ifndef FFN_ACT_X_SMEM
#define FFN_ACT_X_SMEM 4096
#endif
#ifndef FFN_UP_PAIRS
// 1: a row listed by relu_list.cu takes its up dots two at a time, two U rows in flight per lane where one was,
// before the accumulators are live (with them live, two rows spill at 128 registers); same bits. The kernel is
// latency-bound (~20% of the warp slots filled, each token's ~10 cold up dots one dependent L2 round trip after
// another): H200, packed layer, nnz 29, the kernel alone 0.839 -> 0.734 ms at M = 65536 and 0.285 -> 0.245 at
// 16384, the hybrid block 2.99 -> 2.72 and 0.830 -> 0.770 (BENCHMARKS.md, session 16). 0: one at a time, in the
// batch loop below
#define FFN_UP_PAIRS 1
#endif
#ifndef FFN_ACT_PREFETCH
#define FFN_ACT_PREFETCH 1  // 1 (FROM_ACT): the warp asks L2 for its token's activation row [c_start, H) on entry,
// so the listing's steps wait on L2, not DRAM. H200: 2-8% off the kernel alone at every shape; the whole hybrid
// block faster in 11 of 12 shapes over four interleaved rounds (up to 6.5%), 0.2-0.8% slower at M = 65536, nnz 112,
// where the burst of row prefetches evicts weight rows behind the large hot GEMMs (BENCHMARKS.md, sessions 8, 9)
#endif
#ifndef FFN_STREAM_HINTS
#define FFN_STREAM_HINTS 1  // the activation scan, init and out go evict-first (ld/st.global.cs, common.cuh): 5-10% off
// the hybrid's sparse kernel at 65536 tokens, 0-4% at 16384 (H200, BENCHMARKS.md); 0: plain loads and stores
#endif

template <int NV, bool GATED, bool FROM_ACT, bool HBUF>
__global__ void __launch_bounds__(FFN_WARPS * 32, FFN_MIN_BLOCKS) twell_ffn_kernel(
    const unsigned short* __restrict__ x,       // (M, D)
    const int* __restrict__ words,              // (M, NT, S); FROM_ACT: null or a list (M, S)
    const unsigned short* __restrict__ up,      // (H, D)   (unused when !GATED)
    const unsigned short* __restrict__ down_t,  // (H, D)
    const unsigned short* __restrict__ act,     // (M, H)   dense activation, read for overflowed tiles only
    unsigned short* __restrict__ out,           // (M, D)
    long long M, int D, int H, int NT, int S, int T, int vec_ok,
    const float* __restrict__ hbuf,              // (M, NT, S) h per stored slot, from twell_up_kernel (HBUF only)
    int c_start,                                 // FROM_ACT: first column listed (hybrid: hot columns before it)
    const unsigned short* __restrict__ init) {   // (M, D) or null: added to the result (hybrid: the hot part)
    constexpr int CAP = FROM_ACT ? FFN_ACT_CAP : FFN_CAP;
    constexpr int XCAP = (GATED && !HBUF) ? (FROM_ACT ? FFN_ACT_X_SMEM : FFN_X_SMEM) : 0;  // x columns in smem
    static_assert(XCAP % 8 == 0 && FFN_WARPS * (CAP * 8 + XCAP * 2) <= 48 * 1024, "static shared memory");
    __shared__ unsigned int s_word[FFN_WARPS][CAP];
    __shared__ float s_h[FFN_WARPS][CAP];
    __shared__ uint4 s_x[FFN_WARPS][XCAP > 0 ? XCAP / 8 : 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long m = (long long)blockIdx.x * FFN_WARPS + warp;
    if (m >= M) return;
    unsigned int* lw = s_word[warp];
    float* lh = s_h[warp];
    const int DC = 256 * NV;
    const int d0 = blockIdx.y * DC;
    const int nvec_d = D >> 3;                // 16-byte vectors in a row
    const int nvec_c = min(DC, D - d0) >> 3;  // ... in this chunk
    const int K = S - 1;

    const uint4* xg = reinterpret_cast<const uint4*>(x + m * D);
    const bool x_shared = XCAP > 0 && D <= XCAP;  // the same for every warp of the launch
    if (x_shared) {
        for (int i = lane; i < nvec_d; i += 32) s_x[warp][i] = __ldg(xg + i);
        __syncwarp();
    }
    auto up_dot = [&](const uint4* ug) {  // x_m . U_j, x from its copy when there is one
        return x_shared ? warp_dot<true>(s_x[warp], ug, nvec_d, lane) : warp_dot(xg, ug, nvec_d, lane);
    };
    const unsigned short* arow = act + m * (long long)H;
    // FROM_ACT with `words`: the token's cold entries were listed by relu_list.cu into words[m] = [count, words...]
    // (S - 1 at most). The whole row is copied to the warp's list without waiting for the count, so its loads are
    // in flight together (words past the count are not used). A row whose count exceeds S - 1 is scanned from act,
    // and so is every row when the list is longer than this build's per-warp list (FFN_ACT_CAP).
    int listed = -1;  // entries in the list, or -1: scan act
    // (the launcher keeps S - 1 <= FFN_CAP, so the test is only compiled in a build with a shorter FROM_ACT list)
    if (FROM_ACT && words != nullptr && (FFN_ACT_CAP >= FFN_CAP || S - 1 <= CAP)) {
        const int* lrow = words + m * (long long)S;
        const int n = __ldg(lrow);  // the same word for every lane: one broadcast load
        for (int i = lane; i < S - 1; i += 32) lw[i] = (unsigned int)__ldg(lrow + 1 + i);
        if (n <= S - 1) listed = n;
    }
    // the listing's scan walks the row 512 columns at a time, each step a dependent DRAM round trip: with the row
    // already on its way to L2, the steps wait for L2 instead (aligned rows only: vec_ok means H % 8 == 0)
    if (FROM_ACT && FFN_ACT_PREFETCH && vec_ok && listed < 0)
        warp_prefetch_l2(arow + c_start, (H - c_start) * 2, lane);
#if FFN_UP_PAIRS
    if (FROM_ACT && GATED && listed >= 0) {
        // A listed row is one batch, so its up dots can all run before the accumulators are live, two U rows in
        // flight (with the accumulators live, two rows spill at 128 registers). init is asked of L2 now and
        // loaded after them. The same sums in the same order as the batch loop below: the same bits.
        if (init != nullptr) warp_prefetch_l2(init + m * D + d0, nvec_c * 16, lane);
        __syncwarp();
        int e = 0;
        for (; e + 1 < listed; e += 2) {  // each dot summed as warp_dot sums it
            const unsigned int w0 = lw[e], w1 = lw[e + 1];
            const uint4* u0 = reinterpret_cast<const uint4*>(up + (long long)(w0 >> 16) * D);
            const uint4* u1 = reinterpret_cast<const uint4*>(up + (long long)(w1 >> 16) * D);
            float s0, s1;
            if (x_shared)
                warp_dot2<true>(s_x[warp], u0, u1, nvec_d, lane, s0, s1);
            else
                warp_dot2(xg, u0, u1, nvec_d, lane, s0, s1);
            if (lane == 0) {
                lh[e] = bf16_to_f((unsigned short)(w0 & 0xffffu)) * s0;
                lh[e + 1] = bf16_to_f((unsigned short)(w1 & 0xffffu)) * s1;
            }
        }
        if (e < listed) {
            const unsigned int w = lw[e];
            const uint4* ug = reinterpret_cast<const uint4*>(up + (long long)(w >> 16) * D);
            const float u = up_dot(ug);
            if (lane == 0) lh[e] = bf16_to_f((unsigned short)(w & 0xffffu)) * u;
        }
        __syncwarp();
        float acc[8 * NV];
#pragma unroll
        for (int i = 0; i < 8 * NV; ++i) acc[i] = 0.f;
        if (init != nullptr) warp_load_bf16<NV, FFN_STREAM_HINTS != 0>(acc, init + m * D + d0, nvec_c, lane);
        warp_down_rows<NV>(acc, down_t, D, d0, nvec_c, lane, listed, [&](int i) { return (int)(lw[i] >> 16); },
                           [&](int i) { return lh[i]; });
        warp_store_bf16<NV, FFN_STREAM_HINTS != 0>(out + m * D + d0, acc, nvec_c, lane);
        return;
    }
#endif
    float acc[8 * NV];
#pragma unroll
    for (int i = 0; i < 8 * NV; ++i) acc[i] = 0.f;
    if (init != nullptr) warp_load_bf16<NV, FFN_STREAM_HINTS != 0>(acc, init + m * D + d0, nvec_c, lane);

    const int* wrow = words + m * (long long)NT * S;
    const float* hrow = hbuf + m * (long long)NT * S;  // only dereferenced when HBUF
    int t = 0;      // next tile (TwELL)
    int cnext = c_start;  // next column (FROM_ACT)
    while (FROM_ACT ? cnext < H : t < NT) {
        // ---- gather: the entries of the next tiles (up to FFN_CAP) into this warp's list, 32 tiles at a time.
        // A tile's true count decides where its entries go; overflowed tiles are read from act (exact).
        int E = 0;
        bool full = false;
        if (FROM_ACT && listed >= 0) {  // listed by relu_list.cu (loaded above): one batch
            E = listed;
            cnext = H;
        } else if (FROM_ACT) {  // fused pack: list the row's non-zeros straight from act, 512 columns at a time
            while (cnext < H && E <= CAP - 512) {
                const int c_end = min(H, cnext + 512);
                const int base = E;
                E += warp_for_each_active<FFN_STREAM_HINTS != 0>(arow, cnext, c_end, vec_ok != 0, lane,
                                          [&](int r, int col, unsigned short b) {
                                              lw[base + r] = ((unsigned int)col << 16) | (unsigned int)b;
                                          });
                cnext = c_end;
            }
            full = true;
        }
        while (!FROM_ACT && t < NT && !full) {
            const int tl = t + lane;
            const int n = tl < NT ? __ldg(wrow + (long long)tl * S) : 0;  // true count
            const int incl = warp_incl_scan(n, lane);
            const bool fits = tl < NT && E + incl <= FFN_CAP;  // monotone in lane
            const int nfit = __popc(__ballot_sync(SPARSIFY_FULL_MASK, fits));
            if (nfit < min(32, NT - t)) full = true;
            const int off = E + incl - n;
            for (int k0 = 0; k0 < nfit; k0 += 4) {  // common case: 4 tiles' slot loads in flight per step
                unsigned int w[4];
                float hv[4];
                int dst[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int k = k0 + u;
                    const int nk = __shfl_sync(SPARSIFY_FULL_MASK, n, k & 31);
                    const int ok = __shfl_sync(SPARSIFY_FULL_MASK, off, k & 31);
                    dst[u] = (k < nfit && nk <= K && lane < nk) ? ok + lane : -1;
                    const long long slot = (long long)(t + k) * S + 1 + lane;
                    w[u] = dst[u] >= 0 ? (unsigned int)__ldg(wrow + slot) : 0u;
                    hv[u] = (HBUF && dst[u] >= 0) ? __ldg(hrow + slot) : 0.f;
                }
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    if (dst[u] >= 0) {
                        lw[dst[u]] = w[u];
                        if (HBUF) lh[dst[u]] = hv[u];
                    }
            }
            unsigned int rare = __ballot_sync(SPARSIFY_FULL_MASK, fits && (n > 32 || n > K));
            while (rare) {  // tiles with more than 32 entries: stored ones beyond 32, or overflowed tiles
                const int k = __ffs(rare) - 1;
                rare &= rare - 1;
                const int nk = __shfl_sync(SPARSIFY_FULL_MASK, n, k);
                const int ok = __shfl_sync(SPARSIFY_FULL_MASK, off, k);
                const int tt = t + k;
                if (nk <= K) {
                    for (int i = 32 + lane; i < nk; i += 32) {
                        lw[ok + i] = (unsigned int)__ldg(wrow + (long long)tt * S + 1 + i);
                        if (HBUF) lh[ok + i] = __ldg(hrow + (long long)tt * S + 1 + i);
                    }
                } else {
                    warp_for_each_active(arow, tt * T, min(H, (tt + 1) * T), vec_ok != 0, lane,
                                         [&](int r, int col, unsigned short b) {
                                             if (r < nk) lw[ok + r] = ((unsigned int)col << 16) | (unsigned int)b;
                                         });
                    if (HBUF) {  // the up kernel skips overflowed tiles: their h are computed here
                        __syncwarp();
                        for (int e = ok; e < ok + nk; ++e) {
                            const unsigned int w = lw[e];
                            const float a = bf16_to_f((unsigned short)(w & 0xffffu));
                            const float u = GATED ? warp_dot(xg, reinterpret_cast<const uint4*>(up + (long long)(w >> 16) * D),
                                                             nvec_d, lane)
                                                  : 1.f;
                            if (lane == 0) lh[e] = a * u;
                        }
                    }
                }
            }
            if (nfit > 0) E = __shfl_sync(SPARSIFY_FULL_MASK, E + incl, nfit - 1);
            t += nfit;
        }
        __syncwarp();
        // ---- phase A: h_e = a_e * (x . U_j)   (plain: h_e = a_e; HBUF: already gathered)
        if (HBUF) {
        } else if (GATED) {
            for (int e = 0; e < E; ++e) {
                const unsigned int w = lw[e];
                const uint4* ug = reinterpret_cast<const uint4*>(up + (long long)(w >> 16) * D);
                const float u = up_dot(ug);
                if (lane == 0) lh[e] = bf16_to_f((unsigned short)(w & 0xffffu)) * u;
            }
        } else {
            for (int e = lane; e < E; e += 32) lh[e] = bf16_to_f((unsigned short)(lw[e] & 0xffffu));
        }
        __syncwarp();
        // ---- phase B: acc += h_e * DownT_j[chunk], two rows in flight
        warp_down_rows<NV>(acc, down_t, D, d0, nvec_c, lane, E, [&](int e) { return (int)(lw[e] >> 16); },
                           [&](int e) { return lh[e]; });
        __syncwarp();
    }
    warp_store_bf16<NV, FFN_STREAM_HINTS != 0>(out + m * D + d0, acc, nvec_c, lane);
}

// Phase A alone, as its own kernel (the "split" variant): h = a * (x_m . U_j) for every STORED entry, written
// to hbuf[m, t, 1 + i] (float). Overflowed tiles are skipped (twell_ffn_kernel<..., HBUF=true> computes them).
// Without the accumulators this kernel needs few registers, so more warps and two rows per warp are in flight.
#define UP_WARPS 4
#ifndef UP_MIN_BLOCKS
#define UP_MIN_BLOCKS 5
#endif
#define UP_CAP 1024

__global__ void __launch_bounds__(UP_WARPS * 32, UP_MIN_BLOCKS) twell_up_kernel(
    const unsigned short* __restrict__ x,   // (M, D)
    const int* __restrict__ words,          // (M, NT, S)
    const unsigned short* __restrict__ up,  // (H, D)
    float* __restrict__ hbuf,               // (M, NT, S)  out: h per stored slot
    long long M, int D, int NT, int S) {
    __shared__ unsigned int s_word[UP_WARPS][UP_CAP];
    __shared__ int s_slot[UP_WARPS][UP_CAP];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long m = (long long)blockIdx.x * UP_WARPS + warp;
    if (m >= M) return;
    unsigned int* lw = s_word[warp];
    int* ls = s_slot[warp];
    const int K = S - 1;
    const int nvec_d = D >> 3;
    const uint4* xg = reinterpret_cast<const uint4*>(x + m * D);
    const int* wrow = words + m * (long long)NT * S;
    float* hrow = hbuf + m * (long long)NT * S;
    int t = 0;
    while (t < NT) {
        int E = 0;
        bool full = false;
        while (t < NT && !full) {
            const int tl = t + lane;
            const int cnt = tl < NT ? __ldg(wrow + (long long)tl * S) : 0;
            const int n = cnt <= K ? cnt : 0;  // overflowed tiles: not here
            const int incl = warp_incl_scan(n, lane);
            const bool fits = tl < NT && E + incl <= UP_CAP;
            const int nfit = __popc(__ballot_sync(SPARSIFY_FULL_MASK, fits));
            if (nfit < min(32, NT - t)) full = true;
            const int off = E + incl - n;
            for (int k0 = 0; k0 < nfit; k0 += 4) {
                unsigned int w[4];
                int dst[4], slot[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int k = k0 + u;
                    const int nk = __shfl_sync(SPARSIFY_FULL_MASK, n, k & 31);
                    const int ok = __shfl_sync(SPARSIFY_FULL_MASK, off, k & 31);
                    dst[u] = (k < nfit && lane < nk) ? ok + lane : -1;
                    slot[u] = (t + k) * S + 1 + lane;
                    w[u] = dst[u] >= 0 ? (unsigned int)__ldg(wrow + slot[u]) : 0u;
                }
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    if (dst[u] >= 0) {
                        lw[dst[u]] = w[u];
                        ls[dst[u]] = slot[u];
                    }
            }
            unsigned int rare = __ballot_sync(SPARSIFY_FULL_MASK, fits && n > 32);
            while (rare) {
                const int k = __ffs(rare) - 1;
                rare &= rare - 1;
                const int nk = __shfl_sync(SPARSIFY_FULL_MASK, n, k);
                const int ok = __shfl_sync(SPARSIFY_FULL_MASK, off, k);
                for (int i = 32 + lane; i < nk; i += 32) {
                    lw[ok + i] = (unsigned int)__ldg(wrow + (long long)(t + k) * S + 1 + i);
                    ls[ok + i] = (t + k) * S + 1 + i;
                }
            }
            if (nfit > 0) E = __shfl_sync(SPARSIFY_FULL_MASK, E + incl, nfit - 1);
            t += nfit;
        }
        __syncwarp();
        for (int e = 0; e < E; e += 2) {
            const unsigned int w0 = lw[e];
            const unsigned int w1 = e + 1 < E ? lw[e + 1] : 0u;
            float s0, s1;
            warp_dot2(xg, reinterpret_cast<const uint4*>(up + (long long)(w0 >> 16) * D),
                      e + 1 < E ? reinterpret_cast<const uint4*>(up + (long long)(w1 >> 16) * D) : nullptr, nvec_d,
                      lane, s0, s1);
            if (lane == 0) {
                hrow[ls[e]] = bf16_to_f((unsigned short)(w0 & 0xffffu)) * s0;
                if (e + 1 < E) hrow[ls[e + 1]] = bf16_to_f((unsigned short)(w1 & 0xffffu)) * s1;
            }
        }
        __syncwarp();
    }
}

#define SPARSIFY_FFN_INST(NV, G, A, HB)                                                                     \
    template __global__ void twell_ffn_kernel<NV, G, A, HB>(                                                 \
        const unsigned short*, const int*, const unsigned short*, const unsigned short*, const unsigned short*, \
        unsigned short*, long long, int, int, int, int, int, int, const float*, int, const unsigned short*);
SPARSIFY_FFN_INST(8, true, false, false)
SPARSIFY_FFN_INST(8, false, false, false)
SPARSIFY_FFN_INST(8, true, true, false)
SPARSIFY_FFN_INST(8, false, true, false)
SPARSIFY_FFN_INST(8, true, false, true)
