// The activation's relu bitmask, the list the prefill kernel's FFN_ACT_MASK build reads instead of scanning act:
// bit c % 32 of word c / 32 of row m set where relu_active(act[m, c]) (a > 0 or NaN: the scan's own predicate),
// for the words that cover columns [c_start, H) (words below c_start / 32 are not written; the kernel does not
// read them). Bits at columns >= H in the last word are 0.
//
// Why a pass of its own: the sparse kernel's scan walks a row 512 columns per dependent step (latency-bound at
// ~20% occupancy), while this pass streams act at full occupancy; session 13 measured the kernel listing from a
// bitmask 0.23 ms faster at 65536 tokens, against ~0.12 ms for this pass to read the 450 MB it covers.
//
// act: (M, lda) row-major bf16; mask: (M, ldm) int32, words [w0, w_end) of each row written. One thread per 8 columns (one 16-byte load when
// vec: lda % 8 == 0 and act 16-byte aligned), 4 consecutive lanes per word, the word stored by its first lane.
// act is read evict-first (it is read again only at the set columns).
#include "common.cuh"

#define RELU_MASK_THREADS 256  // threads per block (launchers.RELU_MASK_THREADS); a multiple of 4

__global__ void __launch_bounds__(RELU_MASK_THREADS) relu_mask_kernel(
    const unsigned short* __restrict__ act,  // (M, lda)
    long long lda,
    unsigned int* __restrict__ mask,          // (M, ldm)
    long long M, int H, int ldm, int w0, int w_end, int vec) {
    const int nw = w_end - w0;  // words written per row: [w0, w_end)
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long m = i / (4LL * nw);  // all 4 lanes of a word share m (4 * nw per row, blocks a multiple of 4)
    const bool live = m < M;
    const int q = (int)(i - m * 4LL * nw);                 // 0 .. 4 nw - 1 within the row
    const int c0 = ((w0 + (q >> 2)) << 5) + ((q & 3) << 3);  // this thread's first column
    unsigned int bits = 0u;
    if (live && c0 < H) {
        const unsigned short* ar = act + m * lda + c0;
        if (vec && c0 + 8 <= H) {
            const uint4 v = ld_stream16(ar);
            const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                bits |= (relu_active((unsigned short)(w[e] & 0xffffu)) ? 1u : 0u) << (2 * e);
                bits |= (relu_active((unsigned short)(w[e] >> 16)) ? 1u : 0u) << (2 * e + 1);
            }
        } else {
            for (int e = 0; e < 8 && c0 + e < H; ++e) bits |= (relu_active(ar[e]) ? 1u : 0u) << e;
        }
    }
    bits <<= 8 * (q & 3);
    // the 4 lanes of a word are consecutive threads of one warp (4 * nw and the block size are multiples of 4)
    bits |= __shfl_xor_sync(SPARSIFY_FULL_MASK, bits, 1);
    bits |= __shfl_xor_sync(SPARSIFY_FULL_MASK, bits, 2);
    if (live && (q & 3) == 0) mask[m * (long long)ldm + w0 + (q >> 2)] = bits;
}
