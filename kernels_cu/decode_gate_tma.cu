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
#define GT_ROW_BYTES (GT_KC * 2 + 16)  // padded row stride in a stage
#define GT_TPB_MAX 4      // 16-row tiles per block (accumulators in registers); must match kernels/launchers.py
#define GT_TT 2           // 8-token tiles per consumer warp (16 tokens)
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

__device__ __forceinline__ void consumer_sync() {  // the GT_WARPS consumer warps only (the producer may be gone)
    asm volatile("bar.sync 1, %0;" ::"n"(32 * GT_WARPS) : "memory");
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

template <int CPW>
__device__ __forceinline__ void load_x_stage(uint4 (&xv)[CPW][GT_TT], const uint4* const (&xg)[GT_TT],
                                             const bool (&x_ok)[GT_TT], int s, int nch, int kpart, int kp, int t) {
#pragma unroll
    for (int i = 0; i < CPW; ++i) {
        const int ch = kpart + i * kp;  // chunk within the step
        const int vi = (s * GT_SUB + ch * 32) / 8 + t;
#pragma unroll
        for (int tt = 0; tt < GT_TT; ++tt)
            xv[i][tt] = (ch < nch && x_ok[tt]) ? __ldg(xg[tt] + vi) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// act (M, H) = x (M, D) · w (H, D)ᵀ; grid = ceil(H / (16 tpb)), block = 32 (GT_WARPS + 1), dynamic shared
// memory = 16 * stages (barriers, padded to 128) + stages * 16 tpb * GT_ROW_BYTES. kp = consumer warps per token
// group (GT_WARPS / kp groups of 16 tokens cover M).
__global__ void __launch_bounds__(32 * (GT_WARPS + 1), 1) decode_gate_tma_kernel(
    const unsigned short* __restrict__ x,  // (M, D)
    const unsigned short* __restrict__ w,  // (H, D)
    unsigned short* __restrict__ act,      // (M, H)
    int M, int D, int H, int tpb, int stages, int kp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int CPW = GT_SUB / 32 / 2;  // chunks per warp and step at kp >= 2 (the launcher's smallest kp)
    constexpr int SUBS = GT_KC / GT_SUB;  // steps per stage
    static_assert(GT_KC % GT_SUB == 0, "a stage is whole steps");
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
    // producer: every stage's row copies, as soon as its slot is free. The weight is constant, so under PDL they
    // may start while the previous kernel still runs.
    if (warp == GT_WARPS) {
        for (int s = 0; s < nst; ++s) {
            const int slot = s % stages;
            if (s >= stages) mbar_wait(empty + slot, ((s / stages) - 1) & 1);
            const int kc = min(GT_KC, D - s * GT_KC);
            if (lane == 0) mbar_arrive_expect_tx(full + slot, (unsigned int)(nrows * kc * 2));
            __syncwarp();
            unsigned char* dst = ring + slot * slot_bytes;
            for (int r = lane; r < nrows; r += 32)
                bulk_load(dst + r * GT_ROW_BYTES, w + (long long)(j0 + r) * D + s * GT_KC, kc * 2, full + slot);
        }
        return;
    }
    const int g = lane >> 2, t = lane & 3;
    const int group = warp / kp, kpart = warp % kp;
    pdl_wait();  // x and act may be another kernel's (only the weight copies above may start before it ends)
    const uint4* xg[GT_TT];
    bool x_ok[GT_TT];
#pragma unroll
    for (int tt = 0; tt < GT_TT; ++tt) {
        const int tok = 16 * group + 8 * tt + g;
        xg[tt] = reinterpret_cast<const uint4*>(x + (long long)min(tok, M - 1) * D);
        x_ok[tt] = tok < M;
    }
    float c[GT_TPB_MAX][GT_TT][4];
#pragma unroll
    for (int r = 0; r < GT_TPB_MAX; ++r)
#pragma unroll
        for (int tt = 0; tt < GT_TT; ++tt) c[r][tt][0] = c[r][tt][1] = c[r][tt][2] = c[r][tt][3] = 0.f;
    uint4 xn[CPW][GT_TT];
    const int nsub = (D + GT_SUB - 1) / GT_SUB;
    load_x_stage<CPW>(xn, xg, x_ok, 0, min(GT_SUB, D) / 32, kpart, kp, t);
    for (int u = 0; u < nsub; ++u) {
        const int s = u / SUBS, slot = s % stages, nch = min(GT_SUB, D - u * GT_SUB) / 32;
        uint4 xv[CPW][GT_TT];
#pragma unroll
        for (int i = 0; i < CPW; ++i)
#pragma unroll
            for (int tt = 0; tt < GT_TT; ++tt) xv[i][tt] = xn[i][tt];
        if (u + 1 < nsub) load_x_stage<CPW>(xn, xg, x_ok, u + 1, min(GT_SUB, D - (u + 1) * GT_SUB) / 32, kpart, kp, t);
        if (u % SUBS == 0) mbar_wait(full + slot, (s / stages) & 1);
        const unsigned char* base = ring + slot * slot_bytes + (u % SUBS) * GT_SUB * 2;
#pragma unroll
        for (int i = 0; i < CPW; ++i) {
            const int ch = kpart + i * kp;
            if (ch >= nch) break;
            const unsigned char* col = base + ch * 64 + t * 16;
#pragma unroll
            for (int r = 0; r < GT_TPB_MAX; ++r) {
                if (r >= tpb) break;
                const uint4 lo = *reinterpret_cast<const uint4*>(col + (16 * r + g) * GT_ROW_BYTES);
                const uint4 hi = *reinterpret_cast<const uint4*>(col + (16 * r + g + 8) * GT_ROW_BYTES);
#pragma unroll
                for (int tt = 0; tt < GT_TT; ++tt) {
                    mma_16816(c[r][tt], lo.x, hi.x, lo.y, hi.y, xv[i][tt].x, xv[i][tt].y);
                    mma_16816(c[r][tt], lo.z, hi.z, lo.w, hi.w, xv[i][tt].z, xv[i][tt].w);
                }
            }
        }
        if (u % SUBS == SUBS - 1 || u == nsub - 1) {  // the warp is done with this stage's slot
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + slot);
        }
    }
    // every stage's bytes have landed and been read by every consumer warp: the ring is free for the partials
    consumer_sync();
    const int groups = GT_WARPS / kp, toks = 16 * groups;
    float* part = reinterpret_cast<float*>(ring);  // [kp][rows_blk][toks]
#pragma unroll
    for (int r = 0; r < GT_TPB_MAX; ++r) {
        if (r >= tpb) break;
#pragma unroll
        for (int tt = 0; tt < GT_TT; ++tt) {
            const int tok = 16 * group + 8 * tt + 2 * t;
            float* p_lo = part + ((long long)kpart * rows_blk + 16 * r + g) * toks + tok;
            float* p_hi = p_lo + 8 * toks;
            p_lo[0] = c[r][tt][0];
            p_lo[1] = c[r][tt][1];
            p_hi[0] = c[r][tt][2];
            p_hi[1] = c[r][tt][3];
        }
    }
    consumer_sync();
    for (int p = threadIdx.x; p < nrows * M; p += 32 * GT_WARPS) {  // tok-major: consecutive rows, coalesced
        const int row = p % nrows, tok = p / nrows;
        float sum = 0.f;
        for (int k = 0; k < kp; ++k) sum += part[((long long)k * rows_blk + row) * toks + tok];
        act[(long long)tok * H + j0 + row] = f_to_bf16(sum);
    }
#endif
}
