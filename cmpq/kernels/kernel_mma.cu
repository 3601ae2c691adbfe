// CMPQ decode kernel "mma" (2..16 tokens), CUDA C++: tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// Weights are the A operand (16 output rows x 16 input channels per MMA), the T tokens the B
// operand (k16 x n8; T <= 8: one n8 tile, T <= 16: two). Each weight's index is read once (16-byte
// loads, coalesced), looked up in its channel's fp16 codebook in shared memory (one LDS.U16), two
// lookups are packed into one fp16x2/bf16x2 A register (PRMT), and 4 A registers feed one MMA per
// n8 tile. The B fragments (x, in the MMA's k order) are built once per call by a small kernel
// (mma_xprep) and copied into each block's shared memory with 16-byte loads.
//
// Layout (the runtime layout's fragment part, built once by cmpq/kernels/layout.py, never saved): the input channels of
// each b-bit group are cut into chunks of 16*KS channels (KS k16-steps: 2-bit 8, 3-bit 5, 4-bit 4;
// the fp16 outlier columns form a fourth kind, KS = 1, weights stored as ready A fragments).
// Chunks of all kinds are concatenated in kind order (2, 3, 4, 16). For (chunk, 16-row tile,
// lane) there are 16 bytes = exactly the lane's A-fragment indices of the chunk: field f = s*8 + j
// (k-step s, j = e + 2*rowhi + 4*h: the element (row g + 8*rowhi, k = 2t + e + 8h) of the
// fragment, lane = 4g + t), K = 32/b fields per word (3-bit: 10 per word, 2 bits unused).
// q[chunk][tile][lane][4] int32: a warp's load for one (chunk, tile) is 512 contiguous bytes.
// Tables: per chunk and k-step, 16 codebooks of 2^b fp16 at slot t + 4e + 8h (not k order), so the
// 4 channels one LDS instruction touches across the warp (fixed j, t = 0..3) sit in 4 disjoint
// bank ranges (<= 8 banks each): the lookups are conflict-free; lanes reading the same codebook
// either hit the same word (broadcast) or different banks. Lookup address: (lane table base |
// idx*2) + compile-time immediate: SHF + LOP3 + LDS per weight.
//
// Grid (row blocks of TPB 16-row tiles, S splits of the chunk list). 8 warps per block; warp w
// owns tile w % TPB and the chunks c0 + w/TPB, + 8/TPB, ... of the block's chunk range, streamed
// through a per-warp cp.async ring (D slots of 512 B), the first D issued before the block copies
// its tables and builds its x fragments. At the end: C fragments -> shared fp32 [rows][NT] (shared
// atomics, warps that share a tile), + the block's share (1/S) of the sparse corrections
// (sparse_val - W_q, fp32) -> one float4 red.global.add per 4 (row, token) into a self-zeroing
// fp32 accumulator [out][NT]; the last block of a row block (counter) adds the bias, casts, stores
// y [T][out] and re-zeroes. One launch; CUDA-graph safe.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define NTHREADS 256
#define NWARPS 8
#define RING_D 4

struct PM {
  const int4* q;          // [NC][ntiles][32] int4
  const __half* tbl;      // tables, all chunks of kinds 2/3/4 (fp16)
  const int* chl;         // [total k-steps * 16] channel per MMA k position
  const void* x; void* y; float* part; int* cnt;
  const int* crow; const int* scol; const float* corr; const float* bias;
  const uint4* xf;        // x in fragment order for every k-step (mma_xprep): [nks][32][NTL] uint2
  int cs[5];              // first chunk of each kind (2, 3, 4, 16 bits), cs[4] = NC
  int ntiles, out, ldx, T, S, tpb, red_off, tbl_off, xf_off, nks;  // nks: k-steps of all chunks
};

__device__ __forceinline__ int kind_of(const PM& p, int c) {
  return c < p.cs[1] ? 0 : (c < p.cs[2] ? 1 : (c < p.cs[3] ? 2 : 3));
}
__device__ __forceinline__ int kind_tb(int k) { return k == 0 ? 1024 : (k == 1 ? 1280 : (k == 2 ? 2048 : 0)); }
__device__ __forceinline__ int kind_ks(int k) { return k == 0 ? 8 : (k == 1 ? 5 : (k == 2 ? 4 : 1)); }
// byte offset of chunk c's tables in p.tbl, k-step offset of chunk c in p.chl / the x fragments
__device__ __forceinline__ int toff(const PM& p, int c) {
  int o = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) o += (min(c, p.cs[k + 1]) - min(c, p.cs[k])) * kind_tb(k);
  return o;
}
__device__ __forceinline__ int koff(const PM& p, int c) {
  int o = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) o += (min(c, p.cs[k + 1]) - min(c, p.cs[k])) * kind_ks(k);
  return o;
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

