// The decode path after a gate projection that ran elsewhere (cuBLAS above 16 tokens, or no known density), in one
// kernel: decode_fused.cu's decode_up_act_kernel and decode_down_kernel made one block per (token, D-chunk), so h
// never goes through global memory and no block waits for the whole up-dot grid before its down rows.
//
// A block of DECODE_THREADS (16 warps) takes one token and one chunk of D (decode_down.cuh's DecodeChunk, the
// launchers' decode_chunks(D, M), as the down kernel). It loads the token's activation row into registers (warp w
// holds the 256-column segments w, w + 16, ...), ranks the relu-active columns in ascending order, computes each
// active pair's up dot (two per warp at a time, warp_dot2: the up-act kernel's bits), keeps the entries whose
// h = a * (x . U_j) is not zero (the down kernel lists h != 0; NaN counts) and sums h * DownT_j over its chunk
// with decode_down_batch. A token with at most DECODE_CAP active neurons gives the two-kernel path's bits
// exactly (the same list, the same sums; GPU test); with more, the entries are batched before the zeros are
// dropped, so the down sums may group differently (still one fixed order). The chunks of a token repeat its
// listing and up dots, as the old one-kernel path did; decode_chunks keeps them few (<= 2 at 64 tokens, D 2048).
//
// act: (M, H) row-major, H <= TOKEN_MAX_H (launchers); vec_ok: act's rows 16-byte aligned. Launched with PDL
// after cuBLAS it only hides the launch: it waits (pdl_wait) before reading act.
#include "decode_down.cuh"

#define TOKEN_SEG 256      // columns per warp step (32 lanes x 8)
#define TOKEN_SEG_REGS 4   // segments per warp held in registers: H <= 16 warps x 4 x 256 = 16384 (TOKEN_MAX_H)
#define TOKEN_WARPS (DECODE_THREADS / 32)
static_assert(DECODE_CAP == 2 * DECODE_THREADS, "block_keep_nonzero gives each thread two entries");

// act[c0 .. c0+8) as 8 packed bf16 (zero at and past c_end): kept packed, 4 registers per segment, so a warp's
// 4 segments fit beside the up dots' loads without spilling at 128 registers.
__device__ __forceinline__ uint4 load8_packed(const unsigned short* __restrict__ arow, int c0, int c_end,
                                              bool vec_ok) {
    if (vec_ok && c0 + 8 <= c_end) return __ldg(reinterpret_cast<const uint4*>(arow + c0));
    unsigned short v[8];
    load8(arow, c0, c_end, false, v);
    return make_uint4(v[0] | (unsigned)v[1] << 16, v[2] | (unsigned)v[3] << 16, v[4] | (unsigned)v[5] << 16,
                      v[6] | (unsigned)v[7] << 16);
}

__device__ __forceinline__ unsigned short bf16_at(const uint4& q, int e) {
    const unsigned int w = e < 2 ? q.x : e < 4 ? q.y : e < 6 ? q.z : q.w;
    return (unsigned short)((e & 1) ? w >> 16 : w & 0xffffu);
}

// Keep the entries e < nb with eh[e] != 0 (NaN counts), in order, at the front of ej / eh; returns how many.
// Every thread of the block calls it (wsum: TOKEN_WARPS ints of shared memory); it ends synchronized.
__device__ __forceinline__ int block_keep_nonzero(int* ej, float* eh, int nb, int* wsum) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int j[2], n = 0;
    float h[2];
    bool keep[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int e = 2 * tid + i;
        keep[i] = e < nb && eh[e] != 0.f;
        j[i] = keep[i] ? ej[e] : 0;
        h[i] = keep[i] ? eh[e] : 0.f;
        n += keep[i] ? 1 : 0;
    }
    const int incl = warp_incl_scan(n, lane);
    if (lane == 31) wsum[warp] = incl;
    __syncthreads();  // every entry read before any is moved
    int at = incl - n, total = 0;
#pragma unroll
    for (int w = 0; w < TOKEN_WARPS; ++w) {
        at += w < warp ? wsum[w] : 0;
        total += wsum[w];
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
        if (keep[i]) {
            ej[at] = j[i];
            eh[at] = h[i];
            ++at;
        }
    __syncthreads();
    return total;
}

