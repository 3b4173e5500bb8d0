// The decode gate projection (1..64 tokens) with the gate weight streamed through shared memory by bulk copies
// (Hopper's cp.async.bulk, completion counted on mbarriers): act = x · Gᵀ, bf16 out, fp32 sums.
//
// Why: at decode the 23 MB gate weight is the block's floor, and register-fed loads did not stream it as fast as
// cuBLAS (the tensor-core fused kernel reached 1.6 TB/s; cuBLAS's gate GEMM takes 11.5 us at 64 tokens, ~2 TB/s).
// Here one producer warp per block issues every row copy of every stage up front (a ring of STAGES slots, each
// the block's rows x GT_KC columns), so a block has up to ~200 KB in flight from its first cycle, and the eight
// consumer warps run mma.m16n8k16 on a slot as soon as its bytes land.
//
// Layout: block b owns tpb 16-row tiles of G (rows j0 .. j0 + 16 tpb), sized on the host so that all blocks are
// resident at once. Stage s holds columns [s GT_KC, (s + 1) GT_KC) of all the block's rows, row stride GT_KC * 2
// + 16 bytes (the 16-byte pad puts consecutive rows 4 banks apart: the 16-byte fragment loads below are
// conflict-free). Consumer warp w takes token group w / kp (16 tokens: two 8-token tiles) and the 32-column chunks
// kp' = w % kp, kp' + kp, ... of every stage, so x is read once per block (from L2; the next stage's x is loaded
// while the current one is consumed) and the block's tiles are all accumulated in registers. As in
// decode_fused.cu's tensor-core kernel, each lane loads 16 contiguous bytes of row g, row g + 8 and token g at
// the same 8 columns, and two mma consume them (a fixed permutation of the chunk's k, the same for A and B).
// The kp partial sums of a (row, token) are added in kp order, then rounded once to bf16.
#include "common.cuh"

#define GT_WARPS 8        // consumer warps per block; one more warp issues the copies. Must match kernels/launchers.py
#ifndef GT_KC
#define GT_KC 1024        // columns per stage (one bulk copy per row and stage); must match kernels/launchers.py
#endif
#define GT_SUB 256        // columns per consumer step (x is loaded one step ahead)
#define GT_ROW_BYTES (GT_KC * 2 + 64)  // padded row stride in a stage: rows g and g + 1 sit 16 banks apart
#define GT_TPB_MAX 4      // 16-row tiles per block (accumulators in registers); must match kernels/launchers.py
#define GT_MAX_M 64       // tokens; must match kernels/launchers.py

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// One arrival that also announces the bytes the phase's bulk copies will deliver.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, unsigned int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Block until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned int parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}

// Global -> shared bulk copy (bytes a multiple of 16, both addresses 16-byte aligned), counted on bar.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned int bytes, unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smem_addr(dst)),
        "l"(src), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
}


__device__ __forceinline__ void mma_16816(float* c, unsigned int a0, unsigned int a1, unsigned int a2,
                                          unsigned int a3, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

// x's 16-byte vectors of step u for this lane (chunk = warp, the TT token tiles; zeros past M).
template <int TT>
__device__ __forceinline__ void load_x_step(uint4 (&xv)[TT], const uint4* const (&xg)[TT], const bool (&x_ok)[TT],
                                            int u, bool ok, int t) {
    const int vi = (u * GT_SUB + (threadIdx.x >> 5) * 32) / 8 + t;
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) xv[tt] = (ok && x_ok[tt]) ? __ldg(xg[tt] + vi) : make_uint4(0u, 0u, 0u, 0u);
}