template <int BF>
__device__ __forceinline__ void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
  if constexpr (BF) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <int NTL, int BF>
__device__ __forceinline__ void mma_step(float (*acc)[4], const unsigned* a, unsigned xaddr) {
  if constexpr (NTL == 1) {
    unsigned b0, b1;
    asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(b0), "=r"(b1) : "r"(xaddr));
    mma<BF>(acc[0], a, b0, b1);
  } else {
    unsigned b0, b1, b2, b3;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(xaddr));
    mma<BF>(acc[0], a, b0, b1);
    mma<BF>(acc[1], a, b2, b3);
  }
}

// one lookup: field F (compile time) of the lane's chunk words -> 16-bit codebook value
template <int B, int F>
__device__ __forceinline__ unsigned look(const unsigned* w, unsigned tb) {
  constexpr int K = 32 / B, V = 1 << B;
  constexpr int wi = F / K, fi = F % K;
  constexpr int s = F / 8, j = F % 8, e = j & 1, h = j >> 2;
  constexpr unsigned M = (V - 1) << 1;
  const unsigned off = fi == 0 ? ((w[wi] << 1) & M) : ((w[wi] >> (B * fi - 1)) & M);
  unsigned v;
  asm volatile("ld.shared.u16 %0, [%1+%2];" : "=r"(v) : "r"(tb | off), "n"((s * 16 + 4 * e + 8 * h) * V * 2));
  return v;
}

template <int B, int S, int NTL, int BF>
__device__ __forceinline__ void ksteps(const unsigned* w, unsigned tb, unsigned xf, float (*acc)[4]) {
  constexpr int KS = B == 2 ? 8 : (B == 3 ? 5 : 4);
  if constexpr (S < KS) {
    unsigned a[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = 0;
    const unsigned h0 = look<B, S * 8 + 0>(w, tb), h1 = look<B, S * 8 + 1>(w, tb);
    const unsigned h2 = look<B, S * 8 + 2>(w, tb), h3 = look<B, S * 8 + 3>(w, tb);
    const unsigned h4 = look<B, S * 8 + 4>(w, tb), h5 = look<B, S * 8 + 5>(w, tb);
    const unsigned h6 = look<B, S * 8 + 6>(w, tb), h7 = look<B, S * 8 + 7>(w, tb);
    a[0] = __byte_perm(h0, h1, 0x5410); a[1] = __byte_perm(h2, h3, 0x5410);
    a[2] = __byte_perm(h4, h5, 0x5410); a[3] = __byte_perm(h6, h7, 0x5410);
    mma_step<NTL, BF>(acc, a, xf + S * 32 * NTL * 8);
    ksteps<B, S + 1, NTL, BF>(w, tb, xf, acc);
  }
}

__device__ __forceinline__ unsigned h2_to_bf2(unsigned h) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  const __nv_bfloat162 b = __float22bfloat162_rn(f);
  return *reinterpret_cast<const unsigned*>(&b);
}

