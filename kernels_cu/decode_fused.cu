// Fused sparse FFN for decode (1..16 tokens): the gate projection finds the active neurons and computes their up
// dots in the same pass, so only two kernels run and no activation is listed twice.
//
//   decode_gate_up_kernel   one warp per ROWS rows of the gate weight, for all MT tokens (a gemv: the 23 MB gate
//                           read is the floor of the whole block). For each (token, row) the warp rounds
//                           a = x_m·G_j to bf16 (as a cuBLAS gate GEMM in bf16 would), and where relu(a) > 0 it
//                           computes u = x_m·U_j at once (gated; two dots in flight) and stores h = a·u in fp32,
//                           else 0, into hbuf (M, Hs): a dense row of h per token (22 KB at H = 5632).
//   decode_down_kernel      one block per (token, D-chunk), as twell_decode.cu's down half: lists the non-zero h of
//                           its token in ascending neuron order and sums h·DownT_j over its chunk of columns
//                           (decode_down.cuh: fixed order, fp32, one rounding).
// Only the active rows of U and DownT are read. The per-entry arithmetic is the same as gemv.cu + twell_decode.cu
// (same rounding of a, same h, same list order and down sums), so at M <= 2 this path's output equals that pair's
// bit for bit (GPU test). NaN in a counts as active and propagates, as everywhere else.
// On Hopper the down kernel is launched with programmatic dependent launch (launchers.launch_decode_ffn): the
// gate kernels let it launch as soon as they start, so its launch and set-up overlap the gate sweep and it only
// waits (pdl_wait) for the gate kernel's h. The gate kernels themselves launch ordinarily: launched early too,
// their blocks land unevenly on the SMs and the 23 MB sweep slows down (BENCHMARKS.md).
#include "decode_down.cuh"
#include "gemv.cuh"

#ifndef FUSED_GATE_MIN_BLOCKS
#define FUSED_GATE_MIN_BLOCKS 3
#endif
#define FUSED_GATE_WARPS 4  // warps per block of decode_gate_up_kernel; must match kernels/launchers.py
#define FUSED_SEG 256  // columns per listing segment (one warp step: 32 lanes x 8)
#define DECODE_UP_WARPS 8  // listing warps (= segments) per block of decode_up_act_kernel; must match
                           // kernels/launchers.py
#define DECODE_UP_CAP 256  // active pairs per block and batch of up dots in decode_up_act_kernel
#define DECODE_SEG_CAP 32  // entries per segment list decode_up_act_kernel hands decode_down_kernel; must match
                           // kernels/launchers.py (a token with a longer one is listed from its h row instead)

// h *= x_tok · U_j for the lanes whose pair is active (pair(p) = {token, row j} of lane p), two dots at a time
// (usually none or one per warp at decode sparsity). Every lane of the warp calls it; returns this lane's h.
template <typename Pair>
__device__ __forceinline__ float warp_up_dots(bool active, float h, const unsigned short* __restrict__ x,
                                              const unsigned short* __restrict__ up, int D, int lane, Pair pair) {
    const uint4* xb = reinterpret_cast<const uint4*>(x);
    const int nvec = D >> 3;
    unsigned int pend = __ballot_sync(SPARSIFY_FULL_MASK, active);
    while (pend) {
        const int p0 = __ffs(pend) - 1;
        pend &= pend - 1;
        const int p1 = pend ? __ffs(pend) - 1 : -1;
        if (p1 >= 0) pend &= pend - 1;
        const int2 q0 = pair(p0), q1 = pair(max(p1, 0));
        const uint4* u0 = reinterpret_cast<const uint4*>(up + (long long)q0.y * D);
        const uint4* u1 = p1 >= 0 ? reinterpret_cast<const uint4*>(up + (long long)q1.y * D) : nullptr;
        float d0, d1;
        warp_dot2x(xb + (long long)q0.x * nvec, u0, xb + (long long)q1.x * nvec, u1, nvec, lane, d0, d1);
        if (lane == p0) h *= d0;
        if (lane == p1) h *= d1;
    }
    return h;
}

