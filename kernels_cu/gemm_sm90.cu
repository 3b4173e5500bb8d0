// Hopper (sm_90a) GEMM for the gate projection: out (M, N) bf16 = x (M, K) · w (N, K)ᵀ, fp32 accumulate, with the
// same bits as torch's x @ w.T through cuBLAS on every shape tested, and optionally (words given) a listing
// epilogue that writes the TwELL words of relu(out) over the columns >= c_start and the dense tile only where a
// consumer reads it (kernels/hopper.py, ffn.gate_listed_hybrid). Why: the gate GEMM is ~half the packed prefill
// block, and the list pass after it re-reads its 0.5 GB output (BENCHMARKS.md). Measured (H200, BENCHMARKS.md
// session 18): writing every tile, 91-100% of cuBLAS's speed (Nsight Compute: tensor cores 91.6% busy, cuBLAS's
// 92.6%); the listing epilogue does not keep up yet (63%), so SparsePolicy.gate_list_epilogue is off.
//
// Persistent: one block per SM (in clusters of GEMM_CLUSTER along M) walks 128 x 256 tiles of out. Three
// warpgroups: warpgroup 0's thread 0 streams 64-column K slices of x's 128 rows and w's 256 rows into a
// GEMM_STAGES-deep shared-memory ring by TMA (cp.async.bulk.tensor, 128-byte swizzle, completion counted on an
// mbarrier per stage; the two blocks of a cluster share the w slice, each loading half and multicasting it), running
// ahead into the next tile while the consumers finish one; warpgroups 1 and 2 each take 64 rows of the tile and run
// wgmma.mma_async m64n256k16 (bf16 in, fp32 accumulate, both operands from shared memory) over each slice, keeping
// one slice's MMAs in flight while the next is issued, and hand the stage back to every block of the cluster
// through a second mbarrier. The accumulators (128 fp32 per thread) are rounded to bf16 once (cvt.rn.bf16x2) and
// written into a swizzled shared-memory tile; without words a consumer thread stores it by TMA while its
// warpgroup starts the next tile; with words, warps 1..3 of warpgroup 0 list it and store it where needed
// (list_tile). TMA zero-fills loads and clips stores past M, N and K, so any shape with K % 8 == 0 and N % 8 == 0
// works.
//
// Compiled for sm_90a only (wgmma, TMA, setmaxnreg, clusters): on other targets the kernel body is empty and traps;
// its launcher must refuse anything but compute capability 9.0.
#include "common.cuh"

#define GEMM_BM 128
#define GEMM_BN 256
#define GEMM_BK 64  // K columns per stage: one 128-byte swizzle row (32-column stages were 35% slower, session 18)
#ifndef GEMM_STAGES
#define GEMM_STAGES 3  // 48 KB per stage; 4 measured no faster (H200), and 3 leave room for the epilogue's 64 KB
#endif
#define GEMM_THREADS 384
#ifndef GEMM_EARLY_RELEASE
#define GEMM_EARLY_RELEASE 0  // 1: wait for a slice's MMAs before issuing the next and hand its stage back at once
// (held one slice instead of two; the other consumer warpgroup keeps the tensor cores busy meanwhile). H200, one
// block per cluster: 0.5-3% faster than 0 (session 18); not yet measured with the default 2-block clusters
#endif
#ifndef GEMM_CLUSTER
#define GEMM_CLUSTER 2  // blocks per cluster along M (1 or 2): a cluster's blocks share their w slice; each loads
// 1 / GEMM_CLUSTER of it and the TMA multicasts it to all, so a block reads 32 KB instead of 48 KB per k slice from L2
#endif

// A CUtensorMap (cuda.h), built on the host by cuTensorMapEncodeTiled and passed by value.
struct __align__(64) TmaDesc {
    unsigned long long v[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    unsigned done = 0;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(bar)), "r"(parity)
            : "memory");
    } while (!done);
}
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDesc* desc, int c0, int c1, unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
            "r"(smem_u32(dst)), "l"(reinterpret_cast<unsigned long long>(desc)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
        : "memory");
}

