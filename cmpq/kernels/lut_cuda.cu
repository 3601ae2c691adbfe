// CMPQ decode kernel v3 (1..16 tokens), CUDA C++: shared-memory lookup tables, 32-bit addressing.
//
// Layout (the runtime layout's quads, built once by cmpq/kernels/layout.py, never saved): each b-bit group's indices are
// repacked into contiguous fields, K = 32/b indices per int32 word (16 x 2-bit, 10 x 3-bit,
// 8 x 4-bit), 4 words ("a quad") per (row, quad of chunks), stored q[quad][row][4] so a warp's
// 16-byte loads cover 32 consecutive rows (512 contiguous bytes).
//
// Grid (row blocks of 256, S channel splits). A block owns 256 rows (one per thread) and a slice
// of every group's quads. It first builds, in shared memory, for its channels:
//   NT == 1: LUT[c][v] = x[ch_c] * codebook[c][v] (fp32), so a weight costs
//            SHF + LOP3 (byte offset) + LDS (32-bit address + immediate) + FADD;
//   NT > 1 : the fp32 codebook and x[t][ch_c] (broadcast reads), a weight costs the lookup + NT FFMA.
// Chunk c of a group has its table at a power-of-two stride, so the byte offset of a lookup is
// (chunk base | (index << 2)) + compile-time i*2^b*4: no 64-bit pointer per weight.
// The same block also adds its share (1/S) of the fp16 outlier columns and of the sparse-outlier
// corrections (sparse_val - W_q, see layout.py), writes fp32 partials, and the last block of a row
// block (atomic counter, reset by it) reads the fp32 sums (red.global.add from all S blocks),
// zeroes them again, adds the bias and stores y in the activation dtype: one launch. The order of the
// fp32 additions varies between runs (split-K atomics): results agree to fp32 rounding.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define NTHREADS 256

struct Grp {
  const int4* q;        // [nq, out] int4
  const __half* cb;     // [n, 2^b]
  const int* ch;        // [n]
  int n, nq, bits, smem_off, xs_off, pad_;
};

struct Params {
  const void* x; void* y; float* part; int* cnt;
  const int* och; const __half* owt; const int* crow; const int* scol; const float* corr; const float* bias;
  Grp g[3];
  int ldx, T, out, n_act, S, is_bf16, ngroups, pad_;
};

template <int B> struct Cfg {
  static constexpr int V = 1 << B;
  static constexpr int K = 32 / B;
  static constexpr int KPAD = K > 8 ? 16 : 8;
  static constexpr int CB = KPAD * V * 4;  // bytes of one chunk's table (power of two)
};

__device__ __forceinline__ float xload(const Params& p, int t, int c) {
  if (p.is_bf16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[t * p.ldx + c]);
  return __half2float(reinterpret_cast<const __half*>(p.x)[t * p.ldx + c]);
}

__device__ __forceinline__ int4 ld_stream(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  return v;
}

template <int B, int NT>
__device__ void build(const Params& p, const Grp& g, char* smem, int s) {
  // One channel per thread (a block holds <= ~256 channels per group): the dependent loads
  // ch -> x are paid once per block, not once per table entry. ch/cb are padded to whole quads
  // (cb zeros), so no bounds checks.
  using C = Cfg<B>;
  const int q0 = (int)((long long)s * g.nq / p.S), q1 = (int)((long long)(s + 1) * g.nq / p.S);
  const int nchan = (q1 - q0) * 4 * C::K;
  for (int jj = threadIdx.x; jj < nchan; jj += NTHREADS) {
    const int j = q0 * 4 * C::K + jj, c = jj / C::K, i = jj - c * C::K;
    const int chj = g.ch[j];
    float* lut = reinterpret_cast<float*>(smem + g.smem_off) + (c * C::KPAD + i) * C::V;
    float xv[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) xv[t] = t < p.T ? xload(p, t, chj) : 0.f;
#pragma unroll
    for (int v4 = 0; v4 < C::V; v4 += 4) {
      const uint2 raw = *reinterpret_cast<const uint2*>(g.cb + (size_t)j * C::V + v4);
      const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
      const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
      const float m = NT == 1 ? xv[0] : 1.f;
      *reinterpret_cast<float4*>(lut + v4) = make_float4(lo.x * m, lo.y * m, hi.x * m, hi.y * m);
    }
    if constexpr (NT > 1) {
      float* xs = reinterpret_cast<float*>(smem + g.xs_off) + (c * C::KPAD + i) * NT;
#pragma unroll
      for (int t = 0; t < NT; t += 4) *reinterpret_cast<float4*>(xs + t) = make_float4(xv[t], xv[t + 1], xv[t + 2], xv[t + 3]);
    }
  }
}

