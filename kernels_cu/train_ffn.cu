// Sparse FFN training kernels: forward and backward through the ReLU pattern (docs/TRAINING_KERNELS.md).
//
// The pattern is a hybrid ELL of width W (row-major, slot s = m * W + k): cols (M, W) int32 (ascending, padding
// -1), g (M, W) bf16 gate values (padding 0), counts (M,) int32 TRUE non-zeros per row. Rows with count > W are
// tail rows: every slot is padding and the host computes them with dense products (exact, no cap). Every kernel
// here skips them (a row is an ELL row iff counts[m] <= W).
//
//   train_pattern_kernel      gate pre-activation a (M, H) -> cols, g, counts (relu applied; NaN counts as active)
//                             and the per-neuron histogram of the ELL entries (the CSC segment sizes)
//   transpose_bf16_kernel     Down (D, H) <-> DownT (H, D)
//   train_fwd_kernel          per ELL slot: u = x_m . U_j + ub_j (rounded to bf16, saved), h = g * u;
//                             out_m = sum h * DownT_j + db; per-token |h| sum and h != 0 count; per-neuron count
//   train_bwd_token_kernel    per ELL slot: dh = gy_m . DownT_j + c * sign(h); dg = dh * u, du = dh * g (fp32,
//                             saved for the neuron pass); dX_m = sum dg * G_j + du * U_j
//   train_hot_fwd/bwd_kernel  the elementwise work around the dense GEMMs of the hot neurons (relu, mask, h,
//                             |h| and counts; dh, dg, du)
//   train_plan_kernel         one block: tail rows, hot neurons and the sizes the host needs, after the pattern
//   train_chunks_kernel       one block: the neuron pass's chunks and reduce lists (backward)
//   train_bwd_neuron_kernel   per neuron segment (CSC order, host-sorted): dDownT_j = sum h * gy_m,
//                             dG_j = sum dg * x_m, dU_j = sum du * x_m; long segments are split into chunks whose
//                             partial sums go to a scratch buffer, summed in order by train_reduce_kernel
//                             (deterministic: no atomics on weight rows)
// Plain FFN (GATED = false): the activation is relu(x . U_j + ub_j) itself: g holds it, there is no u, h = g,
// and du = dh plays the gradient's role (no G).
//
// bf16 values travel as raw 16-bit patterns (common.cuh); all sums are fp32, outputs are rounded once.
// Token-major kernels: one warp per token; lane l owns the 16-byte vectors l, l+32, ... of a D-chunk of
// 256 * NV columns (registers), chunks looped for wider D.
#include "common.cuh"

#define TRAIN_WARPS 4
#define TRAIN_MAX_WIDTH 512  // largest ELL width (per-warp shared lists); the host checks it
#define NEURON_THREADS 256   // threads of a neuron-pass block: 8 columns each, 2048 columns per block
#define NEURON_UNROLL 4      // token rows in flight per thread in the neuron pass

// ---- pattern: relu + compaction of one row per warp ---------------------------------------------------------
__global__ void __launch_bounds__(TRAIN_WARPS * 32) train_pattern_kernel(
    const unsigned short* __restrict__ act,  // (M, H) gate pre-activation (bias included)
    int* __restrict__ cols,                  // (M, W) out
    unsigned short* __restrict__ g,          // (M, W) out
    int* __restrict__ counts,                // (M,)   out: true count
    int* __restrict__ hist,                  // (H,)   in/out: += ELL entries per neuron (tail rows excluded)
    const unsigned char* __restrict__ skip,  // (H padded to 256) or null: 1 = hot neuron, computed densely
    long long M, int H, int W, int vec_ok) {
    const int lane = threadIdx.x & 31;
    const long long m = (long long)blockIdx.x * TRAIN_WARPS + (threadIdx.x >> 5);
    if (m >= M) return;
    int* crow = cols + m * W;
    unsigned short* grow = g + m * W;
    const unsigned short* arow = act + m * (long long)H;
    int n = 0;  // active, not skipped, in ascending column order: lane l holds columns c + 8l .. c + 8l + 7
    for (int c = 0; c < H; c += 256) {
        const int c0 = c + lane * 8;
        unsigned short v[8];
        load8(arow, c0, H, vec_ok != 0, v);
        unsigned int sk0 = 0u, sk1 = 0u;
        if (skip != nullptr) {
            const uint2 q = *reinterpret_cast<const uint2*>(skip + c0);  // padded: never past the end
            sk0 = q.x;
            sk1 = q.y;
        }
        bool on[8];
        int k = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const unsigned int sk = ((e < 4 ? sk0 : sk1) >> (8 * (e & 3))) & 0xffu;
            on[e] = relu_active(v[e]) && sk == 0u;
            k += on[e] ? 1 : 0;
        }
        const int incl = warp_incl_scan(k, lane);
        int rank = n + incl - k;
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (on[e]) {
                if (rank < W) {
                    crow[rank] = c0 + e;
                    grow[rank] = v[e];
                }
                ++rank;
            }
        n += __shfl_sync(SPARSIFY_FULL_MASK, incl, 31);
    }
    __syncwarp();  // orders the entries above before the padding below (a tail row overwrites them)
    for (int k = (n <= W ? n : 0) + lane; k < W; k += 32) {
        crow[k] = -1;
        grow[k] = 0;
    }
    if (n <= W)
        for (int k = lane; k < n; k += 32) atomicAdd(hist + crow[k], 1);  // visible: the __syncwarp above
    if (lane == 0) counts[m] = n;
}

