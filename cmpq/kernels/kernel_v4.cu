// CMPQ decode kernel v4 (1 token), CUDA C++. Variants of v3b (lut_cuda.cu) aimed at its two
// measured problems (benchmarks/notes-kernels.md): a large fixed cost per block (the groups' table
// builds ran one after another, each a dependent ch -> x global-load chain, with one quad of
// prefetch), and 4 instructions (1 LDS wavefront) per weight.
//
// Same index layout as v3b (built by cuda_decode.repack, shared): per b-bit group, K = 32/b
// contiguous fields per int32 word, 4 words per (quad, row), stored q[quad][row][4].
//
// What is new:
// - One stream over the concatenation of all groups' quads: block s owns the contiguous range
//   [s*NQ/S, (s+1)*NQ/S) of it (so a block's work is the same whatever the bit mix), streamed
//   through a per-thread cp.async ring of D 16-byte slots in shared memory (D-1 quads in flight
//   while one is computed, across group boundaries); the first D are issued before the build.
// - Build in two phases, no dependent chains in a loop: phase 1, all channels of all groups of the
//   block at once (up to 4 per thread, every load issued before any use): single-table groups
//   write LUT[c][v] = x_c * cb_c[v] (fp32); pair groups write P[c][v] = x_c * cb_c[v] to a staging
//   area. Phase 2 (pair groups only): pair tables T[p][a + b*V] = P[2p][a] + P[2p+1][b].
// - MODE (template): 0 = single fp32 tables for every width (v3b's lookup, 3-bit tables unpadded:
//   320 B per word instead of 512); 1 = pair tables fp32 for 2- and 3-bit (one lookup per two
//   weights; 3-bit: 64 entries over 32 banks, so ~2 wavefronts per lookup); 2 = like 1 but 3-bit
//   pair tables in fp16 (64 x 2 B = 128 B: one wavefront), scaled per block by a power of two
//   (entries <= 2^15, exact to undo) so neither fp16 nor bf16 inputs overflow. 4-bit is always single.
// - Lookup address: (word base | index << log2(esize)) + immediate; every table region is a
//   multiple of its alignment, so OR == ADD (no 64-bit pointer, 2 INT ops per lookup).
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
  int nq, bits, pair, esize;  // pair: this group uses pair tables; esize: table entry bytes
};

struct P4 {
  const void* x; void* y; float* part; int* cnt;
  const int* och; const __half* owt; const int* crow; const int* scol; const float* corr; const float* bias;
  G4 g[3];
  int ldx, out, n_act, S, is_bf16, ngroups, ring_off, tbl_off, stage_off, red_off;
};

__device__ __forceinline__ float xload(const P4& p, int c) {
  if (p.is_bf16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[c]);
  return __half2float(reinterpret_cast<const __half*>(p.x)[c]);
}

// bytes of one word's tables for a group
__device__ __forceinline__ int word_bytes(int bits, int pair, int esize) {
  const int K = 32 / bits;
  return pair ? (K / 2) * (1 << (2 * bits)) * esize : K * (1 << bits) * 4;
}

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

template <int B, int P>
__device__ __forceinline__ void pair32_word(unsigned w, unsigned base, float* acc) {
  constexpr int NP = 32 / B / 2, PB = 2 * B, E = 1 << PB;
  if constexpr (P < NP) {
    constexpr unsigned M = (E - 1) << 2;
    const unsigned vb = (P == 0) ? ((w << 2) & M) : ((w >> (PB * P - 2)) & M);
    float v;
    asm volatile("ld.shared.f32 %0, [%1+%2];" : "=f"(v) : "r"(base | vb), "n"(P * E * 4));
    acc[P & 3] += v;
    pair32_word<B, P + 1>(w, base, acc);
  }
}