template <int NTL, int BF>
__global__ void __launch_bounds__(NTHREADS, 3) mma_kernel(const PM p) {
  extern __shared__ __align__(16) char smem_raw[];
  __shared__ int is_last;
  constexpr int NT = 8 * NTL;
  const unsigned raw = (unsigned)__cvta_generic_to_shared(smem_raw);
  const unsigned sbase = (raw + 255u) & ~255u;
  char* smem = smem_raw + (sbase - raw);
  const int rb = blockIdx.x, sp = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int NC = p.cs[4];
  const int c0 = (int)((long long)sp * NC / p.S), c1 = (int)((long long)(sp + 1) * NC / p.S);
  const int tpb = p.tpb, cstride = NWARPS / tpb, wt = warp % tpb, wc = warp / tpb;
  const int tile = rb * tpb + wt;
  const int nitems = (tile < p.ntiles && c0 + wc < c1) ? (c1 - c0 - wc + cstride - 1) / cstride : 0;
  // 1. start streaming this warp's indices: the first D (chunk, tile) items into its ring
  const unsigned ring = sbase + (warp * RING_D) * 512 + lane * 16;
#pragma unroll
  for (int k = 0; k < RING_D; ++k) {
    if (k < nitems) cp_async16(ring + k * 512, p.q + ((size_t)(c0 + wc + k * cstride) * p.ntiles + tile) * 32 + lane);
    cp_commit();
  }
  // 2. tables: bytes [toff(c0), toff(c1)) of p.tbl, converted to bf16 for bf16 inputs
  const int tb0 = toff(p, c0), tbn = toff(p, c1) - tb0;
  for (int i = tid * 16; i < tbn; i += NTHREADS * 16) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(p.tbl) + tb0 + i));
    if (BF) { v.x = h2_to_bf2(v.x); v.y = h2_to_bf2(v.y); v.z = h2_to_bf2(v.z); v.w = h2_to_bf2(v.w); }
    *reinterpret_cast<uint4*>(smem + p.tbl_off + i) = v;
  }
  // 3. x fragments: for each k-step of the range and n8 tile, lane's {b0, b1}: a contiguous copy of
  // mma_xprep's output (16 * NTL uint4 per k-step)
  const int k0 = koff(p, c0), kn = koff(p, c1) - k0;
  {
    const uint4* src = p.xf + (size_t)k0 * (16 * NTL);
    for (int i = tid; i < kn * 16 * NTL; i += NTHREADS)
      reinterpret_cast<uint4*>(smem + p.xf_off)[i] = __ldg(src + i);
  }
  // 4. zero the block's reduction buffer [tpb*16 rows][NT] fp32
  float* red = reinterpret_cast<float*>(smem + p.red_off);
  for (int i = tid; i < tpb * 16 * NT; i += NTHREADS) red[i] = 0.f;
  __syncthreads();

  // 5. stream: one (chunk, tile) item = 16 B per lane, KS k-steps of MMAs
  float acc[NTL][4];
#pragma unroll
  for (int a = 0; a < NTL; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
  const unsigned tbl_s = sbase + p.tbl_off, xf_s = sbase + p.xf_off + lane * NTL * 8;
#pragma unroll 1
  for (int i = 0; i < nitems; ++i) {
    const int slot = i % RING_D;
    cp_wait<RING_D - 1>();
    unsigned w[4];
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                 : "r"(ring + slot * 512));
    const int c = c0 + wc + i * cstride;
    const int kd = kind_of(p, c);
    const unsigned xf = xf_s + (unsigned)(koff(p, c) - k0) * (32 * NTL * 8);
    if (kd == 3) {  // fp16 outlier columns: the words are the A fragment
      unsigned a[4] = {w[0], w[1], w[2], w[3]};
      if (BF) {
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = h2_to_bf2(a[r]);
      }
      mma_step<NTL, BF>(acc, a, xf);
    } else {
      const unsigned tb = tbl_s + (unsigned)(toff(p, c) - tb0);
      if (kd == 0) ksteps<2, 0, NTL, BF>(w, tb + t * 4 * 2, xf, acc);
      else if (kd == 1) ksteps<3, 0, NTL, BF>(w, tb + t * 8 * 2, xf, acc);
      else ksteps<4, 0, NTL, BF>(w, tb + t * 16 * 2, xf, acc);
    }
    // refill the slot just consumed (its value is in registers and used above)
    if (i + RING_D < nitems)
      cp_async16(ring + slot * 512, p.q + ((size_t)(c + RING_D * cstride) * p.ntiles + tile) * 32 + lane);
    cp_commit();
  }
  cp_wait<0>();
  // 6. C fragments -> shared [row][NT]: c0,c1 = (row g, tokens 2t, 2t+1), c2,c3 = (row g+8, ...)
  if (nitems > 0) {
#pragma unroll
    for (int a = 0; a < NTL; ++a) {
      float* r0 = red + (wt * 16 + g) * NT + a * 8 + 2 * t;
      atomicAdd(r0, acc[a][0]); atomicAdd(r0 + 1, acc[a][1]);
      atomicAdd(r0 + 8 * NT, acc[a][2]); atomicAdd(r0 + 8 * NT + 1, acc[a][3]);
    }
  }
  __syncthreads();
  // 7. sparse corrections (this split's share) of the block's rows
  const int row0 = rb * tpb * 16, nrows = tpb * 16;
  for (int i = tid; i < nrows; i += NTHREADS) {
    const int r = row0 + i;
    if (r >= p.out) break;
    const int k1 = p.crow[r + 1];
    for (int k = p.crow[r] + sp; k < k1; k += p.S) {
      const float v = p.corr[k];
      const int col = p.scol[k];
      for (int tk = 0; tk < p.T; ++tk) {
        const float xv = BF ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[(size_t)tk * p.ldx + col])
                            : __half2float(reinterpret_cast<const __half*>(p.x)[(size_t)tk * p.ldx + col]);
        red[i * NT + tk] += v * xv;
      }
    }
  }
  __syncthreads();
  // 8. split-K: one float4 reduction per 4 (row, token) into the zeroed accumulator [out][NT]
  for (int e = tid * 4; e < nrows * NT; e += NTHREADS * 4) {
    const int i = e / NT, r = row0 + i;
    if (r < p.out) {
      const float4 v = *reinterpret_cast<const float4*>(red + e);
      atomicAdd(reinterpret_cast<float4*>(p.part + (size_t)r * NT + (e - i * NT)), v);
    }
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(&p.cnt[rb], 1) == p.S - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int e = tid; e < nrows * p.T; e += NTHREADS) {
    const int tk = e / nrows, i = e - tk * nrows, r = row0 + i;
    if (r < p.out) {
      float* ptr = p.part + (size_t)r * NT + tk;
      float sum = __ldcg(ptr);
      __stcg(ptr, 0.f);  // leave the accumulator zeroed for the next call (also inside a CUDA graph)
      if (p.bias) sum += p.bias[r];
      if (BF) reinterpret_cast<__nv_bfloat16*>(p.y)[(size_t)tk * p.out + r] = __float2bfloat16(sum);
      else reinterpret_cast<__half*>(p.y)[(size_t)tk * p.out + r] = __float2half(sum);
    }
  }
  if (tid == 0) p.cnt[rb] = 0;
}