// act (M, H) = x (M, D) · w (H, D)ᵀ for M <= 8 TT; grid = ceil(H / (16 tpb)), block = 32 GT_WARPS, dynamic
// shared memory = 16 * stages (barriers, padded to 128) + stages * 16 tpb * GT_ROW_BYTES.
template <int TT>
__global__ void __launch_bounds__(32 * GT_WARPS, 1) decode_gate_tma_kernel(
    const unsigned short* __restrict__ x,  // (M, D)
    const unsigned short* __restrict__ w,  // (H, D)
    unsigned short* __restrict__ act,      // (M, H)
    int M, int D, int H, int tpb, int stages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int SUBS = GT_KC / GT_SUB;  // steps per stage
    static_assert(GT_KC % GT_SUB == 0 && GT_SUB == 32 * GT_WARPS, "a stage is whole steps; a step one chunk per warp");
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);
    unsigned long long* empty = full + stages;
    unsigned char* ring = smem + ((16 * stages + 127) / 128) * 128;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rows_blk = 16 * tpb, j0 = blockIdx.x * rows_blk, nrows = min(rows_blk, H - j0);
    const int slot_bytes = rows_blk * GT_ROW_BYTES;
    const int nst = (D + GT_KC - 1) / GT_KC;  // stages along D
    if (threadIdx.x == 0) {
        for (int i = 0; i < stages; ++i) {
            mbar_init(full + i, 1);
            mbar_init(empty + i, GT_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    pdl_launch_dependents();  // the next kernel may launch now (it waits for this grid before reading act)
    // warp 0 issues the copies: the first ring-full at once (the weight is constant, so under PDL they may start
    // while the previous kernel still runs), then each later stage as soon as every warp has released its slot
    auto issue = [&](int s) {
        const int slot = s % stages, kc = min(GT_KC, D - s * GT_KC);
        if (lane == 0) mbar_arrive_expect_tx(full + slot, (unsigned int)(nrows * kc * 2));
        __syncwarp();
        unsigned char* dst = ring + slot * slot_bytes;
        for (int r = lane; r < nrows; r += 32)
            bulk_load(dst + r * GT_ROW_BYTES, w + (long long)(j0 + r) * D + s * GT_KC, kc * 2, full + slot);
    };
    if (warp == 0)
        for (int s = 0; s < min(stages, nst); ++s) issue(s);
    const int g = lane >> 2, t = lane & 3;
    pdl_wait();  // x and act may be another kernel's (only the weight copies above may start before it ends)
    const uint4* xg[TT];
    bool x_ok[TT];
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
        const int tok = 8 * tt + g;
        xg[tt] = reinterpret_cast<const uint4*>(x + (long long)min(tok, M - 1) * D);
        x_ok[tt] = tok < M;
    }
    float c[GT_TPB_MAX][TT][4];
#pragma unroll
    for (int r = 0; r < GT_TPB_MAX; ++r)
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) c[r][tt][0] = c[r][tt][1] = c[r][tt][2] = c[r][tt][3] = 0.f;
    const int nsub = (D + GT_SUB - 1) / GT_SUB;
    uint4 xn[TT];
    load_x_step<TT>(xn, xg, x_ok, 0, warp * 32 < min(GT_SUB, D), t);
    for (int u = 0; u < nsub; ++u) {
        const int s = u / SUBS, slot = s % stages;
        const bool ok = warp * 32 < min(GT_SUB, D - u * GT_SUB);  // this warp's chunk lies inside D
        uint4 xv[TT];
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) xv[tt] = xn[tt];
        if (u + 1 < nsub) load_x_step<TT>(xn, xg, x_ok, u + 1, warp * 32 < min(GT_SUB, D - (u + 1) * GT_SUB), t);
        if (u % SUBS == 0) mbar_wait(full + slot, (s / stages) & 1);
        if (ok) {
            const unsigned char* col = ring + slot * slot_bytes + (u % SUBS) * GT_SUB * 2 + warp * 64 + t * 16;
#pragma unroll
            for (int r = 0; r < GT_TPB_MAX; ++r) {
                if (r >= tpb) break;
                const uint4 lo = *reinterpret_cast<const uint4*>(col + (16 * r + g) * GT_ROW_BYTES);
                const uint4 hi = *reinterpret_cast<const uint4*>(col + (16 * r + g + 8) * GT_ROW_BYTES);
#pragma unroll
                for (int tt = 0; tt < TT; ++tt) {
                    mma_16816(c[r][tt], lo.x, hi.x, lo.y, hi.y, xv[tt].x, xv[tt].y);
                    mma_16816(c[r][tt], lo.z, hi.z, lo.w, hi.w, xv[tt].z, xv[tt].w);
                }
            }
        }
        if (u % SUBS == SUBS - 1 || u == nsub - 1) {  // the warp is done with this stage's slot
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + slot);
            if (warp == 0 && s + stages < nst) {  // refill it once every warp is done with it
                mbar_wait(empty + slot, (s / stages) & 1);
                issue(s + stages);
            }
        }
    }
    // every stage's bytes have landed and been read by every consumer warp: the ring is free for the partials
    __syncthreads();
    // partials [warp][token][row], row stride rows_blk + 4: a fragment's stores (8 rows x 4 token pairs) and the
    // sums' loads (consecutive rows) are free of bank conflicts
    constexpr int toks = 8 * TT;
    const int rs = rows_blk + 4;
    float* part = reinterpret_cast<float*>(ring);
#pragma unroll
    for (int r = 0; r < GT_TPB_MAX; ++r) {
        if (r >= tpb) break;
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) {
            float* p0 = part + ((long long)warp * toks + 8 * tt + 2 * t) * rs + 16 * r + g;  // token 8 tt + 2 t
            p0[0] = c[r][tt][0];
            p0[rs] = c[r][tt][1];
            p0[8] = c[r][tt][2];
            p0[rs + 8] = c[r][tt][3];
        }
    }
    __syncthreads();
    for (int p = threadIdx.x; p < nrows * M; p += 32 * GT_WARPS) {  // tok-major: consecutive rows, coalesced
        const int row = p % nrows, tok = p / nrows;
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < GT_WARPS; ++k) sum += part[((long long)k * toks + tok) * rs + row];
        act[(long long)tok * H + j0 + row] = f_to_bf16(sum);
    }
#endif
}

template __global__ void decode_gate_tma_kernel<1>(const unsigned short*, const unsigned short*, unsigned short*, int,
                                                   int, int, int, int);
template __global__ void decode_gate_tma_kernel<2>(const unsigned short*, const unsigned short*, unsigned short*, int,
                                                   int, int, int, int);
template __global__ void decode_gate_tma_kernel<4>(const unsigned short*, const unsigned short*, unsigned short*, int,
                                                   int, int, int, int);
template __global__ void decode_gate_tma_kernel<8>(const unsigned short*, const unsigned short*, unsigned short*, int,
                                                   int, int, int, int);