template <int B, int P>
__device__ __forceinline__ void pair16_word(unsigned w, unsigned base, float* acc) {
  constexpr int NP = 32 / B / 2, PB = 2 * B, E = 1 << PB;
  if constexpr (P < NP) {
    constexpr unsigned M = (E - 1) << 1;
    const unsigned vb = (P == 0) ? ((w << 1) & M) : ((w >> (PB * P - 1)) & M);
    unsigned short h;
    asm volatile("ld.shared.u16 %0, [%1+%2];" : "=h"(h) : "r"(base | vb), "n"(P * E * 2));
    acc[P & 3] += __half2float(__ushort_as_half(h));
    pair16_word<B, P + 1>(w, base, acc);
  }
}

template <int B, int MODE>
__device__ __forceinline__ void quad(int4 c, unsigned off, float* acc, float* accp) {
  if constexpr (B == 4 || MODE == 0) {
    constexpr int WB = (32 / B) * (1 << B) * 4;
    single_word<B, 0>((unsigned)c.x, off, acc);
    single_word<B, 0>((unsigned)c.y, off + WB, acc);
    single_word<B, 0>((unsigned)c.z, off + 2 * WB, acc);
    single_word<B, 0>((unsigned)c.w, off + 3 * WB, acc);
  } else if constexpr (B == 2 || MODE == 1) {
    constexpr int WB = (32 / B / 2) * (1 << (2 * B)) * 4;
    pair32_word<B, 0>((unsigned)c.x, off, acc);
    pair32_word<B, 0>((unsigned)c.y, off + WB, acc);
    pair32_word<B, 0>((unsigned)c.z, off + 2 * WB, acc);
    pair32_word<B, 0>((unsigned)c.w, off + 3 * WB, acc);
  } else {  // 3-bit fp16 pairs, scaled
    constexpr int WB = (32 / B / 2) * (1 << (2 * B)) * 2;
    pair16_word<B, 0>((unsigned)c.x, off, accp);
    pair16_word<B, 0>((unsigned)c.y, off + WB, accp);
    pair16_word<B, 0>((unsigned)c.z, off + 2 * WB, accp);
    pair16_word<B, 0>((unsigned)c.w, off + 3 * WB, accp);
  }
}

struct Slice {  // this block's part of each group
  int qa[3], nq[3], G[3], tb[3], sb[3];  // local first quad, count, concat start, table / staging base
};

// a[g] for a run-time g without sending the array to local memory
__device__ __forceinline__ int sel(const int (&a)[3], int g) { return g == 0 ? a[0] : (g == 1 ? a[1] : a[2]); }

// One block's work: row block rb, split s of layer p (the body of both kernels below).
template <int MODE, int D>
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
    int tb = 0, sb = 0;
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      int a = 0, n = 0;
      if (g < p.ngroups) {
        const int lo = max(Q0, sl.G[g]), hi = min(Q1, sl.G[g] + p.g[g].nq);
        a = lo - sl.G[g]; n = max(0, hi - lo);
      }
      sl.qa[g] = a; sl.nq[g] = n; sl.tb[g] = tb; sl.sb[g] = sb;
      if (n) {
        const G4& gg = p.g[g];
        tb += n * 4 * word_bytes(gg.bits, gg.pair, gg.esize);
        if (gg.pair) sb += n * 4 * (32 / gg.bits) * (1 << gg.bits) * 4;
      }
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
  // -- 2. build, phase 1: one channel per thread per round, all loads before any use
  int ctot = 0;
#pragma unroll
  for (int g = 0; g < 3; ++g) ctot += sl.nq[g] * 4 * (32 / (g < p.ngroups ? p.g[g].bits : 32));
  float mloc = 0.f;
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
      float* dst;
      if (g.pair) {
        dst = reinterpret_cast<float*>(smem + p.stage_off + sel(sl.sb, gi[i])) + jj[i] * V;
        if (g.esize == 2) {
#pragma unroll
          for (int t = 0; t < 16; ++t) if (t < V) mloc = fmaxf(mloc, fabsf(v[t]));
        }
      } else {
        const int word = jj[i] / K, f = jj[i] - word * K;
        dst = reinterpret_cast<float*>(smem + p.tbl_off + sel(sl.tb, gi[i]) + word * (K * V * 4)) + f * V;
      }
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
      if (V >= 8) *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
      if (V == 16) {
        *reinterpret_cast<float4*>(dst + 8) = make_float4(v[8], v[9], v[10], v[11]);
        *reinterpret_cast<float4*>(dst + 12) = make_float4(v[12], v[13], v[14], v[15]);
      }
    }
  }
  float scale = 1.f, inv_scale = 1.f;
  if (MODE == 2) {  // block max of |x_c * cb_c[v]| over fp16-pair channels -> power-of-two scale
    unsigned mb = __reduce_max_sync(0xffffffffu, __float_as_uint(mloc));
    if ((tid & 31) == 0) reinterpret_cast<unsigned*>(smem + p.red_off)[tid >> 5] = mb;
  }
  __syncthreads();
  // -- 3. build, phase 2: pair tables from the staged products
  bool any_pair = false;
