// CMPQ decode kernel v4s (1 token), CUDA C++. A rework of v3b (lut_cuda.cu) aimed at its large
// fixed cost per block (benchmarks/notes-kernels.md): the groups' table builds ran one after another,
// each a dependent ch -> x global-load chain, with one quad of prefetch.
//
// Same index layout as v3b (the runtime layout's quads, cmpq/kernels/layout.py): per b-bit group,
// K = 32/b contiguous fields per int32 word, 4 words per (quad, row), stored q[quad][row][4].
//
// What is new:
// - One stream over the concatenation of all groups' quads: block s owns the contiguous range
//   [s*NQ/S, (s+1)*NQ/S) of it (so a block's work is the same whatever the bit mix), streamed
//   through a per-thread cp.async ring of D 16-byte slots in shared memory (D-1 quads in flight
//   while one is computed, across group boundaries); the first D are issued before the build.
// - Table build with no dependent chains in a loop: all channels of all groups of the block at once
//   (RMAX per thread per round, every load issued before any use), LUT[c][v] = x_c * cb_c[v] (fp32;
//   3-bit tables unpadded: 320 B per word instead of v3b's 512).
// - Lookup address: (word base | index << 2) + immediate; every table region is a multiple of its
//   alignment, so OR == ADD (no 64-bit pointer, 2 INT ops per lookup).
// Variants with pair lookup tables (fp32 / fp16), deeper prefetch and more blocks per SM (v4p, v4h,
// v4p8, v4h8, v4s5, v4s6) lost to this one and were deleted; their numbers are in the notes.
// Epilogue as v3b: split-K fp32 red.global.add into a self-zeroing accumulator, the last block of
// a row block (counter) adds bias and casts.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define NTHREADS 256
#define RMAX 2  // channels per thread per build round

struct G4 {
  const int4* q;        // [nq, out] int4
  const __half* cb;     // [npad, 2^b]
  const int* ch;        // [npad]
  int nq, bits;
};

struct P4 {
  const void* x; void* y; float* part; int* cnt;
  const int* och; const __half* owt; const int* crow; const int* scol; const float* corr; const float* bias;
  G4 g[3];
  int ldx, out, n_act, S, is_bf16, ngroups, ring_off, tbl_off;
};

__device__ __forceinline__ float xload(const P4& p, int c) {
  if (p.is_bf16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[c]);
  return __half2float(reinterpret_cast<const __half*>(p.x)[c]);
}

// bytes of one word's tables for a group
__device__ __forceinline__ int word_bytes(int bits) { return (32 / bits) * (1 << bits) * 4; }

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// ---- lookups: one 32-bit word of indices ----
template <int B, int I>
__device__ __forceinline__ void single_word(unsigned w, unsigned base, float* acc) {
  constexpr int K = 32 / B, V = 1 << B;
  if constexpr (I < K) {
    constexpr unsigned M = (V - 1) << 2;
    const unsigned vb = (I == 0) ? ((w << 2) & M) : ((w >> (B * I - 2)) & M);
    float v;
    asm volatile("ld.shared.f32 %0, [%1+%2];" : "=f"(v) : "r"(base | vb), "n"(I * V * 4));
    acc[I & 3] += v;
    single_word<B, I + 1>(w, base, acc);
  }
}

template <int B>
__device__ __forceinline__ void quad(int4 c, unsigned off, float* acc) {
  constexpr int WB = (32 / B) * (1 << B) * 4;
  single_word<B, 0>((unsigned)c.x, off, acc);
  single_word<B, 0>((unsigned)c.y, off + WB, acc);
  single_word<B, 0>((unsigned)c.z, off + 2 * WB, acc);
  single_word<B, 0>((unsigned)c.w, off + 3 * WB, acc);
}

struct Slice {  // this block's part of each group
  int qa[3], nq[3], G[3], tb[3];  // local first quad, count, concat start, table base
};

// a[g] for a run-time g without sending the array to local memory
__device__ __forceinline__ int sel(const int (&a)[3], int g) { return g == 0 ? a[0] : (g == 1 ? a[1] : a[2]); }