// ---- bf16 transpose (rows, cols) -> (cols, rows): 32 x 32 tiles through shared memory -----------------------
__global__ void __launch_bounds__(256) transpose_bf16_kernel(const unsigned short* __restrict__ in,
                                                             unsigned short* __restrict__ out, int rows, int cols) {
    __shared__ unsigned short tile[32][33];
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = in[(long long)r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int c = c0 + i, r = r0 + threadIdx.x;
        if (c < cols && r < rows) out[(long long)c * rows + r] = tile[threadIdx.x][i];
    }
}

// ---- forward: sparse up and down projections of the ELL rows ------------------------------------------------
template <int NV, bool GATED>
__global__ void __launch_bounds__(TRAIN_WARPS * 32, 3) train_fwd_kernel(
    const unsigned short* __restrict__ x,       // (M, D)
    const unsigned short* __restrict__ up,      // (H, D)
    const unsigned short* __restrict__ up_b,    // (H,) or null (GATED only; plain: the bias is in g)
    const unsigned short* __restrict__ down_t,  // (H, D)
    const unsigned short* __restrict__ down_b,  // (D,) or null
    const int* __restrict__ cols,               // (M, W)
    const unsigned short* __restrict__ g,       // (M, W)
    const int* __restrict__ counts,             // (M,)
    unsigned short* __restrict__ u_out,         // (M, W) out (GATED): u rounded to bf16, padding 0
    unsigned short* __restrict__ out,           // (M, D) out; tail rows: db (the host adds theirs and the hot part)
    float* __restrict__ l1_tok,                 // (M,) out: sum |h|
    int* __restrict__ tok_cnt,                  // (M,) out: h != 0
    int* __restrict__ neuron_cnt,               // (H,) in/out: += h != 0 (atomics on counters only)
    long long M, int D, int W) {
    __shared__ int s_col[TRAIN_WARPS][TRAIN_MAX_WIDTH];
    __shared__ float s_h[TRAIN_WARPS][TRAIN_MAX_WIDTH];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long m = (long long)blockIdx.x * TRAIN_WARPS + warp;
    if (m >= M) return;
    int* lc = s_col[warp];
    float* lh = s_h[warp];
    const int cnt = __ldg(counts + m);
    const int n = cnt <= W ? cnt : 0;
    const int nvec_d = D >> 3;
    const uint4* xg = reinterpret_cast<const uint4*>(x + m * D);

    for (int e = lane; e < n; e += 32) lc[e] = __ldg(cols + m * W + e);
    __syncwarp();
    // phase A: u and h per slot; the |h| sum and the non-zero count per lane, reduced at the end
    float l1 = 0.f;
    int nz = 0;
    for (int e0 = 0; e0 < n; e0 += 2) {  // two slots at a time: 16 row loads in flight per lane
        const bool two = e0 + 1 < n;
        float s0 = 0.f, s1 = 0.f;
        if (GATED)
            warp_dot2(xg, reinterpret_cast<const uint4*>(up + (long long)lc[e0] * D),
                      two ? reinterpret_cast<const uint4*>(up + (long long)lc[e0 + 1] * D) : nullptr, nvec_d, lane,
                      s0, s1);
        if (lane < (two ? 2 : 1)) {  // lane 0: slot e0, lane 1: slot e0 + 1
            const int e = e0 + lane;
            const int j = lc[e];
            const float gv = bf16_to_f(__ldg(g + m * W + e));
            float h = gv;
            if (GATED) {
                float sv = (lane == 0 ? s0 : s1);
                if (up_b != nullptr) sv += bf16_to_f(__ldg(up_b + j));
                const unsigned short ub = f_to_bf16(sv);
                u_out[m * W + e] = ub;
                h = gv * bf16_to_f(ub);
            }
            lh[e] = h;
            l1 += fabsf(h);
            if (h != 0.f) {
                ++nz;
                atomicAdd(neuron_cnt + j, 1);
            }
        }
    }
    if (GATED)
        for (int e = n + lane; e < W; e += 32) u_out[m * W + e] = 0;
    l1 = warp_sum(l1);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) nz += __shfl_xor_sync(SPARSIFY_FULL_MASK, nz, o);
    if (lane == 0) {
        l1_tok[m] = l1;
        tok_cnt[m] = nz;
    }
    __syncwarp();
    // phase B: out_m = sum h * DownT_j (+ db), one D-chunk of registers at a time, two rows in flight
    for (int d0 = 0; d0 < D; d0 += 256 * NV) {
        const int nvec_c = min(256 * NV, D - d0) >> 3;
        float acc[8 * NV];
#pragma unroll
        for (int i = 0; i < 8 * NV; ++i) acc[i] = 0.f;
        if (down_b != nullptr) {
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                const int vi = k * 32 + lane;
                if (vi < nvec_c) axpy8(acc + 8 * k, 1.f, __ldg(reinterpret_cast<const uint4*>(down_b + d0) + vi));
            }
        }
        warp_down_rows<NV>(acc, down_t, D, d0, nvec_c, lane, n, [&](int e) { return lc[e]; },
                           [&](int e) { return lh[e]; });
        warp_store_bf16<NV>(out + m * D + d0, acc, nvec_c, lane);
    }
}