#pragma unroll
  for (int g = 0; g < 3; ++g) any_pair |= (g < p.ngroups && p.g[g].pair && sl.nq[g] > 0);
  if (any_pair) {
    if (MODE == 2) {
      unsigned mb = 0;
#pragma unroll
      for (int w = 0; w < NTHREADS / 32; ++w) mb = max(mb, reinterpret_cast<const unsigned*>(smem + p.red_off)[w]);
      const float m = 2.f * __uint_as_float(mb);  // bound on a pair entry
      if (m > 0.f && m < 3.0e38f) {
        int e;
        frexpf(m, &e);               // m < 2^e
        const int sh = max(-120, min(120, 15 - e));  // entries < 2^15
        scale = ldexpf(1.f, sh); inv_scale = ldexpf(1.f, -sh);
      }
    }
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      if (g >= p.ngroups || !p.g[g].pair || sl.nq[g] == 0) continue;
      const int B = p.g[g].bits, V = 1 << B, K = 32 / B, NPW = K / 2, E = V * V;
      const int npairs = sl.nq[g] * 4 * NPW, items = npairs * V;
      const float* st = reinterpret_cast<const float*>(smem + p.stage_off + sl.sb[g]);
      const int esz = p.g[g].esize;
      for (int it = tid; it < items; it += NTHREADS) {
        const int pr = it / V, b = it - pr * V;  // pair (block-local), hi index
        const int word = pr / NPW, pp = pr - word * NPW;
        const float* pa = st + (word * K + 2 * pp) * V;  // channel 2pp of the word: lo index
        const float pb = st[(word * K + 2 * pp + 1) * V + b];
        char* tb = smem + p.tbl_off + sl.tb[g] + word * (NPW * E * esz) + (pp * E + b * V) * esz;
        if (esz == 4) {
          float* d = reinterpret_cast<float*>(tb);
          for (int a = 0; a < V; a += 4) {
            const float4 t = *reinterpret_cast<const float4*>(pa + a);
            *reinterpret_cast<float4*>(d + a) = make_float4(t.x + pb, t.y + pb, t.z + pb, t.w + pb);
          }
        } else {  // V == 8: one 16-byte store of 8 halves
          const float4 t0 = *reinterpret_cast<const float4*>(pa), t1 = *reinterpret_cast<const float4*>(pa + 4);
          __half2 h[4];
          h[0] = __floats2half2_rn((t0.x + pb) * scale, (t0.y + pb) * scale);
          h[1] = __floats2half2_rn((t0.z + pb) * scale, (t0.w + pb) * scale);
          h[2] = __floats2half2_rn((t1.x + pb) * scale, (t1.y + pb) * scale);
          h[3] = __floats2half2_rn((t1.z + pb) * scale, (t1.w + pb) * scale);
          *reinterpret_cast<uint4*>(tb) = *reinterpret_cast<const uint4*>(h);
        }
      }
    }
    __syncthreads();
  }
  // -- 4. stream the indices
  float acc[4] = {0.f, 0.f, 0.f, 0.f}, accp[4] = {0.f, 0.f, 0.f, 0.f};
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
    const int QB = 4 * word_bytes(B, p.g[g].pair, p.g[g].esize);
    unsigned off = sbase + p.tbl_off + sel(sl.tb, g);
    const int qend = q + ng;