template <int MT, int ROWS, bool GATED>
__global__ void __launch_bounds__(32 * FUSED_GATE_WARPS, FUSED_GATE_MIN_BLOCKS) decode_gate_up_kernel(
    const unsigned short* __restrict__ x,      // (MT, D)
    const unsigned short* __restrict__ w_act,  // (H, D): the gate weight (plain FFN: the up weight)
    const unsigned short* __restrict__ up,     // (H, D), gated only
    float* __restrict__ hbuf,                  // (MT, Hs): h, 0 where inactive
    int D, int H, int Hs) {
    static_assert(MT * ROWS <= 32, "one lane per (token, row) pair");
    const int lane = threadIdx.x & 31;
    const int j0 = ROWS * (blockIdx.x * FUSED_GATE_WARPS + (threadIdx.x >> 5));
    pdl_launch_dependents();  // the down kernel may launch now (it waits for this grid before reading hbuf)
    if (j0 >= H) return;
    float s[MT][ROWS];
    gemv_partial<MT, ROWS>(x, w_act, j0, H, D, lane, s);  // the gemv of gemv.cu: the same sums, the same bits
    // lane p = m * ROWS + r holds pair (m, j0 + r): its a rounded to bf16, then its h
    unsigned short mine = 0;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float v = warp_sum(s[m][r]);  // butterfly: every lane gets the same bits
            if (lane == m * ROWS + r) mine = f_to_bf16(v);
        }
    const bool valid = lane < MT * ROWS && j0 + lane % ROWS < H;
    const bool active = valid && relu_active(mine);
    float h = active ? bf16_to_f(mine) : 0.f;
    if (GATED)  // lane p = (token p / ROWS, row j0 + p % ROWS)
        h = warp_up_dots(active, h, x, up, D, lane, [&](int p) { return make_int2(p / ROWS, j0 + p % ROWS); });
    if (valid) hbuf[(long long)(lane / ROWS) * Hs + j0 + lane % ROWS] = h;
}