// One block's work: row block rb, split s of layer p (the body of both kernels below).
template <int D>
__device__ __forceinline__ void v4_block(const P4& p, const int rb, const int s) {
  extern __shared__ __align__(16) char smem_raw[];
  __shared__ int is_last;
  const unsigned raw = (unsigned)__cvta_generic_to_shared(smem_raw);
  const unsigned sbase = (raw + 255u) & ~255u;  // 256-byte aligned: tables OR their index bits in
  char* smem = smem_raw + (sbase - raw);
  const int tid = threadIdx.x;
  const int r = rb * NTHREADS + tid;
  const bool rvalid = r < p.out;

  Slice sl;
  int NQ = 0;
#pragma unroll
  for (int g = 0; g < 3; ++g) { sl.G[g] = NQ; NQ += g < p.ngroups ? p.g[g].nq : 0; }
  const int Q0 = (int)((long long)s * NQ / p.S), Q1 = (int)((long long)(s + 1) * NQ / p.S);
  {
    int tb = 0;
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      int a = 0, n = 0;
      if (g < p.ngroups) {
        const int lo = max(Q0, sl.G[g]), hi = min(Q1, sl.G[g] + p.g[g].nq);
        a = lo - sl.G[g]; n = max(0, hi - lo);
      }
      sl.qa[g] = a; sl.nq[g] = n; sl.tb[g] = tb;
      if (n) tb += n * 4 * word_bytes(p.g[g].bits);
    }
  }
  // -- 1. start streaming: the first D quads of the slice into this thread's ring slots
  const unsigned ring = sbase + p.ring_off + tid * 16;
  auto qaddr = [&](int q) -> const int4* {  // global quad index -> this row's int4
    const int g = (q >= sl.G[1] && p.ngroups > 1) ? ((q >= sl.G[2] && p.ngroups > 2) ? 2 : 1) : 0;
    return p.g[g].q + (size_t)(q - sel(sl.G, g)) * p.out + r;
  };
  // first global quad after q's group (groups absent from the layer start at NQ)
  auto gend = [&](int q) -> int { return q < sl.G[1] ? sl.G[1] : (q < sl.G[2] ? sl.G[2] : NQ); };
#pragma unroll
  for (int k = 0; k < D; ++k) {
    if (rvalid && Q0 + k < Q1) cp_async16(ring + k * NTHREADS * 16, qaddr(Q0 + k));
    cp_commit();
  }
  // -- 2. build: one channel per thread per round, all loads before any use
  int ctot = 0;