// ---- backward, token-major: dh, the per-slot gradients, dX ------------------------------------------------
template <int NV, bool GATED>
__global__ void __launch_bounds__(TRAIN_WARPS * 32, 3) train_bwd_token_kernel(
    const unsigned short* __restrict__ gy,      // (M, D)
    const unsigned short* __restrict__ down_t,  // (H, D)
    const unsigned short* __restrict__ gate,    // (H, D) (GATED)
    const unsigned short* __restrict__ up,      // (H, D)
    const int* __restrict__ cols,               // (M, W)
    const unsigned short* __restrict__ g,       // (M, W)
    const unsigned short* __restrict__ u,       // (M, W) (GATED)
    const int* __restrict__ counts,             // (M,)
    float* __restrict__ dg_out,                 // (M, W) out (GATED): dh * u on live slots (others untouched)
    float* __restrict__ du_out,                 // (M, W) out: dh * g (plain: dh) on live slots
    const unsigned short* __restrict__ init,    // (M, D) or null: added to dx (the hot neurons' part)
    unsigned short* __restrict__ dx,            // (M, D) out; tail rows: init (the host writes them)
    const float* __restrict__ gl1,              // () dL/dl1, or null (the L1 term is unused)
    float inv_m,                                // 1 / M: dl1/d|h|
    long long M, int D, int W) {
    __shared__ int s_col[TRAIN_WARPS][TRAIN_MAX_WIDTH];
    __shared__ float s_dg[TRAIN_WARPS][TRAIN_MAX_WIDTH];
    __shared__ float s_du[TRAIN_WARPS][TRAIN_MAX_WIDTH];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long m = (long long)blockIdx.x * TRAIN_WARPS + warp;
    if (m >= M) return;
    int* lc = s_col[warp];
    float* ldg = s_dg[warp];
    float* ldu = s_du[warp];
    const int cnt = __ldg(counts + m);
    const int n = cnt <= W ? cnt : 0;
    const int nvec_d = D >> 3;
    const uint4* gyg = reinterpret_cast<const uint4*>(gy + m * D);
    const float c = gl1 != nullptr ? __ldg(gl1) * inv_m : 0.f;

    for (int e = lane; e < n; e += 32) lc[e] = __ldg(cols + m * W + e);
    __syncwarp();
    // phase A: two slots at a time (16 row loads in flight per lane)
    for (int e = 0; e < n; e += 2) {
        const bool two = e + 1 < n;
        float s0, s1;
        warp_dot2(gyg, reinterpret_cast<const uint4*>(down_t + (long long)lc[e] * D),
                  two ? reinterpret_cast<const uint4*>(down_t + (long long)lc[e + 1] * D) : nullptr, nvec_d, lane,
                  s0, s1);
        if (lane < (two ? 2 : 1)) {
            const int ee = e + lane;
            const float dot = lane == 0 ? s0 : s1;
            const float gv = bf16_to_f(__ldg(g + m * W + ee));
            const float uv = GATED ? bf16_to_f(__ldg(u + m * W + ee)) : 1.f;
            const float h = gv * uv;
            const float sg = h > 0.f ? 1.f : (h < 0.f ? -1.f : (h == 0.f ? 0.f : h));  // NaN stays NaN
            const float dh = dot + c * sg;
            const float dgv = GATED ? dh * uv : 0.f;
            const float duv = GATED ? dh * gv : dh;
            ldg[ee] = dgv;
            ldu[ee] = duv;
            if (GATED) dg_out[m * W + ee] = dgv;
            du_out[m * W + ee] = duv;
        }
    }
    __syncwarp();
    // phase B: dX_m = sum dg * G_j + du * U_j per D-chunk
    for (int d0 = 0; d0 < D; d0 += 256 * NV) {
        const int nvec_c = min(256 * NV, D - d0) >> 3;
        float acc[8 * NV];
#pragma unroll
        for (int i = 0; i < 8 * NV; ++i) acc[i] = 0.f;
        if (init != nullptr) {
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                const int vi = k * 32 + lane;
                if (vi < nvec_c) axpy8(acc + 8 * k, 1.f, __ldg(reinterpret_cast<const uint4*>(init + m * D + d0) + vi));
            }
        }
        for (int e = 0; e < n; ++e) {
            const long long j = lc[e];
            const uint4* ru = reinterpret_cast<const uint4*>(up + j * D + d0);
            uint4 qu[NV], qg[NV];
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                const int vi = k * 32 + lane;
                qu[k] = vi < nvec_c ? __ldg(ru + vi) : make_uint4(0u, 0u, 0u, 0u);
            }
            if (GATED) {
                const uint4* rg = reinterpret_cast<const uint4*>(gate + j * D + d0);
#pragma unroll
                for (int k = 0; k < NV; ++k) {
                    const int vi = k * 32 + lane;
                    qg[k] = vi < nvec_c ? __ldg(rg + vi) : make_uint4(0u, 0u, 0u, 0u);
                }
            }
            const float a_u = ldu[e];
            const float a_g = ldg[e];
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                axpy8(acc + 8 * k, a_u, qu[k]);
                if (GATED) axpy8(acc + 8 * k, a_g, qg[k]);
            }
        }
        uint4* og = reinterpret_cast<uint4*>(dx + m * D + d0);
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int vi = k * 32 + lane;
            if (vi < nvec_c) {
                const float* a8 = acc + 8 * k;
                og[vi] = make_uint4(pack_bf16x2(a8[0], a8[1]), pack_bf16x2(a8[2], a8[3]),
                                    pack_bf16x2(a8[4], a8[5]), pack_bf16x2(a8[6], a8[7]));
            }
        }
    }
}