template <bool GATED>
__global__ void __launch_bounds__(DECODE_THREADS, 1) decode_token_kernel(
    const unsigned short* __restrict__ x,       // (M, D)
    const unsigned short* __restrict__ act,     // (M, H): x . w_actᵀ
    const unsigned short* __restrict__ up,      // (H, D), gated only
    const unsigned short* __restrict__ down_t,  // (H, D)
    unsigned short* __restrict__ out,           // (M, D)
    int D, int H, int vec_ok) {
    extern __shared__ int smem[];
    const int NS = (H + TOKEN_SEG - 1) / TOKEN_SEG;
    int* offs = smem;                                       // NS + 1: the segments' exclusive offsets, the total
    int* ej = offs + NS + 1;                                // DECODE_CAP
    float* eh = reinterpret_cast<float*>(ej + DECODE_CAP);  // DECODE_CAP
    const DecodeChunk ch(D);
    float* accrow = eh + DECODE_CAP;                                 // ch.CVr * 8
    float* part = accrow + ch.CVr * 8;                               // DECODE_THREADS * 8
    int* wsum = reinterpret_cast<int*>(part + DECODE_THREADS * 8);  // TOKEN_WARPS

    const long long m = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    pdl_launch_dependents();
    for (int i = tid; i < ch.CVr * 8; i += DECODE_THREADS) accrow[i] = 0.f;
    pdl_wait();  // act is the gate projection's output
    uint4 v[TOKEN_SEG_REGS];
    int excl[TOKEN_SEG_REGS];
#pragma unroll
    for (int k = 0; k < TOKEN_SEG_REGS; ++k) {  // all of the row's loads in flight at once
        const int t = warp + k * TOKEN_WARPS;
        v[k] = load8_packed(act + m * H, t * TOKEN_SEG + lane * 8, t < NS ? H : 0, vec_ok != 0);
    }
#pragma unroll
    for (int k = 0; k < TOKEN_SEG_REGS; ++k) {
        const int t = warp + k * TOKEN_WARPS;
        int n = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) n += relu_active(bf16_at(v[k], e)) ? 1 : 0;
        const int incl = warp_incl_scan(n, lane);
        excl[k] = incl - n;
        if (t < NS && lane == 31) offs[t] = incl;
    }
    __syncthreads();
    if (warp == 0) warp_exclusive_scan(offs, NS, lane);
    __syncthreads();
    const int E = offs[NS];
    const uint4* xg = reinterpret_cast<const uint4*>(x + m * D);
    const int nvec = D >> 3;
    for (int base = 0; base < E; base += DECODE_CAP) {  // the same trip count for the whole block
        const int nb = min(E - base, DECODE_CAP);
#pragma unroll
        for (int k = 0; k < TOKEN_SEG_REGS; ++k) {
            const int t = warp + k * TOKEN_WARPS;
            if (t >= NS) continue;
            int r = offs[t] + excl[k];
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (relu_active(bf16_at(v[k], e))) {
                    if (r >= base && r < base + nb) {
                        ej[r - base] = t * TOKEN_SEG + lane * 8 + e;
                        eh[r - base] = bf16_to_f(bf16_at(v[k], e));
                    }
                    ++r;
                }
        }
        __syncthreads();
        if (GATED) {
            for (int q = 2 * warp; q < nb; q += 2 * TOKEN_WARPS) {
                float d0, d1;
                warp_dot2(xg, reinterpret_cast<const uint4*>(up + (long long)ej[q] * D),
                          q + 1 < nb ? reinterpret_cast<const uint4*>(up + (long long)ej[q + 1] * D) : nullptr,
                          nvec, lane, d0, d1);
                if (lane == 0) {
                    eh[q] *= d0;
                    if (q + 1 < nb) eh[q + 1] *= d1;
                }
            }
            __syncthreads();
        }
        const int kept = block_keep_nonzero(ej, eh, nb, wsum);
        decode_down_batch(ej, eh, kept, down_t, D, ch, accrow, part);  // ends synchronized: ej / eh free again
    }
    decode_store_chunk(accrow, out + m * D, ch);
}

template __global__ void decode_token_kernel<true>(const unsigned short*, const unsigned short*,
                                                   const unsigned short*, const unsigned short*, unsigned short*,
                                                   int, int, int);
template __global__ void decode_token_kernel<false>(const unsigned short*, const unsigned short*,
                                                    const unsigned short*, const unsigned short*, unsigned short*,
                                                    int, int, int);