#pragma unroll
  for (int g = 0; g < 3; ++g) ctot += sl.nq[g] * 4 * (32 / (g < p.ngroups ? p.g[g].bits : 32));
  for (int base = 0; base < ctot; base += NTHREADS * RMAX) {
    int gi[RMAX], jj[RMAX], chv[RMAX];
    uint4 cbr[RMAX][2];
    float xv[RMAX];
#pragma unroll
    for (int i = 0; i < RMAX; ++i) {
      int vc = base + tid + i * NTHREADS;
      gi[i] = -1; jj[i] = 0;
      if (vc < ctot) {
#pragma unroll
        for (int g = 0; g < 3; ++g) {
          const int n = sl.nq[g] * 4 * (32 / (g < p.ngroups ? p.g[g].bits : 32));
          if (gi[i] < 0) { if (vc < n) { gi[i] = g; jj[i] = vc; } else vc -= n; }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < RMAX; ++i) {
      chv[i] = 0; cbr[i][0] = cbr[i][1] = make_uint4(0, 0, 0, 0);
      if (gi[i] >= 0) {
        const G4& g = p.g[gi[i]];
        const int j = sel(sl.qa, gi[i]) * 4 * (32 / g.bits) + jj[i];
        chv[i] = g.ch[j];
        const int V = 1 << g.bits;
        const char* row = reinterpret_cast<const char*>(g.cb + (size_t)j * V);
        if (V == 4) { const uint2 t = *reinterpret_cast<const uint2*>(row); cbr[i][0] = make_uint4(t.x, t.y, 0, 0); }
        else {
          cbr[i][0] = *reinterpret_cast<const uint4*>(row);
          if (V == 16) cbr[i][1] = *reinterpret_cast<const uint4*>(row + 16);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < RMAX; ++i) xv[i] = gi[i] >= 0 ? xload(p, chv[i]) : 0.f;
#pragma unroll
    for (int i = 0; i < RMAX; ++i) {
      if (gi[i] < 0) continue;
      const G4& g = p.g[gi[i]];
      const int B = g.bits, V = 1 << B, K = 32 / B;
      float v[16];
      const __half2* h2 = reinterpret_cast<const __half2*>(&cbr[i][0]);
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const float2 f = __half22float2(h2[t]);
        v[2 * t] = f.x * xv[i]; v[2 * t + 1] = f.y * xv[i];
      }
      const int word = jj[i] / K, f = jj[i] - word * K;
      float* dst = reinterpret_cast<float*>(smem + p.tbl_off + sel(sl.tb, gi[i]) + word * (K * V * 4)) + f * V;
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
      if (V >= 8) *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
      if (V == 16) {
        *reinterpret_cast<float4*>(dst + 8) = make_float4(v[8], v[9], v[10], v[11]);
        *reinterpret_cast<float4*>(dst + 12) = make_float4(v[12], v[13], v[14], v[15]);
      }
    }
  }
  __syncthreads();
  // -- 3. stream the indices
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int slot = 0;
  int q = Q0;
  // refill stream: quad rq comes from rptr; within a group consecutive quads are `out` int4 apart,
  // so the address is recomputed only where the group changes (rend)
  int rq = Q0 + D;
  const int4* rptr = qaddr(rq);
  int rend = gend(rq);
#pragma unroll 1
  for (int g = 0; g < 3; ++g) {
    const int ng = sel(sl.nq, g);
    if (g >= p.ngroups || ng == 0) continue;
    const int B = p.g[g].bits;
    const int QB = 4 * word_bytes(B);
    unsigned off = sbase + p.tbl_off + sel(sl.tb, g);
    const int qend = q + ng;
#pragma unroll 1
    for (; q < qend; ++q) {
      cp_wait<D - 1>();
      int4 c;
      asm volatile("ld.shared.v4.s32 {%0,%1,%2,%3}, [%4];" : "=r"(c.x), "=r"(c.y), "=r"(c.z), "=r"(c.w)
                   : "r"(ring + slot * NTHREADS * 16));
      if (B == 2) quad<2>(c, off, acc);
      else if (B == 3) quad<3>(c, off, acc);
      else quad<4>(c, off, acc);
      // refill the slot just read (its value is in registers and used above) with quad q + D
      if (rvalid && rq < Q1) cp_async16(ring + slot * NTHREADS * 16, rptr);
      cp_commit();
      ++rq;
      rptr += p.out;
      if (rq == rend) { rptr = qaddr(rq); rend = gend(rq); }
      off += QB;
      slot = slot + 1 == D ? 0 : slot + 1;
    }
  }
  cp_wait<0>();
  float y0 = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  if (rvalid) {
    for (int a = s; a < p.n_act; a += p.S)  // fp16 activation-outlier columns, [n_act, out]
      y0 += __half2float(p.owt[(size_t)a * p.out + r]) * xload(p, p.och[a]);
    const int k1 = p.crow[r + 1];
    for (int k = p.crow[r] + s; k < k1; k += p.S) y0 += p.corr[k] * xload(p, p.scol[k]);
    atomicAdd(&p.part[r], y0);
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(&p.cnt[rb], 1) == p.S - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (rvalid) {
    float* ptr = &p.part[r];
    float sum = __ldcg(ptr);
    __stcg(ptr, 0.f);
    if (p.bias) sum += p.bias[r];
    if (p.is_bf16) reinterpret_cast<__nv_bfloat16*>(p.y)[r] = __float2bfloat16(sum);
    else reinterpret_cast<__half*>(p.y)[r] = __float2half(sum);
  }
  if (tid == 0) p.cnt[rb] = 0;
}

// __launch_bounds__(256, 4): 64 registers, no spills (48 or 40 registers for 5 or 6 blocks per SM
// measured 0-9% slower: benchmarks/notes-kernels.md)
template <int D>
__global__ void __launch_bounds__(NTHREADS, 4) v4_kernel(const P4 p) {
  v4_block<D>(p, blockIdx.x, blockIdx.y);
}

// Several layers that share their input x (q/k/v, gate/up) in one launch: blockIdx.z picks the
// layer, each with its own plan (row blocks, splits) and workspace; the grid covers the largest.
#define MAX_GROUP 3
struct P4G {
  P4 m[MAX_GROUP];
  int n;
};

template <int D>
__global__ void __launch_bounds__(NTHREADS, 4) v4g_kernel(const P4G g) {
  const P4& p = g.m[blockIdx.z];
  if ((int)blockIdx.x * NTHREADS >= p.out || (int)blockIdx.y >= p.S) return;
  v4_block<D>(p, blockIdx.x, blockIdx.y);
}

#define RING_DEPTH 4  // cp.async ring slots per thread (depth 8 measured slower: notes-kernels.md)

extern "C" int cmpq_v4g_launch(const P4G* g, int gx, int gy, int smem, void* stream) {
  if (g->n < 1 || g->n > MAX_GROUP) return -1;
  static bool init = false;
  if (!init) {
    cudaError_t e = cudaFuncSetAttribute(v4g_kernel<RING_DEPTH>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return (int)e;
    init = true;
  }
  v4g_kernel<RING_DEPTH><<<dim3(gx, gy, g->n), NTHREADS, smem, reinterpret_cast<cudaStream_t>(stream)>>>(*g);
  return (int)cudaGetLastError();
}
extern "C" int cmpq_v4g_params_size() { return (int)sizeof(P4G); }

extern "C" int cmpq_v4_launch(const P4* p, int gx, int gy, int smem, void* stream) {
  static bool init = false;
  if (!init) {
    cudaError_t e = cudaFuncSetAttribute(v4_kernel<RING_DEPTH>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return (int)e;
    init = true;
  }
  v4_kernel<RING_DEPTH><<<dim3(gx, gy), NTHREADS, smem, reinterpret_cast<cudaStream_t>(stream)>>>(*p);
  return (int)cudaGetLastError();
}

extern "C" int cmpq_v4_params_size() { return (int)sizeof(P4); }
extern "C" const char* cmpq_v4_error_string(int e) { return cudaGetErrorString((cudaError_t)e); }