// ---- backward, neuron-major: the weight gradients ----------------------------------------------------------
// Block b handles chunk b: entries [beg, end) of the CSC order `perm` (flat slots, tokens ascending within a
// neuron) of neuron chunk_neuron[b], over columns [blockIdx.y * 2048, +2048). part < 0: the chunk is the neuron's
// whole segment and writes the output rows directly; else it writes partial sums to scratch row `part`.
template <typename OutT>
__device__ __forceinline__ void store8(OutT* dst, const float* a);
template <>
__device__ __forceinline__ void store8<unsigned short>(unsigned short* dst, const float* a) {
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(pack_bf16x2(a[0], a[1]), pack_bf16x2(a[2], a[3]), pack_bf16x2(a[4], a[5]), pack_bf16x2(a[6], a[7]));
}
template <>
__device__ __forceinline__ void store8<float>(float* dst, const float* a) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(a[0], a[1], a[2], a[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(a[4], a[5], a[6], a[7]);
}

__device__ __forceinline__ void widen8(float* v, uint4 q) {
    v[0] = bf16_lo(q.x); v[1] = bf16_hi(q.x); v[2] = bf16_lo(q.y); v[3] = bf16_hi(q.y);
    v[4] = bf16_lo(q.z); v[5] = bf16_hi(q.z); v[6] = bf16_lo(q.w); v[7] = bf16_hi(q.w);
}

template <bool GATED, typename OutT>
__global__ void __launch_bounds__(NEURON_THREADS) train_bwd_neuron_kernel(
    const int* __restrict__ perm,           // (N,) flat slots m * W + k, neuron-major
    const int* __restrict__ chunk_neuron,   // (C,)
    const int* __restrict__ chunk_beg,      // (C,)
    const int* __restrict__ chunk_end,      // (C,)
    const int* __restrict__ chunk_part,     // (C,) -1 or scratch row
    const unsigned short* __restrict__ x,   // (M, D)
    const unsigned short* __restrict__ gy,  // (M, D)
    const unsigned short* __restrict__ g,   // (M, W)
    const unsigned short* __restrict__ u,   // (M, W) (GATED)
    const float* __restrict__ dg,           // (M, W) (GATED)
    const float* __restrict__ du,           // (M, W)
    OutT* __restrict__ d_down_t,            // (H, D) out
    OutT* __restrict__ d_gate,              // (H, D) out (GATED)
    OutT* __restrict__ d_up,                // (H, D) out
    float* __restrict__ scratch,            // (P, 3, D) partial sums (down, gate, up)
    int D, int W) {
    const int b = blockIdx.x;
    const int col = blockIdx.y * (NEURON_THREADS * 8) + threadIdx.x * 8;
    if (col >= D) return;
    const int beg = __ldg(chunk_beg + b), end = __ldg(chunk_end + b);
    float a_down[8], a_gate[8], a_up[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) a_down[i] = a_gate[i] = a_up[i] = 0.f;
    for (int e = beg; e < end; e += NEURON_UNROLL) {  // NEURON_UNROLL tokens' rows in flight
        uint4 xv[NEURON_UNROLL], yv[NEURON_UNROLL];
        float hv[NEURON_UNROLL], dgv[NEURON_UNROLL], duv[NEURON_UNROLL];
#pragma unroll
        for (int r = 0; r < NEURON_UNROLL; ++r) {
            const bool ok = e + r < end;
            const int s = ok ? __ldg(perm + e + r) : 0;
            const long long mm = s / W;
            xv[r] = ok ? __ldg(reinterpret_cast<const uint4*>(x + mm * D + col)) : make_uint4(0u, 0u, 0u, 0u);
            yv[r] = ok ? __ldg(reinterpret_cast<const uint4*>(gy + mm * D + col)) : make_uint4(0u, 0u, 0u, 0u);
            hv[r] = ok ? bf16_to_f(__ldg(g + s)) * (GATED ? bf16_to_f(__ldg(u + s)) : 1.f) : 0.f;
            duv[r] = ok ? __ldg(du + s) : 0.f;
            dgv[r] = (ok && GATED) ? __ldg(dg + s) : 0.f;
        }
#pragma unroll
        for (int r = 0; r < NEURON_UNROLL; ++r) {
            axpy8(a_down, hv[r], yv[r]);
            axpy8(a_up, duv[r], xv[r]);
            if (GATED) axpy8(a_gate, dgv[r], xv[r]);
        }
    }
    const int part = __ldg(chunk_part + b);
    if (part < 0) {
        const long long j = __ldg(chunk_neuron + b);
        store8<OutT>(d_down_t + j * D + col, a_down);
        store8<OutT>(d_up + j * D + col, a_up);
        if (GATED) store8<OutT>(d_gate + j * D + col, a_gate);
    } else {
        float* p = scratch + (long long)part * 3 * D + col;
        store8<float>(p, a_down);
        store8<float>(p + D, a_gate);
        store8<float>(p + 2 * D, a_up);
    }
}

// Sums the partial rows [first, first + n) of each split neuron, in order, into its output rows.
template <bool GATED, typename OutT>
__global__ void __launch_bounds__(NEURON_THREADS) train_reduce_kernel(
    const int* __restrict__ red_neuron,  // (Q,)
    const int* __restrict__ red_first,   // (Q,)
    const int* __restrict__ red_count,   // (Q,)
    const float* __restrict__ scratch,   // (P, 3, D)
    OutT* __restrict__ d_down_t, OutT* __restrict__ d_gate, OutT* __restrict__ d_up, int D) {
    const int q = blockIdx.x;
    const int col = blockIdx.y * (NEURON_THREADS * 8) + threadIdx.x * 8;
    if (col >= D) return;
    const int first = __ldg(red_first + q), n = __ldg(red_count + q);
    float a[3][8];
#pragma unroll
    for (int t = 0; t < 3; ++t)
#pragma unroll
        for (int i = 0; i < 8; ++i) a[t][i] = 0.f;
    for (int p = first; p < first + n; ++p) {
#pragma unroll
        for (int t = 0; t < 3; ++t) {
            const float4* src = reinterpret_cast<const float4*>(scratch + ((long long)p * 3 + t) * D + col);
            const float4 v0 = __ldg(src), v1 = __ldg(src + 1);
            a[t][0] += v0.x; a[t][1] += v0.y; a[t][2] += v0.z; a[t][3] += v0.w;
            a[t][4] += v1.x; a[t][5] += v1.y; a[t][6] += v1.z; a[t][7] += v1.w;
        }
    }
    const long long j = __ldg(red_neuron + q);
    store8<OutT>(d_down_t + j * D + col, a[0]);
    if (GATED) store8<OutT>(d_gate + j * D + col, a[1]);
    store8<OutT>(d_up + j * D + col, a[2]);
}

// ---- the hot neurons (dense GEMMs over their columns): the elementwise work around the GEMMs, one warp per row --
// Hp (padded hot width) is a multiple of 8; columns >= n_hot are padding (never active).
// forward: g = relu(g) in place (padding -> 0); GATED: u = g != 0 ? u : 0 in place and h = g * u -> h_out (bf16,
// for the down GEMM; plain: h = g); per-row |h| sum and h != 0 count added to l1_tok / tok_cnt (the cold kernel wrote
// them first); per-neuron counts added to neuron_cnt[hot_cols[c]].
template <bool GATED>
__global__ void __launch_bounds__(TRAIN_WARPS * 32) train_hot_fwd_kernel(
    unsigned short* __restrict__ g,          // (M, Hp) in: gathered gate pre-activation; out: relu'd
    unsigned short* __restrict__ u,          // (M, Hp) in/out (GATED): masked by the pattern
    unsigned short* __restrict__ h_out,      // (M, Hp) out (GATED)
    const long long* __restrict__ hot_cols,  // (Hp,) neuron of each column
    float* __restrict__ l1_tok, int* __restrict__ tok_cnt, int* __restrict__ neuron_cnt,
    long long M, int Hp, int n_hot) {
    const int lane = threadIdx.x & 31;
    const long long m = (long long)blockIdx.x * TRAIN_WARPS + (threadIdx.x >> 5);
    if (m >= M) return;
    float l1 = 0.f;
    int nz = 0;
    for (int c0 = lane * 8; c0 < Hp; c0 += 256) {
        uint4* gp = reinterpret_cast<uint4*>(g + m * Hp + c0);
        const uint4 gq = *gp;
        unsigned short gv[8] = {(unsigned short)(gq.x & 0xffffu), (unsigned short)(gq.x >> 16),
                                (unsigned short)(gq.y & 0xffffu), (unsigned short)(gq.y >> 16),
                                (unsigned short)(gq.z & 0xffffu), (unsigned short)(gq.z >> 16),
                                (unsigned short)(gq.w & 0xffffu), (unsigned short)(gq.w >> 16)};
        unsigned short uv[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (GATED) {
            const uint4 uq = *reinterpret_cast<const uint4*>(u + m * Hp + c0);
            uv[0] = uq.x & 0xffffu; uv[1] = uq.x >> 16; uv[2] = uq.y & 0xffffu; uv[3] = uq.y >> 16;
            uv[4] = uq.z & 0xffffu; uv[5] = uq.z >> 16; uv[6] = uq.w & 0xffffu; uv[7] = uq.w >> 16;
        }
        float hv[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const bool on = c0 + e < n_hot && relu_active(gv[e]);
            if (!on) {
                gv[e] = 0;
                uv[e] = 0;
            }
            hv[e] = bf16_to_f(gv[e]) * (GATED ? bf16_to_f(uv[e]) : 1.f);
            l1 += fabsf(hv[e]);
            if (hv[e] != 0.f) {
                ++nz;
                atomicAdd(neuron_cnt + hot_cols[c0 + e], 1);
            }
        }
        *gp = make_uint4((unsigned)gv[0] | ((unsigned)gv[1] << 16), (unsigned)gv[2] | ((unsigned)gv[3] << 16),
                         (unsigned)gv[4] | ((unsigned)gv[5] << 16), (unsigned)gv[6] | ((unsigned)gv[7] << 16));
        if (GATED) {
            *reinterpret_cast<uint4*>(u + m * Hp + c0) =
                make_uint4((unsigned)uv[0] | ((unsigned)uv[1] << 16), (unsigned)uv[2] | ((unsigned)uv[3] << 16),
                           (unsigned)uv[4] | ((unsigned)uv[5] << 16), (unsigned)uv[6] | ((unsigned)uv[7] << 16));
            *reinterpret_cast<uint4*>(h_out + m * Hp + c0) =
                make_uint4(pack_bf16x2(hv[0], hv[1]), pack_bf16x2(hv[2], hv[3]), pack_bf16x2(hv[4], hv[5]),
                           pack_bf16x2(hv[6], hv[7]));
        }
    }
    l1 = warp_sum(l1);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) nz += __shfl_xor_sync(SPARSIFY_FULL_MASK, nz, o);
    if (lane == 0) {
        l1_tok[m] += l1;
        tok_cnt[m] += nz;
    }
}

// backward: dh = g != 0 ? dh_raw + c * sign(g * u) : 0 (dh_raw = gy . DownT_j from a GEMM);
// GATED: dgdu[:, :Hp] = dh * u (dg), dgdu[:, Hp:] = dh * g (du), h_out = g * u; plain: dgdu = dh, (M, Hp).
template <bool GATED>
__global__ void __launch_bounds__(TRAIN_WARPS * 32) train_hot_bwd_kernel(
    const unsigned short* __restrict__ g, const unsigned short* __restrict__ u,  // (M, Hp)
    const unsigned short* __restrict__ dh_raw,                                   // (M, Hp)
    const float* __restrict__ gl1, float inv_m,
    unsigned short* __restrict__ dgdu,   // (M, 2 Hp) gated, (M, Hp) plain
    unsigned short* __restrict__ h_out,  // (M, Hp) (GATED)
    long long M, int Hp) {
    const int lane = threadIdx.x & 31;
    const long long m = (long long)blockIdx.x * TRAIN_WARPS + (threadIdx.x >> 5);
    if (m >= M) return;
    const float c = gl1 != nullptr ? __ldg(gl1) * inv_m : 0.f;
    const int ld = GATED ? 2 * Hp : Hp;
    for (int c0 = lane * 8; c0 < Hp; c0 += 256) {
        float gv[8], dv[8], uv[8];
        widen8(gv, __ldg(reinterpret_cast<const uint4*>(g + m * Hp + c0)));
        widen8(dv, __ldg(reinterpret_cast<const uint4*>(dh_raw + m * Hp + c0)));
        if (GATED) widen8(uv, __ldg(reinterpret_cast<const uint4*>(u + m * Hp + c0)));
        float a[8], b[8], hh[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float uu = GATED ? uv[e] : 1.f;
            const float h = gv[e] * uu;
            const float sg = h > 0.f ? 1.f : (h < 0.f ? -1.f : (h == 0.f ? 0.f : h));
            const float dh = gv[e] != 0.f ? dv[e] + c * sg : 0.f;
            a[e] = GATED ? dh * uu : dh;  // dg (plain: dh)
            b[e] = dh * gv[e];            // du (GATED)
            hh[e] = h;
        }
        *reinterpret_cast<uint4*>(dgdu + m * ld + c0) = make_uint4(
            pack_bf16x2(a[0], a[1]), pack_bf16x2(a[2], a[3]), pack_bf16x2(a[4], a[5]), pack_bf16x2(a[6], a[7]));
        if (GATED) {
            *reinterpret_cast<uint4*>(dgdu + m * ld + Hp + c0) = make_uint4(
                pack_bf16x2(b[0], b[1]), pack_bf16x2(b[2], b[3]), pack_bf16x2(b[4], b[5]), pack_bf16x2(b[6], b[7]));
            *reinterpret_cast<uint4*>(h_out + m * Hp + c0) = make_uint4(
                pack_bf16x2(hh[0], hh[1]), pack_bf16x2(hh[2], hh[3]), pack_bf16x2(hh[4], hh[5]), pack_bf16x2(hh[6], hh[7]));
        }
    }
}
template __global__ void train_hot_fwd_kernel<true>(unsigned short*, unsigned short*, unsigned short*,
                                                    const long long*, float*, int*, int*, long long, int, int);
template __global__ void train_hot_fwd_kernel<false>(unsigned short*, unsigned short*, unsigned short*,
                                                     const long long*, float*, int*, int*, long long, int, int);
template __global__ void train_hot_bwd_kernel<true>(const unsigned short*, const unsigned short*,
                                                    const unsigned short*, const float*, float, unsigned short*,
                                                    unsigned short*, long long, int);
template __global__ void train_hot_bwd_kernel<false>(const unsigned short*, const unsigned short*,
                                                     const unsigned short*, const float*, float, unsigned short*,
                                                     unsigned short*, long long, int);

// ---- bookkeeping in one block (replaces a dozen small torch ops per call: the host cost was the bottleneck) ----
#define PLAN_THREADS 1024

// Exclusive block-wide prefix sums of four ints at once; every thread of the block calls it and gets its
// exclusive prefix and the block's totals. PLAN_THREADS = 1024: 32 warps, one warp scans the warp totals.
__device__ __forceinline__ int4 warp_incl_scan4(int4 v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int a = __shfl_up_sync(SPARSIFY_FULL_MASK, v.x, o), b = __shfl_up_sync(SPARSIFY_FULL_MASK, v.y, o);
        const int c = __shfl_up_sync(SPARSIFY_FULL_MASK, v.z, o), d = __shfl_up_sync(SPARSIFY_FULL_MASK, v.w, o);
        if (lane >= o) {
            v.x += a; v.y += b; v.z += c; v.w += d;
        }
    }
    return v;
}

