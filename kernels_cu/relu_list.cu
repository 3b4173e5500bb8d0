// The hybrid prefill's pass over the activation, after the hot up GEMM, before the cold gather (ffn.hybrid_ffn):
//   hot glue:  h[m, j] = relu(a[m, j]) * u[m, j] for the hot columns j < c_start (u = x · U_hotᵀ from cuBLAS;
//              u null: h = relu(a)); one rounding, the values of relu_mul.cu and of torch's two passes;
//   cold list: the relu-active columns j >= c_start of the row, in ascending order, as words (j << 16) | bits
//              into list[m, 1 ..], and their true count into list[m, 0]: a TwELL row of one tile spanning the
//              cold columns (docs/FORMAT.md's word and count). A row with more than S - 1 entries keeps its
//              true count and the first S - 1 words; the gather (twell_ffn.cu) then lists that row from `act`
//              itself, so an overflow costs time, never a wrong sum.
// Why a pass of its own: the gather holds 64 fp32 accumulators per lane and runs ~12 warps per SM, too few to
// hide the activation scan's dependent 512-column steps (0.24 ms of its 1.35 ms at M = 65536, nnz 29,
// hot_tune.py's cold-cost rows). This kernel needs no accumulators, so 64 warps per SM stream the row at close to
// DRAM rate and the gather reads one 256-byte list instead.
//
// act: (M, H) row-major; u, h: (M, c_start) contiguous; list: (M, S) int32. One warp per token. vec: every row
// of act, u and h starts 16-byte aligned (H % 8 == 0, c_start % 8 == 0, aligned pointers). act, u and h are
// touched once: evict-first (common.cuh).
#include "common.cuh"

#define LIST_WARPS 8  // warps per block (launchers.LIST_WARPS)
#ifndef LIST_STEP
#define LIST_STEP 2  // 16-byte loads per lane in flight per step of the cold scan (512 columns). H200, M = 65536,
// nnz 29: 0.228 / 0.252 / 0.363 ms at 2 / 4 / 8 (session 14): with 64 warps per SM in flight, wider steps only
// cost registers
#endif
#ifndef LIST_PREFETCH
// 1: each warp asks L2 for its row's cold part on entry (as the gather's FFN_ACT_PREFETCH), so the scan's steps wait
// on L2, not DRAM. Off by default: at ~48 warps per SM the rows asked for at once (~7 KB each at H 3968) add up to
// about the L2's 50 MB, evicting rows before their scans reach them. H200, two runs of hybrid_order.py, six shapes
// each: the hybrid block faster without it in 10 of 12 (by 0.2-3.5%: 0.812 vs 0.830 and 0.806 vs 0.835 ms at
// M = 16384, nnz 29, packed; one 7% slower, M = 65536, nnz 112), the pass alone in 9 of 12 (BENCHMARKS.md,
// session 16)
#define LIST_PREFETCH 0
#endif
#ifndef LIST_GLUE
#define LIST_GLUE 2  // 256-column groups of the hot glue per step (their a and u loads in flight together)
#endif

__global__ void __launch_bounds__(LIST_WARPS * 32) relu_list_kernel(
    const unsigned short* __restrict__ act,  // (M, H)
    const unsigned short* __restrict__ u,    // (M, c_start) or null
    unsigned short* __restrict__ h,          // (M, c_start) or null when c_start == 0
    int* __restrict__ list,                  // (M, S)
    long long M, int H, int c_start, int S, int vec) {
    const int lane = threadIdx.x & 31;
    const long long m = (long long)blockIdx.x * LIST_WARPS + (threadIdx.x >> 5);
    if (m >= M) return;
    const unsigned short* arow = act + m * (long long)H;
    if (LIST_PREFETCH && vec) warp_prefetch_l2(arow + c_start, (H - c_start) * 2, lane);
    if (c_start > 0) {
        const unsigned short* ur = u + m * (long long)c_start;
        unsigned short* hr = h + m * (long long)c_start;
        const uint4 one = make_uint4(0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u);  // bf16 1.0 (u null)
        if (vec) {  // 256 * LIST_GLUE columns per step, all their loads in flight before the stores
            for (int c = lane * 8; c < c_start; c += 256 * LIST_GLUE) {
                uint4 qa[LIST_GLUE], qu[LIST_GLUE];
#pragma unroll
                for (int g = 0; g < LIST_GLUE; ++g) {
                    const bool ok = c + 256 * g < c_start;
                    qa[g] = ok ? ld_stream16(arow + c + 256 * g) : one;
                    qu[g] = ok && u != nullptr ? ld_stream16(ur + c + 256 * g) : one;
                }
#pragma unroll
                for (int g = 0; g < LIST_GLUE; ++g)
                    if (c + 256 * g < c_start) st_stream16(hr + c + 256 * g, relu_mul8(qa[g], qu[g]));
            }
        } else {
            for (int c0 = lane * 8; c0 < c_start; c0 += 256) {
                for (int e = 0; e < 8 && c0 + e < c_start; ++e) {
                    const float a = relu_keep_nan(bf16_to_f(arow[c0 + e]));
                    hr[c0 + e] = f_to_bf16(u != nullptr ? a * bf16_to_f(ur[c0 + e]) : a);
                }
            }
        }
    }
    int* lrow = list + m * (long long)S;
    const int K = S - 1;
    const int n = warp_for_each_active<true, LIST_STEP>(arow, c_start, H, vec != 0, lane,
                                                         [&](int r, int col, unsigned short b) {
        if (r < K) lrow[1 + r] = (int)(((unsigned int)col << 16) | (unsigned int)b);
    });
    if (lane == 0) lrow[0] = n;
}