// Tensor-core variant of decode_gate_up_kernel for 2..16 tokens (the CUDA-core gemv above turns compute-bound
// there: 35.8 us at M = 8 against 11.8 us for cuBLAS, BENCHMARKS.md): mma.m16n8k16, bf16 in, fp32 accumulate.
// No shared-memory staging: a dot product may take its k in any order as long as A and B agree, so each lane
// loads 16 contiguous bytes of row g, of row g + 8 and of token g (of each 8-token tile) at the same 8 columns,
// and two mma instructions consume them (the fragments' k pairs are a fixed permutation of the chunk's 32
// columns).
__device__ __forceinline__ void mma_bf16_16816(float* c, unsigned int a0, unsigned int a1, unsigned int a2,
                                               unsigned int a3, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#define MMA_ROWS 16         // gate rows per block
#ifndef MMA_ROW_GROUP
#define MMA_ROW_GROUP 1  // a block's rows come in groups of this many neighbours (1, 2, 4, 8 or 16), see below.
// H200, 8 / 16 tokens, µs: packed (hot-first) layers 15.1 / 17.1 at 1, 15.5 / 18.8 at 4, 18.1 / 24.5 at 16;
// unordered layers 16.8 / 19.2 at 1, 16.2 / 18.3 at 16. Packed layers are what runs, hence 1 (BENCHMARKS.md).
#endif
#define MMA_TOKENS 8        // tokens per mma (n); a block takes NT tiles of them, M <= 8 * NT

// The tensor-core gate pass: one block per 16 gate rows and all M <= 8 * NT tokens. Block b takes 16 / RG groups
// of RG = MMA_ROW_GROUP neighbouring rows, groups b, b + G, b + 2G, ... (G = gridDim.x; RG = 16: 16 neighbours),
// so the hot neurons that lead a packed layer (hot-first order) are shared out over the blocks: with 16
// neighbouring hot rows the first blocks got most of the active pairs' up dots, a tail that made packed layers
// slower than unordered ones at 8-16 tokens (BENCHMARKS.md). Each row's dot is summed the same way wherever it
// sits, so the bits do not depend on the mapping. Warp w sweeps the 32-column
// chunks w, w + 4, ... of D (UNROLL of them with their loads in flight) and runs, per chunk and token tile, two
// mma.m16n8k16 with the 16 rows as A and the tile's tokens (zero past M) as B; the 4 warps' partial tiles are
// summed in warp order. The chunk order per warp does not depend on NT, so a token's a has the same bits
// whichever NT ran it. Thread i then holds the pairs p = i + 128 k (k < NT): row p / (8 NT), token p % (8 NT):
// a rounded to bf16, relu, and (gated) the up dots of the block's active pairs, listed in shared memory and
// spread over the 4 warps two at a time, so a block with up to 8 active pairs (a neuron active for several
// tokens included) pays one dependent row read; h into hbuf.
template <bool GATED, int NT>
__global__ void __launch_bounds__(32 * FUSED_GATE_WARPS) decode_gate_up_mma_kernel(
    const unsigned short* __restrict__ x,      // (M, D)
    const unsigned short* __restrict__ w_act,  // (H, D)
    const unsigned short* __restrict__ up,     // (H, D), gated only
    float* __restrict__ hbuf,                  // (M, Hs): h, 0 where inactive
    int M, int D, int H, int Hs) {
    constexpr int TOK = MMA_TOKENS * NT;          // tokens per block
    constexpr int PAIRS = 32 * FUSED_GATE_WARPS;  // (row, token) pairs per thread block and k
    constexpr int UNROLL = 4;                     // chunks in flight per warp: UNROLL x (2 + NT) 16-byte loads
    static_assert(MMA_ROWS * TOK == PAIRS * NT, "one pair per thread and k");
    __shared__ float part[FUSED_GATE_WARPS][MMA_ROWS * TOK];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    static_assert(MMA_ROWS % MMA_ROW_GROUP == 0, "whole row groups per block");
    const int grid = gridDim.x;
    auto row_of = [&](int r) {  // this block's r-th row, r < MMA_ROWS
        return (blockIdx.x + (r / MMA_ROW_GROUP) * grid) * MMA_ROW_GROUP + r % MMA_ROW_GROUP;
    };
    pdl_launch_dependents();  // as in decode_gate_up_kernel
    const int nchunk = D >> 5;
    const uint4* w_lo = reinterpret_cast<const uint4*>(w_act + (long long)min(row_of(g), H - 1) * D);
    const uint4* w_hi = reinterpret_cast<const uint4*>(w_act + (long long)min(row_of(g + 8), H - 1) * D);
    const uint4* xg[NT];
    bool x_ok[NT];  // tokens past M are zero columns of B
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int tok = g + MMA_TOKENS * nt;
        xg[nt] = reinterpret_cast<const uint4*>(x + (long long)min(tok, M - 1) * D);
        x_ok[nt] = tok < M;
    }
    float c[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
    for (int c0 = warp; c0 < nchunk; c0 += FUSED_GATE_WARPS * UNROLL) {
        uint4 wl[UNROLL], wh[UNROLL], xv[UNROLL][NT];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int ch = c0 + u * FUSED_GATE_WARPS;
            const bool ok = ch < nchunk;
            const int vi = 4 * ch + t;
            wl[u] = ok ? __ldg(w_lo + vi) : make_uint4(0u, 0u, 0u, 0u);
            wh[u] = ok ? __ldg(w_hi + vi) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                xv[u][nt] = (ok && x_ok[nt]) ? __ldg(xg[nt] + vi) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                mma_bf16_16816(c[nt], wl[u].x, wh[u].x, wl[u].y, wh[u].y, xv[u][nt].x, xv[u][nt].y);
                mma_bf16_16816(c[nt], wl[u].z, wh[u].z, wl[u].w, wh[u].w, xv[u][nt].z, xv[u][nt].w);
            }
    }
    // c[nt][0], [1]: row g, tokens 8 nt + 2t, + 1; c[nt][2], [3]: row g + 8, the same tokens
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int col = MMA_TOKENS * nt + 2 * t;
        part[warp][g * TOK + col] = c[nt][0];
        part[warp][g * TOK + col + 1] = c[nt][1];
        part[warp][(g + 8) * TOK + col] = c[nt][2];
        part[warp][(g + 8) * TOK + col + 1] = c[nt][3];
    }
    __syncthreads();
    float h[NT];
    bool valid[NT], active[NT];