__device__ __forceinline__ int4 block_scan4(int4 v, int4& total) {
    __shared__ int4 s_warp[PLAN_THREADS / 32];
    __shared__ int4 s_tot;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int4 incl = warp_incl_scan4(v, lane);
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const int4 w = s_warp[lane];
        const int4 wi = warp_incl_scan4(w, lane);
        s_warp[lane] = make_int4(wi.x - w.x, wi.y - w.y, wi.z - w.z, wi.w - w.w);
        if (lane == 31) s_tot = wi;
    }
    __syncthreads();
    const int4 base = s_warp[warp];
    total = s_tot;
    __syncthreads();  // s_warp / s_tot are reused by the next call
    return make_int4(base.x + incl.x - v.x, base.y + incl.y - v.y, base.z + incl.z - v.z, base.w + incl.w - v.w);
}

// After the pattern kernel: tail rows (count > W, ascending), hot neurons (ascending), and the numbers the host
// needs, in one launch: stats = {R, live ELL entries, neuron-pass chunks, chunks of split neurons, split neurons,
// hot neurons}.
__global__ void __launch_bounds__(PLAN_THREADS) train_plan_kernel(
    const int* __restrict__ counts, const int* __restrict__ hist, const unsigned char* __restrict__ hot,  // hot: null ok
    long long* __restrict__ tail_rows,  // (M,) out: first R entries
    long long* __restrict__ hot_idx,    // (H,) out: first n_hot entries
    long long* __restrict__ stats,      // (8,) out
    int M, int H, int W, int chunk) {
    int r = 0;
    for (int base = 0; base < M; base += PLAN_THREADS) {
        const int i = base + threadIdx.x;
        const int f = (i < M && __ldg(counts + i) > W) ? 1 : 0;
        int4 tot;
        const int4 ex = block_scan4(make_int4(f, 0, 0, 0), tot);
        if (f) tail_rows[r + ex.x] = i;
        r += tot.x;
    }
    int4 acc = make_int4(0, 0, 0, 0);  // (live entries, chunks, split chunks, split neurons)
    int n_hot = 0;
    for (int base = 0; base < H; base += PLAN_THREADS) {
        const int j = base + threadIdx.x;
        const int seg = j < H ? __ldg(hist + j) : 0;
        const int nch = j < H ? max(1, (seg + chunk - 1) / chunk) : 0;
        const int hf = (j < H && hot != nullptr && hot[j] != 0) ? 1 : 0;
        int4 tot;
        const int4 ex = block_scan4(make_int4(hf, 0, 0, 0), tot);
        if (hf) hot_idx[n_hot + ex.x] = j;
        n_hot += tot.x;
        block_scan4(make_int4(seg, nch, nch > 1 ? nch : 0, nch > 1 ? 1 : 0), tot);
        acc.x += tot.x; acc.y += tot.y; acc.z += tot.z; acc.w += tot.w;
    }
    if (threadIdx.x == 0) {
        stats[0] = r; stats[1] = acc.x; stats[2] = acc.y; stats[3] = acc.z; stats[4] = acc.w; stats[5] = n_hot;
        stats[6] = 0; stats[7] = 0;
    }
}

