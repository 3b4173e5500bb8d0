// Shared helpers for the sparsify kernels. No CUDA headers are needed (NVRTC and nvcc both work without
// cuda_bf16.h): bf16 values travel as raw 16-bit patterns and are widened/rounded by bit manipulation.
#pragma once

#define SPARSIFY_FULL_MASK 0xffffffffu

// bf16 bit pattern -> float (exact).
__device__ __forceinline__ float bf16_lo(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float bf16_to_f(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }

// float -> bf16 bit pattern, round to nearest even (as torch's .to(torch.bfloat16)); NaN stays NaN.
__device__ __forceinline__ unsigned short f_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    return (unsigned int)f_to_bf16(lo) | ((unsigned int)f_to_bf16(hi) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SPARSIFY_FULL_MASK, v, o);
    return v;
}

// acc[0..7] += h * (8 bf16 in q)
__device__ __forceinline__ void axpy8(float* acc, float h, uint4 q) {
    acc[0] = fmaf(h, bf16_lo(q.x), acc[0]); acc[1] = fmaf(h, bf16_hi(q.x), acc[1]);
    acc[2] = fmaf(h, bf16_lo(q.y), acc[2]); acc[3] = fmaf(h, bf16_hi(q.y), acc[3]);
    acc[4] = fmaf(h, bf16_lo(q.z), acc[4]); acc[5] = fmaf(h, bf16_hi(q.z), acc[5]);
    acc[6] = fmaf(h, bf16_lo(q.w), acc[6]); acc[7] = fmaf(h, bf16_hi(q.w), acc[7]);
}

// s + dot(8 bf16 in p, 8 bf16 in q)
__device__ __forceinline__ float dot8(float s, uint4 p, uint4 q) {
    s = fmaf(bf16_lo(p.x), bf16_lo(q.x), s); s = fmaf(bf16_hi(p.x), bf16_hi(q.x), s);
    s = fmaf(bf16_lo(p.y), bf16_lo(q.y), s); s = fmaf(bf16_hi(p.y), bf16_hi(q.y), s);
    s = fmaf(bf16_lo(p.z), bf16_lo(q.z), s); s = fmaf(bf16_hi(p.z), bf16_hi(q.z), s);
    s = fmaf(bf16_lo(p.w), bf16_lo(q.w), s); s = fmaf(bf16_hi(p.w), bf16_hi(q.w), s);
    return s;
}

// "Non-zero" after relu: v > 0, and NaN counts (it must not disappear silently). -0.0 is zero.
__device__ __forceinline__ bool relu_active(unsigned short b) {
    float f = bf16_to_f(b);
    return !(f <= 0.0f);
}