template <int B, int NT, int I>
__device__ __forceinline__ void word(unsigned w, unsigned base, unsigned xoff, const char* smem, float* acc) {
  using C = Cfg<B>;
  if constexpr (I < C::K) {
    constexpr unsigned M = (C::V - 1) << 2;
    const unsigned vb = (I == 0) ? ((w << 2) & M) : ((w >> (B * I - 2)) & M);
    float v;  // 32-bit shared address: (chunk base | index*4) + immediate, no 64-bit pointer
    asm volatile("ld.shared.f32 %0, [%1+%2];" : "=f"(v) : "r"(base | vb), "n"(I * C::V * 4));
    if constexpr (NT == 1) {
      acc[I & 1] += v;
    } else if constexpr (NT == 2) {
    const float2 xx = *reinterpret_cast<const float2*>(smem + xoff + I * NT * 4);
      acc[0] += v * xx.x; acc[1] += v * xx.y;
    } else {
#pragma unroll
      for (int t4 = 0; t4 < NT / 4; ++t4) {
        const float4 xx = *reinterpret_cast<const float4*>(smem + xoff + I * NT * 4 + t4 * 16);
        acc[4 * t4 + 0] += v * xx.x; acc[4 * t4 + 1] += v * xx.y;
        acc[4 * t4 + 2] += v * xx.z; acc[4 * t4 + 3] += v * xx.w;
      }
    }
    word<B, NT, I + 1>(w, base, xoff, smem, acc);
  }
}

__device__ __forceinline__ int quad_begin(const Params& p, const Grp& g, int s) {
  return (int)((long long)s * g.nq / p.S);
}

template <int B, int NT>
__device__ void compute(const Params& p, const Grp& g, const char* smem, unsigned sbase, int s, int r, int4 cur,
                        float* acc) {
  using C = Cfg<B>;
  const int q0 = quad_begin(p, g, s), q1 = quad_begin(p, g, s + 1);
  const int4* qp = g.q + (size_t)q0 * p.out + r;
  unsigned off = sbase + g.smem_off, xoff = g.xs_off;
  for (int q = q0; q < q1; ++q) {
    int4 nxt = cur;
    if (q + 1 < q1) nxt = ld_stream(qp + (size_t)(q + 1 - q0) * p.out);
    word<B, NT, 0>((unsigned)cur.x, off, xoff, smem, acc);
    word<B, NT, 0>((unsigned)cur.y, off + C::CB, xoff + C::KPAD * NT * 4, smem, acc);
    word<B, NT, 0>((unsigned)cur.z, off + 2 * C::CB, xoff + 2 * C::KPAD * NT * 4, smem, acc);
    word<B, NT, 0>((unsigned)cur.w, off + 3 * C::CB, xoff + 3 * C::KPAD * NT * 4, smem, acc);
    off += 4 * C::CB;
    xoff += 4 * C::KPAD * NT * 4;
    cur = nxt;
  }
}