// Backward: the neuron pass's chunks from the per-neuron ELL counts (CSC segment sizes), as the host used to
// build them: chunk c of neuron j covers entries [seg_beg_j + k * chunk, ...) of the CSC order; split neurons
// (more than one chunk) get consecutive scratch rows and one entry in the reduce lists.
__global__ void __launch_bounds__(PLAN_THREADS) train_chunks_kernel(
    const int* __restrict__ hist, int H, int chunk,
    int* __restrict__ c_neuron, int* __restrict__ c_beg, int* __restrict__ c_end, int* __restrict__ c_part,
    int* __restrict__ r_neuron, int* __restrict__ r_first, int* __restrict__ r_count) {
    int4 run = make_int4(0, 0, 0, 0);  // (entries, chunks, split chunks, split neurons) before this slice
    for (int base = 0; base < H; base += PLAN_THREADS) {
        const int j = base + threadIdx.x;
        const int seg = j < H ? __ldg(hist + j) : 0;
        const int nch = j < H ? max(1, (seg + chunk - 1) / chunk) : 0;
        const bool split = nch > 1;
        int4 tot;
        const int4 ex = block_scan4(make_int4(seg, nch, split ? nch : 0, split ? 1 : 0), tot);
        if (j < H) {
            const int beg0 = run.x + ex.x, c0 = run.y + ex.y, p0 = run.z + ex.z;
            for (int k = 0; k < nch; ++k) {
                const int b = beg0 + k * chunk;
                c_neuron[c0 + k] = j;
                c_beg[c0 + k] = b;
                c_end[c0 + k] = min(b + chunk, beg0 + seg);
                c_part[c0 + k] = split ? p0 + k : -1;
            }
            if (split) {
                const int q = run.w + ex.w;
                r_neuron[q] = j;
                r_first[q] = p0;
                r_count[q] = nch;
            }
        }
        run.x += tot.x; run.y += tot.y; run.z += tot.z; run.w += tot.w;
    }
}