#pragma unroll
    for (int k = 0; k < NT; ++k) {
        const int p = threadIdx.x + PAIRS * k, tok = p % TOK, j = row_of(p / TOK);
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < FUSED_GATE_WARPS; ++w) sum += part[w][p];
        const unsigned short a = f_to_bf16(sum);
        valid[k] = tok < M && j < H;
        active[k] = valid[k] && relu_active(a);
        h[k] = active[k] ? bf16_to_f(a) : 0.f;
    }
    if (GATED) {
        __shared__ int plist[PAIRS * NT];
        __shared__ float pdot[PAIRS * NT];
        __shared__ int wcount[FUSED_GATE_WARPS];
        unsigned int bal[NT];
        int n_warp = 0;
#pragma unroll
        for (int k = 0; k < NT; ++k) {
            bal[k] = __ballot_sync(SPARSIFY_FULL_MASK, active[k]);
            n_warp += __popc(bal[k]);
        }
        if (lane == 0) wcount[warp] = n_warp;
        __syncthreads();
        int off = 0, total = 0;
#pragma unroll
        for (int w = 0; w < FUSED_GATE_WARPS; ++w) {
            off += w < warp ? wcount[w] : 0;
            total += wcount[w];
        }
        if (total) {  // the same for the whole block
            const unsigned int below = (1u << lane) - 1u;
#pragma unroll
            for (int k = 0; k < NT; ++k) {
                if (active[k]) plist[off + __popc(bal[k] & below)] = threadIdx.x + PAIRS * k;
                off += __popc(bal[k]);
            }
            __syncthreads();
            const uint4* xb = reinterpret_cast<const uint4*>(x);
            const int nvec = D >> 3;
            for (int q = 2 * warp; q < total; q += 2 * FUSED_GATE_WARPS) {
                const int p0 = plist[q], p1 = q + 1 < total ? plist[q + 1] : -1;
                const int q1 = max(p1, 0);  // pair p: token p % TOK, row row_of(p / TOK)
                float d0, d1;
                warp_dot2x(xb + (long long)(p0 % TOK) * nvec,
                           reinterpret_cast<const uint4*>(up + (long long)row_of(p0 / TOK) * D),
                           xb + (long long)(q1 % TOK) * nvec,
                           p1 >= 0 ? reinterpret_cast<const uint4*>(up + (long long)row_of(q1 / TOK) * D) : nullptr,
                           nvec, lane, d0, d1);
                if (lane == 0) {
                    pdot[p0] = d0;
                    if (p1 >= 0) pdot[p1] = d1;
                }
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < NT; ++k)
                if (active[k]) h[k] *= pdot[threadIdx.x + PAIRS * k];
        }
    }
#pragma unroll
    for (int k = 0; k < NT; ++k) {
        const int p = threadIdx.x + PAIRS * k;
        if (valid[k]) hbuf[(long long)(p % TOK) * Hs + row_of(p / TOK)] = h[k];
    }
}