// x in the main kernel's fragment order, once per call for all blocks: item it = (k-step, lane, n8
// tile) holds {b0, b1} = x[token][chl of the lane's 4 k positions]. Each block then copies its
// k-step range with 16-byte loads instead of gathering 4 scattered 2-byte values per item itself
// (every row block repeats the gather of its split; the loads are uncoalesced).
template <int NTL>
__global__ void __launch_bounds__(256) mma_xprep(const PM p) {
  const int it = blockIdx.x * 256 + threadIdx.x;
  if (it >= p.nks * 32 * NTL) return;
  const int ks = it / (32 * NTL), rem = it - ks * 32 * NTL, ln = rem / NTL, ntl = rem - ln * NTL;
  const int n = (ln >> 2) + 8 * ntl;
  uint2 v = make_uint2(0, 0);
  if (n < p.T) {
    const int* cp = p.chl + (size_t)ks * 16 + 2 * (ln & 3);
    const int2 ca = __ldg(reinterpret_cast<const int2*>(cp)), cb = __ldg(reinterpret_cast<const int2*>(cp + 8));
    const unsigned short* xr = reinterpret_cast<const unsigned short*>(p.x) + (size_t)n * p.ldx;
    v.x = __ldg(xr + ca.x) | ((unsigned)__ldg(xr + ca.y) << 16);
    v.y = __ldg(xr + cb.x) | ((unsigned)__ldg(xr + cb.y) << 16);
  }
  reinterpret_cast<uint2*>(const_cast<uint4*>(p.xf))[it] = v;
}

template <int NTL, int BF>
static int launch(const PM* p, int gx, int gy, int smem, cudaStream_t st) {
  static bool init = false;
  if (!init) {
    cudaError_t e = cudaFuncSetAttribute(mma_kernel<NTL, BF>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return (int)e;
    init = true;
  }
  mma_xprep<NTL><<<(p->nks * 32 * NTL + 255) / 256, 256, 0, st>>>(*p);
  mma_kernel<NTL, BF><<<dim3(gx, gy), NTHREADS, smem, st>>>(*p);
  return (int)cudaGetLastError();
}

extern "C" int cmpq_mma_launch(const PM* p, int ntl, int bf, int gx, int gy, int smem, void* stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (ntl * 2 + bf) {
    case 2: return launch<1, 0>(p, gx, gy, smem, st);
    case 3: return launch<1, 1>(p, gx, gy, smem, st);
    case 4: return launch<2, 0>(p, gx, gy, smem, st);
    case 5: return launch<2, 1>(p, gx, gy, smem, st);
  }
  return -1;
}

extern "C" int cmpq_mma_params_size() { return (int)sizeof(PM); }
extern "C" const char* cmpq_mma_error_string(int e) { return cudaGetErrorString((cudaError_t)e); }