template <int NT>
__global__ void __launch_bounds__(NTHREADS) lut_kernel(const Params p) {
  extern __shared__ __align__(16) char smem_raw[];
  __shared__ int is_last;
  // 128-byte aligned start: chunk tables sit at multiples of their (power-of-two) size, so the
  // index bits can be OR-ed into the address.
  const unsigned raw = (unsigned)__cvta_generic_to_shared(smem_raw);
  const unsigned sbase = (raw + 127u) & ~127u;
  char* smem = smem_raw + (sbase - raw);
  const int rb = blockIdx.x, s = blockIdx.y;
  const int r = rb * NTHREADS + threadIdx.x;
  constexpr int NA = NT == 1 ? 2 : NT;
  float acc[NA];
#pragma unroll
  for (int t = 0; t < NA; ++t) acc[t] = 0.f;

  // Start streaming the indices before the tables are built: the first quad of every group.
  int4 first[3];
#pragma unroll
  for (int gi = 0; gi < 3; ++gi) {
    first[gi] = make_int4(0, 0, 0, 0);
    if (gi < p.ngroups && r < p.out) {
      const int q0 = quad_begin(p, p.g[gi], s);
      if (q0 < quad_begin(p, p.g[gi], s + 1)) first[gi] = ld_stream(p.g[gi].q + (size_t)q0 * p.out + r);
    }
  }
#pragma unroll
  for (int gi = 0; gi < 3; ++gi) {
    if (gi < p.ngroups) {
      const Grp& g = p.g[gi];
      if (g.bits == 2) build<2, NT>(p, g, smem, s);
      else if (g.bits == 3) build<3, NT>(p, g, smem, s);
      else build<4, NT>(p, g, smem, s);
    }
  }
  __syncthreads();
  if (r < p.out) {
#pragma unroll
    for (int gi = 0; gi < 3; ++gi) {
      if (gi < p.ngroups) {
        const Grp& g = p.g[gi];
        if (g.bits == 2) compute<2, NT>(p, g, smem, sbase, s, r, first[gi], acc);
        else if (g.bits == 3) compute<3, NT>(p, g, smem, sbase, s, r, first[gi], acc);
        else compute<4, NT>(p, g, smem, sbase, s, r, first[gi], acc);
      }
    }
    if (NT == 1) { acc[0] += acc[1]; acc[1] = 0.f; }
    for (int a = s; a < p.n_act; a += p.S) {  // fp16 activation-outlier columns, [n_act, out]
      const float w = __half2float(p.owt[(size_t)a * p.out + r]);
      const int c = p.och[a];
#pragma unroll
      for (int t = 0; t < NT; ++t)
        if (t < p.T) acc[t] += w * xload(p, t, c);
    }
    const int k1 = p.crow[r + 1];
    for (int k = p.crow[r] + s; k < k1; k += p.S) {  // sparse outliers: (val - W_q) * x
      const float v = p.corr[k];
      const int c = p.scol[k];
#pragma unroll
      for (int t = 0; t < NT; ++t)
        if (t < p.T) acc[t] += v * xload(p, t, c);
    }
    // split-K: fire-and-forget fp32 reductions into a zeroed accumulator (no latency chain)
#pragma unroll
    for (int t = 0; t < NT; ++t)
      if (t < p.T) atomicAdd(&p.part[(size_t)t * p.out + r], acc[t]);
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&p.cnt[rb], 1) == p.S - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (r < p.out) {
    for (int t = 0; t < p.T; ++t) {
      float* ptr = &p.part[(size_t)t * p.out + r];
      float sum = __ldcg(ptr);
      __stcg(ptr, 0.f);  // leave the accumulator zeroed for the next call (also inside a CUDA graph)
      if (p.bias) sum += p.bias[r];
      if (p.is_bf16) reinterpret_cast<__nv_bfloat16*>(p.y)[(size_t)t * p.out + r] = __float2bfloat16(sum);
      else reinterpret_cast<__half*>(p.y)[(size_t)t * p.out + r] = __float2half(sum);
    }
  }
  if (threadIdx.x == 0) p.cnt[rb] = 0;
}

template <int NT>
static int launch(const Params* p, int gx, int gy, int smem, cudaStream_t st) {
  static bool init = false;
  if (!init) {
    cudaError_t e = cudaFuncSetAttribute(lut_kernel<NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return (int)e;
    init = true;
  }
  lut_kernel<NT><<<dim3(gx, gy), NTHREADS, smem, st>>>(*p);
  return (int)cudaGetLastError();
}

extern "C" int cmpq_lut_launch(const Params* p, int nt, int gx, int gy, int smem, void* stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (nt) {
    case 1: return launch<1>(p, gx, gy, smem, st);
    case 4: return launch<4>(p, gx, gy, smem, st);
    case 8: return launch<8>(p, gx, gy, smem, st);
    case 16: return launch<16>(p, gx, gy, smem, st);
  }
  return -1;
}

extern "C" int cmpq_params_size() { return (int)sizeof(Params); }
extern "C" const char* cmpq_error_string(int e) { return cudaGetErrorString((cudaError_t)e); }