// The first half of the decode path when the gate projection ran elsewhere (cuBLAS, 17..64 tokens; or no known
// density): h from the dense activation act (M, H) instead of from the gate weight. The first DECODE_UP_WARPS warps
// list one 256-column segment of the token's act each (8 values per lane, relu); the block's active pairs (all of
// one token) are listed in shared memory and their up dots spread over the block's DECODE_UP_DOT_WARPS warps, so a
// token with several active neurons in one segment (hot-first order puts them together) pays one dependent row read,
// not several; h into hbuf (dense, 0 where inactive) and, given seg_count, each segment's non-zero h as a short
// list (count, then up to DECODE_SEG_CAP entries), so decode_down_kernel, which finishes, reads a few entries
// instead of listing the whole h row in every block.
// DECODE_UP_XF 1 (default): the token's x row is held in shared memory as fp32 (warp_dot_xf) and each of the
// DECODE_UP_DOT_WARPS warps takes one up dot: the kernel was bound by its warps' dependent instructions at 2 warps
// per scheduler (Nsight Compute at 64 tokens: 14 cycles per issued instruction, 86% of cycles with no eligible
// warp), so this halves each warp's chain and takes the x unpacking out of it. 16 warps at one block per SM, or 12
// at two (DECODE_UP_MIN_BLOCKS=2; 16 would spill): the launcher picks by the grid. 0: 8 warps, two dots at a time,
// x read through L1 (before session 20).
// The per-entry arithmetic is twell_decode.cu's (h = a * (x . U_j), warp_dot's order; the same down sums), so the
// output is the same bits (GPU test).
#ifndef DECODE_UP_XF
#define DECODE_UP_XF 1
#endif
#if DECODE_UP_XF
#ifndef DECODE_UP_DOT_WARPS
#define DECODE_UP_DOT_WARPS 16  // must match kernels/launchers.py (decode_up_dot_warps)
#endif
#else
#undef DECODE_UP_DOT_WARPS
#define DECODE_UP_DOT_WARPS DECODE_UP_WARPS
#endif
#ifndef DECODE_UP_MIN_BLOCKS
#define DECODE_UP_MIN_BLOCKS 1
#endif
template <bool GATED>
__global__ void __launch_bounds__(32 * DECODE_UP_DOT_WARPS, DECODE_UP_MIN_BLOCKS) decode_up_act_kernel(
    const unsigned short* __restrict__ x,    // (M, D)
    const unsigned short* __restrict__ act,  // (M, H): x . w_actᵀ
    const unsigned short* __restrict__ up,   // (H, D), gated only
    float* __restrict__ hbuf,                // (M, Hs): h, 0 where inactive
    int* __restrict__ seg_count,             // (M, NS) or null: each segment's non-zero h, counted
    int2* __restrict__ seg_ent,              // (M, NS, DECODE_SEG_CAP): the first of them, (column, h bits), ascending
    int D, int H, int Hs, int vec_ok) {
    __shared__ int plist[DECODE_UP_CAP];
    __shared__ float pdot[DECODE_UP_CAP];
    __shared__ int wcount[DECODE_UP_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool lister = warp < DECODE_UP_WARPS;
    const long long m = blockIdx.x;
    // warp w of block y takes segment w * gridDim.y + y: a block's segments are spread over the row, so the hot
    // neurons that lead a packed layer's row share out over the token's blocks instead of loading the first one
    const int c0 = (warp * gridDim.y + blockIdx.y) * FUSED_SEG + lane * 8;
    const int nvec = D >> 3;
    pdl_launch_dependents();  // the down kernel may launch now (it waits for this grid before reading hbuf)
    pdl_wait();               // act may be the output of the kernel launched before this one
    unsigned short v[8];
    if (lister) {
        load8(act + m * H, c0, H, vec_ok != 0, v);  // zeros at and past H
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = 0;
    }
#if DECODE_UP_XF
    extern __shared__ float4 xsm[];  // gated: the token's x as fp32, columns 8 vi .. +3 at xsm[vi], +4 .. +7 at
    float4* xlo = xsm;               // xsm[nvec + vi]
    float4* xhi = xsm + nvec;
    if (GATED) {
        const uint4* xg = reinterpret_cast<const uint4*>(x + m * D);
        for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
            const uint4 q = __ldg(xg + vi);
            xlo[vi] = make_float4(bf16_lo(q.x), bf16_hi(q.x), bf16_lo(q.y), bf16_hi(q.y));
            xhi[vi] = make_float4(bf16_lo(q.z), bf16_hi(q.z), bf16_lo(q.w), bf16_hi(q.w));
        }
    }
#endif
    float h[8];
    int n = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const bool a = relu_active(v[e]);
        h[e] = a ? bf16_to_f(v[e]) : 0.f;
        n += a ? 1 : 0;
    }
    if (GATED) {
        const int incl = warp_incl_scan(n, lane);
        if (lane == 31 && lister) wcount[warp] = incl;
        __syncthreads();  // also publishes the x copy
        int first = incl - n, total = 0;  // this lane's first rank in the block's list; the block's list length
#pragma unroll
        for (int w = 0; w < DECODE_UP_WARPS; ++w) {
            first += w < warp ? wcount[w] : 0;
            total += wcount[w];
        }
#if !DECODE_UP_XF
        const uint4* xg = reinterpret_cast<const uint4*>(x + m * D);
#endif
        for (int base = 0; base < total; base += DECODE_UP_CAP) {  // the same trip count for the whole block
            const int nb = min(total - base, DECODE_UP_CAP);
            int r = first;
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (relu_active(v[e])) {
                    if (r >= base && r < base + nb) plist[r - base] = c0 + e;
                    ++r;
                }
            __syncthreads();
#if DECODE_UP_XF
            for (int q = warp; q < nb; q += DECODE_UP_DOT_WARPS) {
                const float d = warp_dot_xf(xlo, xhi, reinterpret_cast<const uint4*>(up + (long long)plist[q] * D),
                                            nvec, lane);
                if (lane == 0) pdot[q] = d;
            }
#else
            for (int q = 2 * warp; q < nb; q += 2 * DECODE_UP_WARPS) {
                float d0, d1;
                warp_dot2(xg, reinterpret_cast<const uint4*>(up + (long long)plist[q] * D),
                          q + 1 < nb ? reinterpret_cast<const uint4*>(up + (long long)plist[q + 1] * D) : nullptr,
                          nvec, lane, d0, d1);
                if (lane == 0) {
                    pdot[q] = d0;
                    if (q + 1 < nb) pdot[q + 1] = d1;
                }
            }
#endif
            __syncthreads();
            r = first;
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (relu_active(v[e])) {
                    if (r >= base && r < base + nb) h[e] *= pdot[r - base];
                    ++r;
                }
            __syncthreads();  // before the next batch overwrites plist
        }
    }
    if (lister && c0 < H) {  // Hs is a multiple of 8 >= H: the whole vector lies in the row
        float4* dst = reinterpret_cast<float4*>(hbuf + m * Hs + c0);
        dst[0] = make_float4(h[0], h[1], h[2], h[3]);
        dst[1] = make_float4(h[4], h[5], h[6], h[7]);
    }
    const int seg = warp * gridDim.y + blockIdx.y;  // this warp's segment (listers)
    if (seg_count != nullptr && lister && seg * FUSED_SEG < H) {
        // the segment's list for the down kernel: the entries it would list from the h row (h != 0, NaN included),
        // in the same ascending order; the count always, the entries up to DECODE_SEG_CAP
        const int NS = (H + FUSED_SEG - 1) / FUSED_SEG;
        int nz = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) nz += (h[e] != 0.f) ? 1 : 0;
        const int incl = warp_incl_scan(nz, lane);
        const long long s0 = m * NS + seg;
        if (lane == 31) seg_count[s0] = incl;
        int r = incl - nz;
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (h[e] != 0.f) {
                if (r < DECODE_SEG_CAP) seg_ent[s0 * DECODE_SEG_CAP + r] = make_int2(c0 + e, __float_as_int(h[e]));
                ++r;
            }
    }
}