#define SPARSIFY_TRAIN_TOKEN_INST(NV, G)                                                                         \
    template __global__ void train_fwd_kernel<NV, G>(                                                            \
        const unsigned short*, const unsigned short*, const unsigned short*, const unsigned short*,              \
        const unsigned short*, const int*, const unsigned short*, const int*, unsigned short*,                  \
        unsigned short*, float*, int*, int*, long long, int, int);         \
    template __global__ void train_bwd_token_kernel<NV, G>(                                                      \
        const unsigned short*, const unsigned short*, const unsigned short*, const unsigned short*, const int*,  \
        const unsigned short*, const unsigned short*, const int*, float*, float*, const unsigned short*,        \
        unsigned short*, const float*, float, long long, int, int);
SPARSIFY_TRAIN_TOKEN_INST(8, true)
SPARSIFY_TRAIN_TOKEN_INST(8, false)
SPARSIFY_TRAIN_TOKEN_INST(4, true)
SPARSIFY_TRAIN_TOKEN_INST(4, false)

#define SPARSIFY_TRAIN_NEURON_INST(G, T)                                                                          \
    template __global__ void train_bwd_neuron_kernel<G, T>(                                                       \
        const int*, const int*, const int*, const int*, const int*, const unsigned short*, const unsigned short*, \
        const unsigned short*, const unsigned short*, const float*, const float*, T*, T*, T*, float*, int, int);  \
    template __global__ void train_reduce_kernel<G, T>(const int*, const int*, const int*, const float*, T*, T*,  \
                                                       T*, int);
SPARSIFY_TRAIN_NEURON_INST(true, unsigned short)
SPARSIFY_TRAIN_NEURON_INST(false, unsigned short)
SPARSIFY_TRAIN_NEURON_INST(true, float)
SPARSIFY_TRAIN_NEURON_INST(false, float)
