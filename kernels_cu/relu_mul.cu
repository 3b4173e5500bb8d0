// h = relu(a) * u over the first N columns of the activation: the hybrid prefill's hot neurons (ffn.hybrid_ffn),
// whose up projection u = x · U_hotᵀ comes from cuBLAS. bf16 in and out, the product in fp32 rounded once to
// nearest even: the same values as torch's relu(a) followed by its bf16 multiply, in one pass instead of two
// (torch writes relu(a) out and reads it back: 2 * M * N * 2 more bytes, 134 MB at M = 65536, N = 512).
// relu keeps NaN (as torch does), so a NaN in the activation is not hidden.
//
// a: (M, lda) row-major, columns [0, N) read; u, h: (M, N) contiguous. One thread per 8 columns of a row;
// vec: every row of a and u starts 16-byte aligned (lda % 8 == 0, N % 8 == 0, aligned pointers), so each thread
// makes one 16-byte load of each and one 16-byte store. a and u are read once: evict-first (common.cuh).
#include "common.cuh"

#define RELU_MUL_THREADS 256  // threads per block (launchers.RELU_MUL_THREADS)

__global__ void __launch_bounds__(RELU_MUL_THREADS) relu_mul_kernel(
    const unsigned short* __restrict__ a,  // (M, lda): columns [0, N) read
    long long lda,
    const unsigned short* __restrict__ u,  // (M, N)
    unsigned short* __restrict__ h,        // (M, N)
    long long M, int N, int vec) {
    const int nv = (N + 7) >> 3;  // 8-column groups per row
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * nv) return;
    const long long m = i / nv;
    const int c0 = (int)(i - m * nv) * 8;
    const unsigned short* ar = a + m * lda + c0;
    const unsigned short* ur = u + m * (long long)N + c0;
    unsigned short* hr = h + m * (long long)N + c0;
    if (vec) {
        *reinterpret_cast<uint4*>(hr) = relu_mul8(ld_stream16(ar), ld_stream16(ur));
    } else {
        for (int e = 0; e < 8 && c0 + e < N; ++e)
            hr[e] = f_to_bf16(relu_keep_nan(bf16_to_f(ar[e])) * bf16_to_f(ur[e]));
    }
}
