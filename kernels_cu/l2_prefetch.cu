// Warm L2 with two byte ranges that a later kernel will read; no outputs, nothing to wait for.
//
// Decode above the fused path's token count runs cuBLAS's gate GEMM, then two kernels whose U and Downᵀ row reads
// come from HBM one dependent round trip at a time. At a few dozen tokens the GEMM streams its weight well below
// the memory's bandwidth, so the rows most likely to be active (a packed layer's first neurons: hot-first order,
// by decreasing firing rate) can be fetched into L2 beside it, from a side stream.
//
// PREFETCH_MODE 0: prefetch.global.L2, one 128-byte line per thread per step (sm_80+);
//               1: the same with the L2::evict_last hint;
//               2: cp.async.bulk.prefetch.L2 of PREFETCH_CHUNK bytes per thread (sm_90+; mode 0 below sm_90).
// Each range's start must be 128-byte aligned and its length a multiple of 128 (rows of D bf16, D % 64 == 0).

#ifndef PREFETCH_MODE
#define PREFETCH_MODE 0
#endif
#ifndef PREFETCH_CHUNK
#define PREFETCH_CHUNK 4096
#endif

__device__ __forceinline__ void prefetch_line(const char* p) {
#if PREFETCH_MODE == 1
    asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
#else
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

extern "C" __global__ void l2_prefetch_kernel(const char* a, long long a_bytes, const char* b, long long b_bytes) {
    const long long total = a_bytes + b_bytes;
    const long long threads = (long long)gridDim.x * blockDim.x;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
#if PREFETCH_MODE == 2 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (long long off = t * PREFETCH_CHUNK; off < total; off += threads * PREFETCH_CHUNK) {
        // a chunk does not straddle the two ranges: a_bytes is a multiple of 128, so clip it there
        const bool in_a = off < a_bytes;
        const char* p = in_a ? a + off : b + (off - a_bytes);
        const long long end = in_a ? a_bytes : total;
        const unsigned int size = (unsigned int)(end - off < PREFETCH_CHUNK ? end - off : PREFETCH_CHUNK);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(size) : "memory");
        if (in_a && off + PREFETCH_CHUNK > a_bytes && b_bytes > 0) {  // the rest of this step's chunk, from b
            const long long rest = off + PREFETCH_CHUNK - a_bytes;
            const unsigned int bsize = (unsigned int)(rest < b_bytes ? rest : b_bytes);
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(b), "r"(bsize) : "memory");
        }
    }
#else
    for (long long off = t * 128; off < total; off += threads * 128) {
        prefetch_line(off < a_bytes ? a + off : b + (off - a_bytes));
    }
#endif
}