// The same copy delivered to the same offset in every block of the cluster in ``mask``, each block's mbarrier at
// ``bar``'s offset counting the bytes.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TmaDesc* desc, int c0, int c1,
                                                      unsigned long long* bar, unsigned short mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
        "%3}], [%4], %5;\n" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<unsigned long long>(desc)), "r"(c0), "r"(c1), "r"(smem_u32(bar)), "h"(mask)
        : "memory");
}
// Arrive on the mbarrier at ``bar``'s offset in the cluster's block ``rank`` (this block's own included). The
// plain arrive (release at CTA scope, as CUTLASS's cluster barrier does): with .release.cluster ptxas put a
// MEMBAR.ALL.GPU before every arrive, which stalled each stage hand-back behind the epilogue's global stores.
__device__ __forceinline__ void mbar_arrive_cluster(unsigned long long* bar, unsigned rank) {
    if (GEMM_CLUSTER == 1) {
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
        return;
    }
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_u32(bar)), "r"(rank));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}

// wgmma's shared-memory matrix descriptor for a K-major tile in 128-byte swizzle, as TMA wrote it: rows of 128
// bytes, 8-row groups 1024 bytes apart (the stride byte offset); the leading byte offset is unused in this layout
// (layout type 1). The k-th 16-column step of a slice starts 32 * k bytes in.
__device__ __forceinline__ unsigned long long wgmma_desc(const void* p) {
    const unsigned long long a = smem_u32(p);
    return ((a & 0x3FFFFull) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// out[c1 .. c1 + box rows, c0 .. c0 + box cols] = the shared-memory box at src (TMA clips at the tensor's edge).
__device__ __forceinline__ void tma_store_2d(const TmaDesc* desc, const void* src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                     reinterpret_cast<unsigned long long>(desc)),
                 "r"(smem_u32(src)), "r"(c0), "r"(c1)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Threads' shared-memory writes made visible to the async proxy (the TMA store reads them).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void warpgroup_bar(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

// Two floats to packed bf16 (lo in the low half), round to nearest even: one instruction.
__device__ __forceinline__ unsigned cvt_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// Pins the accumulators' reads after the wait (the compiler sees them written by the MMA asm already).
__device__ __forceinline__ void fence_operands(float (&d)[128]) {
#pragma unroll
    for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 x 256 of out, this warpgroup's) += A (64 x 16) · B (256 x 16)ᵀ, both from shared memory.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %130, 0;\n wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(1));  // scale-d = 1: d += A·B
}

// The listing epilogue (words given), run by warps 1..3 of warpgroup 0 (the producer needs one thread) while the
// consumers go on to their next tile: a consumer warpgroup writes its 64 x 256 bf16 tile into its four swizzled
// boxes, as for the TMA store, and hands them over (epi_full); the lister writes each row's TwELL record for the
// tile (docs/FORMAT.md, T = 256 = GEMM_BN): lane l reads the row's columns 8 l .. 8 l + 7 (one 16-byte load), and
// ranks in ascending column order are a warp scan of the lanes' counts. Non-zero is tested on the bf16 value as
// stored (NaN counts), so the words are pack_twell of the activation this kernel computes, which is what a
// consumer scanning an overflowed tile of it lists, and what relu_list.cu lists from cuBLAS's activation. Columns
// < c_start and >= N are left out (both multiples of 8). Every word of the record is written: unused slots 0, the
// true count, the first K = S - 1 entries. The dense tile is stored (TMA) only where it is read: if it holds
// columns < c_start (the hybrid's hot glue reads them) or a row of it overflowed (the consumer scans act there).
// Then the boxes go back to the consumer (epi_empty).
#define LIST_WARPS 3
__device__ __forceinline__ void list_tile(const unsigned char* box0, int* __restrict__ words, int row0, int n0,
                                          int M, int N, int c_start, int S, int lw, int lane, int& overflow) {
    const int nt = (N + GEMM_BN - 1) / GEMM_BN, K = S - 1;
    const int c = n0 + 8 * lane;  // this lane's 8 columns
    const bool cols_ok = c >= c_start && c < N;
    for (int r = lw; r < 64; r += LIST_WARPS) {
        const int row = row0 + r;
        const uint4 v = *reinterpret_cast<const uint4*>(box0 + (lane >> 3) * (64 * 128) + r * 128 +
                                                        (((lane & 7) ^ (r & 7)) << 4));
        const unsigned short b[8] = {(unsigned short)(v.x & 0xffff), (unsigned short)(v.x >> 16),
                                     (unsigned short)(v.y & 0xffff), (unsigned short)(v.y >> 16),
                                     (unsigned short)(v.z & 0xffff), (unsigned short)(v.z >> 16),
                                     (unsigned short)(v.w & 0xffff), (unsigned short)(v.w >> 16)};
        int n = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) n += cols_ok && relu_active(b[e]) ? 1 : 0;
        const int incl = warp_incl_scan(n, lane);
        const int count = __shfl_sync(SPARSIFY_FULL_MASK, incl, 31);
        if (row >= M) continue;  // the same for the whole warp
        int* rec = words + ((long long)row * nt + n0 / GEMM_BN) * S;
        if (4 * lane < S) *reinterpret_cast<int4*>(rec + 4 * lane) = make_int4(0, 0, 0, 0);
        __syncwarp();  // the entries land after the zeros
        if (lane == 0) rec[0] = count;
        int rk = incl - n;
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (cols_ok && relu_active(b[e])) {
                if (rk < K) rec[1 + rk] = (int)(((unsigned)(c + e) << 16) | b[e]);
                ++rk;
            }
        overflow |= count > K;
    }
}

#ifndef GEMM_LIST_FAST
// 1 (prepared for the next GPU session, not yet run on a GPU; the default build is the one measured): the lister
// takes two rows per step, their chains interleaved; a row's ranks come from four ballots of the lanes' counts' bit
// planes (independent, where the warp scan was five dependent shuffles), and its record's words go to disjoint
// addresses (the zeros only past the stored entries), so no __syncwarp orders global stores. The same words.
// Why: the default lister kept the tensor cores 63% busy (Nsight Compute, session 18): the consumers wait for it.
#define GEMM_LIST_FAST 0
#endif

__device__ __forceinline__ void list_tile_fast(const unsigned char* box0, int* __restrict__ words, int row0, int n0,
                                               int M, int N, int c_start, int S, int lw, int lane, int& overflow) {
    const int nt = (N + GEMM_BN - 1) / GEMM_BN, K = S - 1;
    const int c = n0 + 8 * lane;
    const bool cols_ok = c >= c_start && c < N;
    const unsigned lt = (1u << lane) - 1u;
    for (int r0 = 2 * lw; r0 < 64; r0 += 2 * LIST_WARPS) {  // rows r0 and r0 + 1 (64 rows: every pair whole)
        uint4 v[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int r = r0 + j;
            v[j] = *reinterpret_cast<const uint4*>(box0 + (lane >> 3) * (64 * 128) + r * 128 +
                                                   (((lane & 7) ^ (r & 7)) << 4));
        }
        unsigned act[2];
        int before[2], count[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const unsigned w4[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
            act[j] = 0;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const unsigned short b = (unsigned short)((w4[e >> 1] >> (16 * (e & 1))) & 0xffffu);
                if (cols_ok && relu_active(b)) act[j] |= 1u << e;
            }
            const int n = __popc(act[j]);  // 0..8: four bit planes
            const unsigned p0 = __ballot_sync(SPARSIFY_FULL_MASK, n & 1), p1 = __ballot_sync(SPARSIFY_FULL_MASK, n & 2);
            const unsigned p2 = __ballot_sync(SPARSIFY_FULL_MASK, n & 4), p3 = __ballot_sync(SPARSIFY_FULL_MASK, n & 8);
            before[j] = __popc(p0 & lt) + 2 * __popc(p1 & lt) + 4 * __popc(p2 & lt) + 8 * __popc(p3 & lt);
            count[j] = __popc(p0) + 2 * __popc(p1) + 4 * __popc(p2) + 8 * __popc(p3);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int row = row0 + r0 + j;
            if (row >= M) continue;  // the same for the whole warp
            int* rec = words + ((long long)row * nt + n0 / GEMM_BN) * S;
            const int used = min(count[j], K);
            for (int slot = 1 + used + lane; slot < S; slot += 32) rec[slot] = 0;  // past the stored entries
            if (lane == 0) rec[0] = count[j];
            int rk = before[j];
            const unsigned w4[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if ((act[j] >> e) & 1u) {
                    const unsigned b = (w4[e >> 1] >> (16 * (e & 1))) & 0xffffu;
                    if (rk < K) rec[1 + rk] = (int)(((unsigned)(c + e) << 16) | b);
                    ++rk;
                }
            overflow |= count[j] > K;
        }
    }
}
#endif

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1) gemm_bf16_tn_kernel(
    const __grid_constant__ TmaDesc tma_x,  // x (M, K): box 64 x 128
    const __grid_constant__ TmaDesc tma_w,  // w (N, K): box 64 x 256 / GEMM_CLUSTER
    const __grid_constant__ TmaDesc tma_out,  // out (M, N) bf16 row-major: box 64 x 64, 128-byte swizzle
    int M, int N, int K,
    int* __restrict__ words,  // null: plain GEMM; else TwELL words (M, ceil(N / 256), S) of relu(out), columns < c_start
    int c_start, int S) {     // left out (tile 256, K = S - 1 entries; docs/FORMAT.md): the listing epilogue
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char smem_raw[];
    // 128-byte swizzle wants 1024-byte aligned tiles
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    constexpr int A_BYTES = GEMM_BM * GEMM_BK * 2, B_BYTES = GEMM_BN * GEMM_BK * 2;
    unsigned char* sa = smem;
    unsigned char* sb = smem + GEMM_STAGES * A_BYTES;
    // the epilogue's tile: per consumer warpgroup 4 boxes of 64 rows x 64 columns (128-byte rows, swizzled)
    constexpr int BOX_BYTES = 64 * 128, EPI_BYTES = 2 * 4 * BOX_BYTES;
    unsigned char* se = sb + GEMM_STAGES * B_BYTES;
    unsigned long long* full = reinterpret_cast<unsigned long long*>(se + EPI_BYTES);
    unsigned long long* empty = full + GEMM_STAGES;
    // the listing epilogue's hand-over of each consumer warpgroup's boxes, and the tile they hold
    unsigned long long* epi_full = empty + GEMM_STAGES;
    unsigned long long* epi_empty = epi_full + 2;
    volatile int* epi_info = reinterpret_cast<volatile int*>(epi_empty + 2);  // per warpgroup: row0, n0; overflow
    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
    const int kt_n = (K + GEMM_BK - 1) / GEMM_BK;
    // Persistent: the grid is at most one block per SM; cluster c takes work items c, c + clusters, ... Item t is
    // the GEMM_CLUSTER M tiles of row group t / tiles_n (one per block of the cluster) at N tile t % tiles_n, so
    // the blocks running at once cover neighbouring items: a few row groups of x against all of w, which stays in
    // L2. The producer runs ahead across items, filling the next tile's stages during the consumers' epilogue.
    const int tiles_n = (N + GEMM_BN - 1) / GEMM_BN;
    const int groups_m = ((M + GEMM_BM - 1) / GEMM_BM + GEMM_CLUSTER - 1) / GEMM_CLUSTER;
    const int work = groups_m * tiles_n;
    const int clusters = gridDim.x / GEMM_CLUSTER;
    if (threadIdx.x == 0) {
        for (int s = 0; s < GEMM_STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 2 * GEMM_CLUSTER);  // each consumer warpgroup of each block of the cluster
        }
        for (int w = 0; w < 2; ++w) {
            mbar_init(&epi_full[w], 1);
            mbar_init(&epi_empty[w], 1);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    // the cluster's blocks write into each other's stages and barriers: all initialized first
    if (GEMM_CLUSTER > 1) cluster_sync(); else __syncthreads();
    const unsigned rank = GEMM_CLUSTER > 1 ? cluster_rank() : 0;
    const int first = blockIdx.x / GEMM_CLUSTER;
    if (wg == 0) {  // producer (thread 0) and, listing, the lister (warps 1..3)
        asm volatile("setmaxnreg.dec.sync.aligned.u32 72;\n");
        if (tid >= 32 && words != nullptr) {
            const int lw = (tid >> 5) - 1, lane = tid & 31;
            int use = 0;  // tiles handed over so far per warpgroup (both warpgroups hand over each tile)
            for (int t = first; t < work; t += clusters, ++use) {
                for (int cw = 0; cw < 2; ++cw) {
                    mbar_wait(&epi_full[cw], use & 1);
                    const int row0 = epi_info[4 * cw], n0 = epi_info[4 * cw + 1];
                    const unsigned char* box0 = se + cw * 4 * BOX_BYTES;
                    int overflow = 0;
                    if (GEMM_LIST_FAST)
                        list_tile_fast(box0, words, row0, n0, M, N, c_start, S, lw, lane, overflow);
                    else
                        list_tile(box0, words, row0, n0, M, N, c_start, S, lw, lane, overflow);
                    if (lane == 0 && overflow) epi_info[4 * cw + 2] = 1;
                    asm volatile("bar.sync 3, %0;\n" ::"n"(32 * LIST_WARPS) : "memory");
                    if (tid == 32) {
                        if (n0 < c_start || epi_info[4 * cw + 2]) {
                            for (int bx = 0; bx < 4; ++bx)
                                if (n0 + 64 * bx < N) tma_store_2d(&tma_out, box0 + bx * BOX_BYTES, n0 + 64 * bx, row0);
                            bulk_commit();
                            bulk_wait_read();  // the boxes are read before they go back
                        }
                        epi_info[4 * cw + 2] = 0;
                        mbar_arrive_cluster(&epi_empty[cw], rank);  // (this block's own barrier)
                    }
                }
            }
            if (tid == 32) bulk_wait();
        }
        if (tid == 0) {
            int it = 0;  // slices issued so far, over all items: stage it % STAGES, its use number it / STAGES
            for (int t = first; t < work; t += clusters) {
                const int m0 = ((t / tiles_n) * GEMM_CLUSTER + rank) * GEMM_BM, n0 = (t % tiles_n) * GEMM_BN;
                for (int kt = 0; kt < kt_n; ++kt, ++it) {
                    const int s = it % GEMM_STAGES;
                    if (it >= GEMM_STAGES) mbar_wait(&empty[s], ((it / GEMM_STAGES) - 1) & 1);
                    mbar_expect_tx(&full[s], A_BYTES + B_BYTES);  // B: this block's slice and its peers'
                    tma_load_2d(sa + s * A_BYTES, &tma_x, kt * GEMM_BK, m0, &full[s]);
                    if (GEMM_CLUSTER > 1)  // rows [rank, rank + 1) * BN / CLUSTER of the w tile, to every block
                        tma_load_2d_multicast(sb + s * B_BYTES + rank * (B_BYTES / GEMM_CLUSTER), &tma_w,
                                              kt * GEMM_BK, n0 + rank * (GEMM_BN / GEMM_CLUSTER), &full[s],
                                              (unsigned short)((1u << GEMM_CLUSTER) - 1));
                    else
                        tma_load_2d(sb + s * B_BYTES, &tma_w, kt * GEMM_BK, n0, &full[s]);
                }
            }
        }
    } else {  // consumers: warpgroup 1 rows 0..63 of the tile, warpgroup 2 rows 64..127
        asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n");
        const int cw = wg - 1;
        const int w4 = tid >> 5, l = tid & 31;
        auto release = [&](int it) {  // every block's producer may write this stage: tell them all
            if (tid == 0)
                for (unsigned r = 0; r < GEMM_CLUSTER; ++r) mbar_arrive_cluster(&empty[it % GEMM_STAGES], r);
        };
        float d[128];
        int it = 0, use = 0;  // use: tiles whose boxes were filled (the listing hand-over's phase)
        for (int t = first; t < work; t += clusters) {
            const int m0 = ((t / tiles_n) * GEMM_CLUSTER + rank) * GEMM_BM, n0 = (t % tiles_n) * GEMM_BN;
#pragma unroll
            for (int i = 0; i < 128; ++i) d[i] = 0.f;
            for (int kt = 0; kt < kt_n; ++kt, ++it) {
                const int s = it % GEMM_STAGES;
                mbar_wait(&full[s], (it / GEMM_STAGES) & 1);
                const unsigned char* a = sa + s * A_BYTES + cw * 64 * 128;
                const unsigned char* b = sb + s * B_BYTES;
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < GEMM_BK / 16; ++kk)
                    wgmma_m64n256k16(d, wgmma_desc(a + 32 * kk), wgmma_desc(b + 32 * kk));
                wgmma_commit();
                if (GEMM_EARLY_RELEASE) {
                    wgmma_wait<0>();
                    release(it);
                } else {
                    wgmma_wait<1>();  // the previous slice's MMAs are done: its stage goes back to the producer
                    if (kt > 0) release(it - 1);
                }
            }
            wgmma_wait<0>();
            if (!GEMM_EARLY_RELEASE) release(it - 1);
            fence_operands(d);
#ifdef GEMM_DIAG_NO_STORE  // diagnosis build (tests/gpu/hopper_gemm.py): the epilogue left out (wrong results)
            continue;
#endif
            // accumulator layout of m64nNk16: thread (warp w, lane l) holds rows 16 w + l / 4 and + 8, columns
            // 8 i + 2 (l % 4) and + 1 for i < N / 8: d[4 i + 0, 1] (upper row), d[4 i + 2, 3] (lower row)
            // the tile into shared memory (128-byte swizzle: no bank conflicts), then stored by TMA asynchronously
            // while the warpgroup goes on (storing each thread's pairs straight to global memory took ~20% of the
            // kernel, session 18)
            unsigned char* box0 = se + cw * 4 * BOX_BYTES;
            if (words != nullptr) {  // listing: the lister has given the boxes back
                if (use > 0) mbar_wait(&epi_empty[cw], (use - 1) & 1);
            } else {
                if (tid == 0) bulk_wait_read();  // the previous tile's store has read the boxes
                warpgroup_bar(1 + cw);
            }
            const int rr = w4 * 16 + (l >> 2);  // this thread's upper row within the warpgroup's 64
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const int c = 8 * i + 2 * (l & 3);  // column within the tile
                unsigned char* box = box0 + (c >> 6) * BOX_BYTES;
                const int chunk = (c & 63) >> 3, within = (c & 7) * 2;  // 16-byte chunk of the 128-byte row
                *reinterpret_cast<unsigned*>(box + rr * 128 + ((chunk ^ (rr & 7)) << 4) + within) =
                    cvt_bf16x2(d[4 * i], d[4 * i + 1]);
                *reinterpret_cast<unsigned*>(box + (rr + 8) * 128 + ((chunk ^ ((rr + 8) & 7)) << 4) + within) =
                    cvt_bf16x2(d[4 * i + 2], d[4 * i + 3]);
            }
            fence_async_shared();
            warpgroup_bar(1 + cw);
            ++use;
            if (words != nullptr) {
                if (tid == 0) {
                    epi_info[4 * cw] = m0 + 64 * cw;
                    epi_info[4 * cw + 1] = n0;
                    mbar_arrive_cluster(&epi_full[cw], rank);
                }
                continue;
            }
            if (tid == 0) {
                for (int bx = 0; bx < 4; ++bx)
                    if (n0 + 64 * bx < N) tma_store_2d(&tma_out, box0 + bx * BOX_BYTES, n0 + 64 * bx, m0 + 64 * cw);
                bulk_commit();
            }
        }
        if (words == nullptr && tid == 0) bulk_wait();  // the last store is done before the block leaves
    }
    if (GEMM_CLUSTER > 1) cluster_sync();  // no block leaves while a peer may still write into it
#else
    __trap();  // sm_90a only (the launcher checks the device)
#endif
}