#pragma unroll 1
    for (; q < qend; ++q) {
      cp_wait<D - 1>();
      int4 c;
      asm volatile("ld.shared.v4.s32 {%0,%1,%2,%3}, [%4];" : "=r"(c.x), "=r"(c.y), "=r"(c.z), "=r"(c.w)
                   : "r"(ring + slot * NTHREADS * 16));
      if (B == 2) quad<2, MODE>(c, off, acc, accp);
      else if (B == 3) quad<3, MODE>(c, off, acc, accp);
      else quad<4, MODE>(c, off, acc, accp);
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
  y0 += ((accp[0] + accp[1]) + (accp[2] + accp[3])) * inv_scale;
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

template <int MODE, int D, int MINB>
__global__ void __launch_bounds__(NTHREADS, MINB) v4_kernel(const P4 p) {
  v4_block<MODE, D>(p, blockIdx.x, blockIdx.y);
}

// Several layers that share their input x (q/k/v, gate/up) in one launch: blockIdx.z picks the
// layer, each with its own plan (row blocks, splits) and workspace; the grid covers the largest.
#define MAX_GROUP 3
struct P4G {
  P4 m[MAX_GROUP];
  int n;
};

template <int MODE, int D, int MINB>
__global__ void __launch_bounds__(NTHREADS, MINB) v4g_kernel(const P4G g) {
  const P4& p = g.m[blockIdx.z];
  if ((int)blockIdx.x * NTHREADS >= p.out || (int)blockIdx.y >= p.S) return;
  v4_block<MODE, D>(p, blockIdx.x, blockIdx.y);
}

template <int MODE, int D, int MINB>
static int launch_group(const P4G* g, int gx, int gy, int smem, cudaStream_t st) {
  static bool init = false;
  if (!init) {
    cudaError_t e = cudaFuncSetAttribute(v4g_kernel<MODE, D, MINB>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return (int)e;
    init = true;
  }
  v4g_kernel<MODE, D, MINB><<<dim3(gx, gy, g->n), NTHREADS, smem, st>>>(*g);
  return (int)cudaGetLastError();
}

// the group launch exists for v4s only (the variant `auto` picks up to 100 M weights)
extern "C" int cmpq_v4g_launch(const P4G* g, int gx, int gy, int smem, void* stream) {
  if (g->n < 1 || g->n > MAX_GROUP) return -1;
  return launch_group<0, 4, 4>(g, gx, gy, smem, reinterpret_cast<cudaStream_t>(stream));
}
extern "C" int cmpq_v4g_params_size() { return (int)sizeof(P4G); }

template <int MODE, int D, int MINB>
static int launch(const P4* p, int gx, int gy, int smem, cudaStream_t st) {
  static bool init = false;
  if (!init) {
    cudaError_t e = cudaFuncSetAttribute(v4_kernel<MODE, D, MINB>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return (int)e;
    init = true;
  }
  v4_kernel<MODE, D, MINB><<<dim3(gx, gy), NTHREADS, smem, st>>>(*p);
  return (int)cudaGetLastError();
}

// minb: __launch_bounds__ minimum blocks per SM (4: 64 registers; 5: 48, no spills; 6: 40, small spills)
extern "C" int cmpq_v4_launch(const P4* p, int mode, int depth, int minb, int gx, int gy, int smem, void* stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (mode * 1000 + depth * 10 + minb) {
    case 44: return launch<0, 4, 4>(p, gx, gy, smem, st);
    case 45: return launch<0, 4, 5>(p, gx, gy, smem, st);
    case 46: return launch<0, 4, 6>(p, gx, gy, smem, st);
    case 1044: return launch<1, 4, 4>(p, gx, gy, smem, st);
    case 2044: return launch<2, 4, 4>(p, gx, gy, smem, st);
    case 2084: return launch<2, 8, 4>(p, gx, gy, smem, st);
    case 1084: return launch<1, 8, 4>(p, gx, gy, smem, st);
  }
  return -1;
}

extern "C" int cmpq_v4_params_size() { return (int)sizeof(P4); }
extern "C" const char* cmpq_v4_error_string(int e) { return cudaGetErrorString((cudaError_t)e); }
