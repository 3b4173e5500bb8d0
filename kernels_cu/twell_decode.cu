// Sparse FFN up/down projection reading TwELL, decode path (few tokens, M ~ 1..64): memory-latency bound.
//
// One block per token and D-chunk (see below). The token's entries are gathered into a shared-memory list (an exclusive scan over the
// tiles' counts gives each tile its offset, so the list order is deterministic), then
//   1. up:   the block's warps share the entries: h_e = a_e * (x_m . U_j)      (gated; plain: h_e = a_e)
//   2. down: each thread owns 16-byte column vectors of out_m and sums h_e * DownT_j over all entries, with all
//            row loads independent so that many are in flight.
// Only the active rows of U and DownT are read. Overflowed tiles (true count > K) are taken exactly from the
// dense activation `act` (relu applied). Lists longer than CAP are processed in batches; partial sums live in an
// fp32 shared-memory row of the chunk. (Decode straight from the dense activation, without TwELL, runs
// decode_fused.cu's decode_up_act_kernel + decode_down_kernel: the same products in the same order.)
#include "decode_down.cuh"

template <bool GATED>
__global__ void __launch_bounds__(DECODE_THREADS, 1) twell_decode_kernel(
    const unsigned short* __restrict__ x,       // (M, D)
    const int* __restrict__ words,              // (M, NT, S)
    const unsigned short* __restrict__ up,      // (H, D)
    const unsigned short* __restrict__ down_t,  // (H, D)
    const unsigned short* __restrict__ act,     // (M, H)
    unsigned short* __restrict__ out,           // (M, D)
    long long M, int D, int H, int NT, int S, int T, int vec_ok) {
    extern __shared__ int smem[];
    int* offs = smem;                                        // NT + 1
    int* ej = offs + NT + 1;                                 // DECODE_CAP
    float* eh = reinterpret_cast<float*>(ej + DECODE_CAP);   // DECODE_CAP
    // D is split into gridDim.y chunks, one block per (token, chunk): every block lists the token's entries and
    // computes all of h (the U rows are re-read from L2), and accumulates only its chunk, so a single token's
    // down projection is spread over several SMs.
    const DecodeChunk ch(D);
    const int nvec = D >> 3;
    float* accrow = eh + DECODE_CAP;  // ch.CVr * 8: this chunk's fp32 sums
    float* part = accrow + ch.CVr * 8;  // DECODE_THREADS * 8: per-group partials (decode_down_batch)

    const long long m = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = DECODE_THREADS / 32;
    const int K = S - 1;
    const int* wrow = words + m * (long long)NT * S;
    const unsigned short* arow = act + m * (long long)H;

    for (int t = tid; t < NT; t += DECODE_THREADS) offs[t] = __ldg(wrow + (long long)t * S);
    for (int i = tid; i < ch.CVr * 8; i += DECODE_THREADS) accrow[i] = 0.f;
    __syncthreads();
    if (warp == 0) warp_exclusive_scan(offs, NT, lane);  // of the true counts
    __syncthreads();
    const int E = offs[NT];
    const uint4* xg = reinterpret_cast<const uint4*>(x + m * D);

    for (int base = 0; base < E; base += DECODE_CAP) {
        const int lim = min(E, base + DECODE_CAP);
        // gather this batch's entries
        for (int t = warp; t < NT; t += nwarps) {
            const int o = offs[t], n = offs[t + 1] - o;
            if (o >= lim || o + n <= base) continue;
            const int* tw = wrow + (long long)t * S;
            if (n <= K) {
                for (int i = lane; i < n; i += 32) {
                    const int e = o + i;
                    if (e >= base && e < lim) {
                        const unsigned int w = (unsigned int)__ldg(tw + 1 + i);
                        ej[e - base] = (int)(w >> 16);
                        eh[e - base] = bf16_to_f((unsigned short)(w & 0xffffu));
                    }
                }
            } else {  // overflowed tile: exact, from the dense activation
                warp_for_each_active(arow, t * T, min(H, (t + 1) * T), vec_ok != 0, lane,
                                     [&](int r, int col, unsigned short b) {
                                         const int e = o + r;
                                         if (r < n && e >= base && e < lim) {
                                             ej[e - base] = col;
                                             eh[e - base] = bf16_to_f(b);
                                         }
                                     });
            }
        }
        __syncthreads();
        const int nb = lim - base;
        if (GATED) {  // two entries per warp at a time: 16 row loads in flight per lane
            for (int e = 2 * warp; e < nb; e += 2 * nwarps) {
                const uint4* u0 = reinterpret_cast<const uint4*>(up + (long long)ej[e] * D);
                const uint4* u1 = e + 1 < nb ? reinterpret_cast<const uint4*>(up + (long long)ej[e + 1] * D) : nullptr;
                float s0, s1;
                warp_dot2(xg, u0, u1, nvec, lane, s0, s1);
                if (lane == 0) {
                    eh[e] *= s0;
                    if (e + 1 < nb) eh[e + 1] *= s1;
                }
            }
            __syncthreads();
        }
        decode_down_batch(ej, eh, nb, down_t, D, ch, accrow, part);
    }
    decode_store_chunk(accrow, out + m * D, ch);
}

template __global__ void twell_decode_kernel<true>(const unsigned short*, const int*, const unsigned short*,
                                                  const unsigned short*, const unsigned short*, unsigned short*,
                                                  long long, int, int, int, int, int, int);
template __global__ void twell_decode_kernel<false>(const unsigned short*, const int*, const unsigned short*,
                                                   const unsigned short*, const unsigned short*, unsigned short*,
                                                   long long, int, int, int, int, int, int);