// v := this lane's 8 values of the fp32 row at columns c0 .. c0 + 8, 0 at and past c_end (c0 a multiple of 8, the
// row 16-byte aligned).
__device__ __forceinline__ void load_row8(const float* __restrict__ row, int c0, int c_end, float (&v)[8]) {
    if (c0 + 8 <= c_end) {
        const float4 p = __ldg(reinterpret_cast<const float4*>(row + c0));
        const float4 q = __ldg(reinterpret_cast<const float4*>(row + c0 + 4));
        v[0] = p.x; v[1] = p.y; v[2] = p.z; v[3] = p.w;
        v[4] = q.x; v[5] = q.y; v[6] = q.z; v[7] = q.w;
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = c0 + e < c_end ? row[c0 + e] : 0.f;
    }
}

__device__ __forceinline__ int count_nonzero8(const float (&v)[8]) {
    int n = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) n += (v[e] != 0.f) ? 1 : 0;  // NaN != 0
    return n;
}

// Visit the non-zero entries (NaN included) of the fp32 row columns [c_beg, c_end) in ascending order, 256 columns
// per step: f(rank, col, value), rank = 0, 1, ... Every lane of the warp calls it; c_beg is a multiple of 8 and
// the row 16-byte aligned. Returns the number visited.
template <typename F>
__device__ __forceinline__ int warp_for_each_nonzero(const float* __restrict__ row, int c_beg, int c_end, int lane,
                                                     F f) {
    int r = 0;
    for (int c = c_beg; c < c_end; c += 256) {
        const int c0 = c + lane * 8;
        float v[8];
        load_row8(row, c0, c_end, v);
        const int n = count_nonzero8(v);
        const int incl = warp_incl_scan(n, lane);
        int rank = r + incl - n;
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (v[e] != 0.f) f(rank++, c0 + e, v[e]);
        r += __shfl_sync(SPARSIFY_FULL_MASK, incl, 31);
    }
    return r;
}

#define DOWN_SEG_REGS 4  // segments per warp the one-pass listing holds in registers: H <= 16 warps x 4 x 256

// The list of (column, h) of one token's non-zero h, in ascending order, in batches of DECODE_CAP, each summed
// against DownT (decode_down_batch); offs holds the segments' exclusive offsets and offs[NS] the total.
__device__ __forceinline__ void down_list_batches(const float* __restrict__ hrow, const int* offs, int NS, int H,
                                                  int* ej, float* eh, const unsigned short* __restrict__ down_t,
                                                  int D, const DecodeChunk& ch, float* accrow, float* part) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = DECODE_THREADS / 32;
    const int E = offs[NS];
    for (int base = 0; base < E; base += DECODE_CAP) {
        const int lim = min(E, base + DECODE_CAP);
        for (int t = warp; t < NS; t += nwarps) {
            const int o = offs[t], n = offs[t + 1] - o;
            if (o >= lim || o + n <= base) continue;
            warp_for_each_nonzero(hrow, t * FUSED_SEG, min(H, (t + 1) * FUSED_SEG), lane, [&](int r, int col, float v) {
                const int e = o + r;
                if (e >= base && e < lim) {
                    ej[e - base] = col;
                    eh[e - base] = v;
                }
            });
        }
        __syncthreads();
        decode_down_batch(ej, eh, lim - base, down_t, D, ch, accrow, part);
    }
}

