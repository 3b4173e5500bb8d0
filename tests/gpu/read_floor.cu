// Probe (development tool, tests/gpu/read_floor.py): the time one kernel needs to read a weight matrix from HBM
// once, with nothing else to do, as a floor for the decode gate GEMM. Prepended with common.cuh by the tool.
// w: n16 16-byte words; each thread keeps U loads in flight (consecutive threads read consecutive words). The XOR
// of the words is written only if it equals a constant, so the loads cannot be dropped and nothing is stored.
// pdl: launched with programmatic dependent launch, the next probe may start at once (its reads do not depend on
// this one), so a chain of them shows the bandwidth with the launch and ramp of each kernel hidden.
template <int U>
__global__ void __launch_bounds__(512) read_floor_kernel(const uint4* __restrict__ w, long long n16,
                                                         unsigned int* __restrict__ out, int pdl) {
    if (pdl) pdl_launch_dependents();
    unsigned int acc = 0;
    const long long step = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (U - 1) * step < n16; i += U * step) {
        uint4 q[U];
#pragma unroll
        for (int u = 0; u < U; ++u) q[u] = ld_stream16(w + i + u * step);
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= q[u].x ^ q[u].y ^ q[u].z ^ q[u].w;
    }
    for (; i < n16; i += step) {
        const uint4 q = ld_stream16(w + i);
        acc ^= q.x ^ q.y ^ q.z ^ q.w;
    }
    pdl_wait();  // nothing is written before the kernel ahead has finished (common.cuh's rule)
    if (acc == 0x9e3779b9u) out[0] = acc;
}

// The instances read_floor.py launches (explicit, so that a plain nvcc compile of this file, as the CI test does,
// emits and checks them too)
template __global__ void read_floor_kernel<4>(const uint4*, long long, unsigned int*, int);
template __global__ void read_floor_kernel<8>(const uint4*, long long, unsigned int*, int);
template __global__ void read_floor_kernel<16>(const uint4*, long long, unsigned int*, int);