// The down kernel's entries from decode_up_act_kernel's segment lists (the same entries, in the same order, as
// listing the h row): each warp reads the counts of its segments (warp, warp + 16, ...) and, in the same round
// trip, every slot of their lists (one 8-byte load per lane; slots past a count hold nothing and are dropped), the
// block scans the counts into offsets. Returns false if a segment has more than DECODE_SEG_CAP entries (the caller
// lists the h row instead). Every thread calls it.
__device__ __forceinline__ bool down_from_lists(const int* __restrict__ cnt_row, const int2* __restrict__ ent_row,
                                                const float* __restrict__ hrow, int NS, int H, int* offs, int* ej,
                                                float* eh, const unsigned short* __restrict__ down_t, int D,
                                                const DecodeChunk& ch, float* accrow, float* part) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = DECODE_THREADS / 32;
    int cnt[DOWN_SEG_REGS];
    int2 ent[DOWN_SEG_REGS];
#pragma unroll
    for (int k = 0; k < DOWN_SEG_REGS; ++k) {  // counts and slots together: one round trip, not two
        const int t = warp + k * nwarps;
        cnt[k] = t < NS ? __ldg(cnt_row + t) : 0;
        ent[k] = t < NS ? __ldg(ent_row + (long long)t * DECODE_SEG_CAP + lane) : make_int2(0, 0);
    }
    bool over = false;
#pragma unroll
    for (int k = 0; k < DOWN_SEG_REGS; ++k) {
        const int t = warp + k * nwarps;
        over |= cnt[k] > DECODE_SEG_CAP;
        if (t < NS && lane == 0) offs[t] = cnt[k];
    }
    if (__syncthreads_or(over)) return false;  // (also publishes offs)
    if (warp == 0) warp_exclusive_scan(offs, NS, lane);
    __syncthreads();
    const int E = offs[NS];
    if (E > DECODE_CAP) {
        down_list_batches(hrow, offs, NS, H, ej, eh, down_t, D, ch, accrow, part);
    } else if (E > 0) {
#pragma unroll
        for (int k = 0; k < DOWN_SEG_REGS; ++k) {
            const int t = warp + k * nwarps;
            if (lane < cnt[k]) {
                ej[offs[t] + lane] = ent[k].x;
                eh[offs[t] + lane] = __int_as_float(ent[k].y);
            }
        }
        __syncthreads();
        decode_down_batch(ej, eh, E, down_t, D, ch, accrow, part);
    }
    return true;
}

__global__ void __launch_bounds__(DECODE_THREADS, 1) decode_down_kernel(
    const float* __restrict__ hbuf,             // (M, Hs)
    const int* __restrict__ seg_count,          // (M, NS) or null: decode_up_act_kernel's segment lists
    const int2* __restrict__ seg_ent,           // (M, NS, DECODE_SEG_CAP)
    const unsigned short* __restrict__ down_t,  // (H, D)
    unsigned short* __restrict__ out,           // (M, D)
    int D, int H, int Hs) {
    extern __shared__ int smem[];
    const int NS = (H + FUSED_SEG - 1) / FUSED_SEG;
    int* offs = smem;                                       // NS + 1
    int* ej = offs + NS + 1;                                // DECODE_CAP
    float* eh = reinterpret_cast<float*>(ej + DECODE_CAP);  // DECODE_CAP
    const DecodeChunk ch(D);
    float* accrow = eh + DECODE_CAP;    // ch.CVr * 8
    float* part = accrow + ch.CVr * 8;  // DECODE_THREADS * 8

    const long long m = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = DECODE_THREADS / 32;
    const float* hrow = hbuf + m * Hs;
    pdl_launch_dependents();
    for (int i = tid; i < ch.CVr * 8; i += DECODE_THREADS) accrow[i] = 0.f;
    pdl_wait();  // hbuf is the gate kernel's output
    if (seg_count != nullptr && NS <= DOWN_SEG_REGS * nwarps && down_from_lists(seg_count + m * NS,
                                                                                seg_ent + m * NS * DECODE_SEG_CAP,
                                                                                hrow, NS, H, offs, ej, eh, down_t, D,
                                                                                ch, accrow, part)) {
        // listed from the segment lists
    } else if (NS <= DOWN_SEG_REGS * nwarps) {
        // one pass over h: each warp loads its segments (warp, warp + 16, ...) at once and keeps them in registers,
        // so listing costs one round trip to L2 instead of a counting pass and a listing pass
        float v[DOWN_SEG_REGS][8];
        int excl[DOWN_SEG_REGS];
#pragma unroll
        for (int k = 0; k < DOWN_SEG_REGS; ++k) {
            const int t = warp + k * nwarps;
            load_row8(hrow, t * FUSED_SEG + lane * 8, t < NS ? min(H, (t + 1) * FUSED_SEG) : 0, v[k]);
        }
#pragma unroll
        for (int k = 0; k < DOWN_SEG_REGS; ++k) {
            const int t = warp + k * nwarps, n = count_nonzero8(v[k]);
            const int incl = warp_incl_scan(n, lane);
            excl[k] = incl - n;
            if (t < NS && lane == 31) offs[t] = incl;
        }
        __syncthreads();
        if (warp == 0) warp_exclusive_scan(offs, NS, lane);
        __syncthreads();
        const int E = offs[NS];
        if (E > DECODE_CAP) {
            down_list_batches(hrow, offs, NS, H, ej, eh, down_t, D, ch, accrow, part);
        } else if (E > 0) {  // (none: out is zero)
#pragma unroll
            for (int k = 0; k < DOWN_SEG_REGS; ++k) {
                const int t = warp + k * nwarps;
                if (t >= NS) continue;
                int e = offs[t] + excl[k];
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    if (v[k][i] != 0.f) {
                        ej[e] = t * FUSED_SEG + lane * 8 + i;
                        eh[e] = v[k][i];
                        ++e;
                    }
            }
            __syncthreads();
            decode_down_batch(ej, eh, E, down_t, D, ch, accrow, part);
        }
    } else {
        for (int t = warp; t < NS; t += nwarps) {
            const int r = warp_for_each_nonzero(hrow, t * FUSED_SEG, min(H, (t + 1) * FUSED_SEG), lane,
                                                [](int, int, float) {});
            if (lane == 0) offs[t] = r;
        }
        __syncthreads();
        if (warp == 0) warp_exclusive_scan(offs, NS, lane);
        __syncthreads();
        down_list_batches(hrow, offs, NS, H, ej, eh, down_t, D, ch, accrow, part);
    }
    decode_store_chunk(accrow, out + m * D, ch);
}

// The instances the launcher uses (kernels/launchers.py fused_rows): 4 rows per warp for one token, 2 for more
// (4 rows x 2..4 tokens spill at 168 registers); <1, 2> is a tuning variant the benchmark times.
#define SPARSIFY_FUSED_INST(MT, ROWS)                                                                              \
    template __global__ void decode_gate_up_kernel<MT, ROWS, true>(const unsigned short*, const unsigned short*,  \
                                                                   const unsigned short*, float*, int, int, int); \
    template __global__ void decode_gate_up_kernel<MT, ROWS, false>(const unsigned short*, const unsigned short*, \
                                                                    const unsigned short*, float*, int, int, int);
SPARSIFY_FUSED_INST(1, 4)
SPARSIFY_FUSED_INST(1, 2)
SPARSIFY_FUSED_INST(2, 2)
SPARSIFY_FUSED_INST(3, 2)
SPARSIFY_FUSED_INST(4, 2)
SPARSIFY_FUSED_INST(5, 2)
SPARSIFY_FUSED_INST(6, 2)
SPARSIFY_FUSED_INST(7, 2)
SPARSIFY_FUSED_INST(8, 2)
#define SPARSIFY_MMA_INST(NT)                                                                                     \
    template __global__ void decode_gate_up_mma_kernel<true, NT>(const unsigned short*, const unsigned short*,     \
                                                                 const unsigned short*, float*, int, int, int, int); \
    template __global__ void decode_gate_up_mma_kernel<false, NT>(const unsigned short*, const unsigned short*,    \
                                                                  const unsigned short*, float*, int, int, int, int);
SPARSIFY_MMA_INST(1)
SPARSIFY_MMA_INST(2)
template __global__ void decode_up_act_kernel<true>(const unsigned short*, const unsigned short*,
                                                  const unsigned short*, float*, int*, int2*, int, int, int, int);
template __global__ void decode_up_act_kernel<false>(const unsigned short*, const unsigned short*,
                                                   const unsigned short*, float*, int*, int2*, int, int, int, int);
