// CMPQ decode kernel "rlut" (1..16 tokens): codebooks in registers as byte planes, selected with
// PRMT, feeding mma.sync m16n8k16 (fp16 or bf16 in, fp32 accumulate). Issue 11's design direction.
//
// Why: the shared-memory lookup kernels (v4s, mma) spend ~4 instructions per weight on SHF + LOP3 +
// LDS (+ FADD/PRMT) and are bound by the dependent index -> address -> LDS chain. Here a weight
// costs about one PRMT: a channel's 2^b FP16 entries sit in registers as a low-byte plane and a
// high-byte plane, one PRMT per plane picks the bytes of 4 weights, two more interleave them into
// two fp16x2 A registers. No shared-memory address per weight, no bank conflicts.
//
// Row-pair trick. An A register holds the elements (m, k) and (m, k+1); a PRMT lookup serves one
// channel. So k and k+1 carry the SAME channel for two output rows: row 2m + e of a 32-row tile at
// k = 2p + e (p = channel pair slot 0..7, e = row parity). B then holds x twice, split by parity:
// B[2p + e][n] = x[tok(n)][channel p] if parity(n) == e else 0, and C[m][n] is y[tok(n)][row 2m +
// parity(n)]. One m16n8k16 covers 8 channels x 32 rows = 256 weights. n8 tiles: T <= 4: one tile,
// n = 4e + tok; T <= 8: tile e, n = tok; T <= 16: tile e + 2h, n = tok - 8h.
//
// Lane l = 4g + t owns, per k-step (8 channels) and 32-row tile, channels t and t+4 (A registers
// a0,a1 and a2,a3) for rows 2g, 2g+1, 2g+16, 2g+17: one 4-weight lookup group per channel, its
// selector = 4 nibbles [row 2g, 2g+1, 2g+16, 2g+17] in the low 16 bits (PRMT reads those).
//
// Layout (kernel_rlut.prepare, once per layer): channels of each width in "units" of KU k-steps
// (KU*8 channels; 2/3/4-bit: KU = 4, fp16 outlier columns: KU = 1), kinds in order 2, 3, 4, 16;
// rows in tile groups of 128 (4 tiles). One record block per (unit, tile group), read by a warp as
// one contiguous run (cp.async 16 B per lane). Per k-step and lane:
//   2-bit: 2 words [A0, A1]: A0 = tiles 0 (bits 4j, 4j+1) and 1 (4j+2, 4j+3), A1 = tiles 2, 3.
//   3-bit: the same 2-bit plane (low 2 bits), then a 1-bit plane C (high bit): tile 0 at bit 4j+2,
//          tile 1 at 4j+3, tile 2 at 4j, tile 3 at 4j+1. Block = [KU][32][2 words] + [KU][32][1].
//   4-bit: 4 words, one per tile, nibble j = the index.
//   fp16:  [tile][32][4 words]: the A fragment itself (bf16 copy for bf16 inputs).
// LUT per unit: [KU][8 slots][lo bytes of 2^b entries, hi bytes] (bf16 planes for bf16 inputs).
//
// Grid (row blocks of Q*128 rows, S splits of the unit list, host-balanced by cost). A block's 4
// warps share its rows and take every 4th unit of its split; each warp streams (LUT + Q records)
// through a RING_D-slot cp.async ring. The block first gathers x for its channels into shared memory
// [channel][TP] (the one dependent chan -> x load chain; the ring loads are in flight meanwhile).
// End: C fragments -> shared fp32 [rows][TP] (+ this split's share of the sparse corrections
// sparse_val - W_q) -> float4 red.global.add into a self-zeroing accumulator [out][TP]; the last
// block of a row block adds the bias, casts, stores y [T][out], re-zeroes. One launch, graph-safe.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define NWARPS 4
#define NTHREADS (NWARPS * 32)
// 2, not 3: a 2-deep ring takes a third less shared memory, so 4 blocks share an SM where 3 did (the
// kernel is latency-bound, 3 blocks/SM smem-bound in the ncu profile). H100, 2026-12-07: 2 was
// faster on 51 of 60 shape x width x token points, -2% to -9% summed per token count
// (benchmarks/results/rlut-rings-h100.json).
#define RING_D 2
#define MAXS 512

struct PR {
  const int4* rec;     // record blocks of kinds 2, 3, 4
  const int4* ofr;     // fp16 (or bf16) outlier-column fragments, kind 16
  const int4* lut;     // LUT planes of kinds 2, 3, 4 (fp16 or bf16 entries)
  const int* chan;     // input channel per unit channel slot, -1 = padding
  const void* x; void* y; float* part; int* cnt;
  const int* crow; const int* scol; const float* corr; const float* bias;
  long long recbase[4];  // first int4 of each kind (kind 16: in ofr)
  long long lutbase[4];  // first int4 of each kind's LUT
  int chbase[4];         // first channel slot of each kind
  int cs[5];             // first unit of each kind; cs[4] = number of units
  int ntg, out, ldx, T, S, slot, lutmax, recmax, xs_off, red_off, pad_[2];
  int usplit[MAXS + 1];  // unit range of split s: [usplit[s], usplit[s+1])
};

// per kind (0: 2-bit, 1: 3-bit, 2: 4-bit, 3: fp16): k-steps per unit, int4 per record block, int4 per unit LUT
__host__ __device__ constexpr int KU_(int k) { return k == 3 ? 1 : 4; }
__host__ __device__ constexpr int RB16_(int k) { return k == 0 ? 64 : (k == 1 ? 96 : 128); }
__host__ __device__ constexpr int LB16_(int k) { return k == 0 ? 16 : (k == 1 ? 32 : (k == 2 ? 64 : 0)); }

__device__ __forceinline__ int kind_of(const PR& p, int u) {
  return u < p.cs[1] ? 0 : (u < p.cs[2] ? 1 : (u < p.cs[3] ? 2 : 3));
}
__device__ __forceinline__ int ch_off(const PR& p, int u) {
  const int k = kind_of(p, u);
  return p.chbase[k] + (u - p.cs[k]) * KU_(k) * 8;
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ uint4 lds128(unsigned a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}
__device__ __forceinline__ uint2 lds64(unsigned a) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(a));
  return v;
}
__device__ __forceinline__ unsigned lds32(unsigned a) {
  unsigned v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ unsigned lds16(unsigned a) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(a));
  return v;
}

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

// 4 weights of one channel: lo/hi byte of each entry by the same selector, then interleaved into
// two fp16x2 registers (rows 2g, 2g+1) and (2g+16, 2g+17). 8-entry tables (l0, l1), (h0, h1).
__device__ __forceinline__ void look8(unsigned l0, unsigned l1, unsigned h0, unsigned h1, unsigned s,
                                      unsigned& a0, unsigned& a1) {
  const unsigned lo = __byte_perm(l0, l1, s), hi = __byte_perm(h0, h1, s);
  a0 = __byte_perm(lo, hi, 0x5140);
  a1 = __byte_perm(lo, hi, 0x7362);
}

// 16 entries: the low 3 bits pick within each half (s7), the high bit picks the half byte by byte
// (sel2 nibble j = j + 4*h_j): two-level select
__device__ __forceinline__ void look16(const uint4& l, const uint4& h, unsigned s7, unsigned sel2,
                                       unsigned& a0, unsigned& a1) {
  const unsigned lo = __byte_perm(__byte_perm(l.x, l.y, s7), __byte_perm(l.z, l.w, s7), sel2);
  const unsigned hi = __byte_perm(__byte_perm(h.x, h.y, s7), __byte_perm(h.z, h.w, s7), sel2);
  a0 = __byte_perm(lo, hi, 0x5140);
  a1 = __byte_perm(lo, hi, 0x7362);
}

// B fragments of one k-step: x of channel slots t and t+4 (shared [channel][TP], 16-bit patterns),
// placed in the half of the row parity its n8 column stands for.
template <int NTL>
__device__ __forceinline__ void bfrag(unsigned xs, int cl, int g, int t, unsigned (*b)[2]) {
  constexpr int TP = 4 * NTL;
  if constexpr (NTL == 1) {
    const unsigned sh = (g >> 2) * 16;
    b[0][0] = lds16(xs + ((cl + t) * TP + (g & 3)) * 2) << sh;
    b[0][1] = lds16(xs + ((cl + t + 4) * TP + (g & 3)) * 2) << sh;
  } else {
#pragma unroll
    for (int h = 0; h < NTL / 2; ++h) {
      const unsigned v0 = lds16(xs + ((cl + t) * TP + g + 8 * h) * 2);
      const unsigned v1 = lds16(xs + ((cl + t + 4) * TP + g + 8 * h) * 2);
      b[2 * h][0] = v0; b[2 * h][1] = v1;
      b[2 * h + 1][0] = v0 << 16; b[2 * h + 1][1] = v1 << 16;
    }
  }
}

template <int NTL, int BF>
__device__ __forceinline__ void mmas(float (*acc)[4], const unsigned* a, unsigned (*b)[2]) {
#pragma unroll
  for (int n = 0; n < NTL; ++n) mma<BF>(acc[n], a, b[n][0], b[n][1]);
}

// One unit of kind K from its ring slot: LUT at slot, record q at slot + lutmax + q * recmax.
template <int K, int NTL, int Q, int BF>
__device__ __forceinline__ void unit_body(unsigned slot, unsigned lutmax, unsigned recmax, unsigned xs, int cl,
                                          int lane, float (*acc)[NTL][4]) {
  const int g = lane >> 2, t = lane & 3;
  constexpr int KU = KU_(K);
#pragma unroll
  for (int k = 0; k < KU; ++k) {
    unsigned b[NTL][2];
    bfrag<NTL>(xs, cl + k * 8, g, t, b);
    if constexpr (K == 3) {  // fp16 columns: the record is the A fragment
#pragma unroll
      for (int q = 0; q < Q; ++q)
#pragma unroll
        for (int tile = 0; tile < 4; ++tile) {
          const uint4 w = lds128(slot + lutmax + q * recmax + (tile * 32 + lane) * 16);
          const unsigned a[4] = {w.x, w.y, w.z, w.w};
          mmas<NTL, BF>(acc[q * 4 + tile], a, b);
        }
    } else if constexpr (K == 0) {
      const uint2 la = lds64(slot + (k * 8 + t) * 8), lb = lds64(slot + (k * 8 + t + 4) * 8);
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const uint2 A = lds64(slot + lutmax + q * recmax + (k * 32 + lane) * 8);
        const unsigned s[4] = {A.x & 0x33333333u, (A.x >> 2) & 0x33333333u, A.y & 0x33333333u,
                               (A.y >> 2) & 0x33333333u};
#pragma unroll
        for (int tile = 0; tile < 4; ++tile) {
          unsigned a[4];
          // 4 entries: lo plane bytes 0-3 of (L, H), hi plane bytes 0-3 of (H, L)
          {
            const unsigned lo = __byte_perm(la.x, la.y, s[tile]), hi = __byte_perm(la.y, la.x, s[tile]);
            a[0] = __byte_perm(lo, hi, 0x5140); a[1] = __byte_perm(lo, hi, 0x7362);
          }
          {
            const unsigned s2 = s[tile] >> 16;
            const unsigned lo = __byte_perm(lb.x, lb.y, s2), hi = __byte_perm(lb.y, lb.x, s2);
            a[2] = __byte_perm(lo, hi, 0x5140); a[3] = __byte_perm(lo, hi, 0x7362);
          }
          mmas<NTL, BF>(acc[q * 4 + tile], a, b);
        }
      }
    } else if constexpr (K == 1) {
      const uint4 la = lds128(slot + (k * 8 + t) * 16), lb = lds128(slot + (k * 8 + t + 4) * 16);
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const unsigned rb = slot + lutmax + q * recmax;
        const uint2 A = lds64(rb + (k * 32 + lane) * 8);
        const unsigned C = lds32(rb + KU * 32 * 8 + (k * 32 + lane) * 4);
        const unsigned s[4] = {(A.x & 0x33333333u) | (C & 0x44444444u),
                               ((A.x >> 2) & 0x33333333u) | ((C >> 1) & 0x44444444u),
                               (A.y & 0x33333333u) | ((C << 2) & 0x44444444u),
                               ((A.y >> 2) & 0x33333333u) | ((C << 1) & 0x44444444u)};
#pragma unroll
        for (int tile = 0; tile < 4; ++tile) {
          unsigned a[4];
          look8(la.x, la.y, la.z, la.w, s[tile], a[0], a[1]);
          look8(lb.x, lb.y, lb.z, lb.w, s[tile] >> 16, a[2], a[3]);
          mmas<NTL, BF>(acc[q * 4 + tile], a, b);
        }
      }
    } else {  // 4-bit
      const unsigned la = slot + (k * 8 + t) * 32, lb = slot + (k * 8 + t + 4) * 32;
      const uint4 l0 = lds128(la), h0 = lds128(la + 16), l1 = lds128(lb), h1 = lds128(lb + 16);
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const uint4 W = lds128(slot + lutmax + q * recmax + (k * 32 + lane) * 16);
        const unsigned w[4] = {W.x, W.y, W.z, W.w};
#pragma unroll
        for (int tile = 0; tile < 4; ++tile) {
          const unsigned s7 = w[tile] & 0x77777777u;
          const unsigned sel2 = ((w[tile] >> 1) & 0x44444444u) | 0x32103210u;
          unsigned a[4];
          look16(l0, h0, s7, sel2, a[0], a[1]);
          look16(l1, h1, s7 >> 16, sel2 >> 16, a[2], a[3]);
          mmas<NTL, BF>(acc[q * 4 + tile], a, b);
        }
      }
    }
  }
}

// cp.async of unit u of kind K (its LUT and the Q record blocks of tile groups tg0..) into a ring
// slot: sizes known at compile time, so the copies are straight-line code
template <int K, int Q>
__device__ __forceinline__ void issue_k(const PR& p, int u, int tg0, unsigned slot, int lane) {
  constexpr int lb = LB16_(K), rb = RB16_(K);
  if constexpr (lb > 0) {
    const int4* lsrc = p.lut + p.lutbase[K] + (long long)(u - p.cs[K]) * lb;
#pragma unroll
    for (int c = 0; c < (lb + 31) / 32; ++c)
      if (lb % 32 == 0 || c * 32 + lane < lb) cp_async16(slot + (c * 32 + lane) * 16, lsrc + c * 32 + lane);
  }
  const int4* rsrc = (K == 3 ? p.ofr : p.rec) + p.recbase[K] + ((long long)(u - p.cs[K]) * p.ntg + tg0) * rb;
#pragma unroll
  for (int q = 0; q < Q; ++q)
    if (tg0 + q < p.ntg)
#pragma unroll
      for (int c = 0; c < rb / 32; ++c)
        cp_async16(slot + p.lutmax + q * p.recmax + (c * 32 + lane) * 16, rsrc + q * rb + c * 32 + lane);
}

template <int Q>
__device__ __forceinline__ void issue(const PR& p, int u, int tg0, unsigned slot, int lane) {
#ifdef CMPQ_RLUT_ONLY_KIND
  issue_k<CMPQ_RLUT_ONLY_KIND, Q>(p, u, tg0, slot, lane);
#else
  const int k = kind_of(p, u);
  if (k == 1) issue_k<1, Q>(p, u, tg0, slot, lane);
  else if (k == 0) issue_k<0, Q>(p, u, tg0, slot, lane);
  else if (k == 2) issue_k<2, Q>(p, u, tg0, slot, lane);
  else issue_k<3, Q>(p, u, tg0, slot, lane);
#endif
}

// blocks per SM the registers allow: Q * 4 * NTL * 4 accumulators a lane (16 tokens, or 8 tokens
// over two tile groups: 64; kernel_rlut.blocks_per_sm mirrors this)
template <int NTL, int Q>
constexpr int blocks_per_sm() { return Q * NTL >= 4 ? 3 : 4; }

template <int NTL, int Q, int BF>
__global__ void __launch_bounds__(NTHREADS, blocks_per_sm<NTL, Q>()) rlut_kernel(const PR p) {
  extern __shared__ __align__(16) char smem_raw[];
  __shared__ int is_last;
  constexpr int TP = 4 * NTL, ROWS = Q * 128;
  const unsigned raw = (unsigned)__cvta_generic_to_shared(smem_raw);
  const unsigned sbase = (raw + 127u) & ~127u;
  char* smem = smem_raw + (sbase - raw);
  const int rbk = blockIdx.x, sp = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int u0 = p.usplit[sp], u1 = p.usplit[sp + 1], tg0 = rbk * Q;
  const int nitems = u0 + warp < u1 ? (u1 - u0 - warp + NWARPS - 1) / NWARPS : 0;
  const unsigned ring = sbase + warp * RING_D * p.slot;
  // 1. the first RING_D units of this warp: in flight while x is gathered
#pragma unroll
  for (int i = 0; i < RING_D; ++i) {
    if (i < nitems) issue<Q>(p, u0 + warp + i * NWARPS, tg0, ring + i * p.slot, lane);
    cp_commit();
  }
  // 2. x of the split's channel slots -> shared [slot][TP] (16-bit patterns; 0 for padding, tok >= T)
  const int c0 = ch_off(p, u0), nch = ch_off(p, u1) - c0;
  unsigned short* xs = reinterpret_cast<unsigned short*>(smem + p.xs_off);
  const unsigned short* xg = reinterpret_cast<const unsigned short*>(p.x);
  for (int i = tid; i < nch; i += NTHREADS) {
    const int c = __ldg(p.chan + c0 + i);
    unsigned short v[TP];
#pragma unroll
    for (int tk = 0; tk < TP; ++tk) v[tk] = (c >= 0 && tk < p.T) ? __ldg(xg + (size_t)tk * p.ldx + c) : 0;
#pragma unroll
    for (int tk = 0; tk < TP; tk += 4)
      *reinterpret_cast<uint2*>(xs + i * TP + tk) =
          make_uint2(v[tk] | ((unsigned)v[tk + 1] << 16), v[tk + 2] | ((unsigned)v[tk + 3] << 16));
  }
  float* red = reinterpret_cast<float*>(smem + p.red_off);
  for (int i = tid; i < ROWS * TP; i += NTHREADS) red[i] = 0.f;
  __syncthreads();

  // 3. stream this warp's units
  float acc[Q * 4][NTL][4];
#pragma unroll
  for (int a = 0; a < Q * 4; ++a)
#pragma unroll
    for (int n = 0; n < NTL; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[a][n][i] = 0.f;
  const unsigned xsa = sbase + p.xs_off;
#pragma unroll 1
  for (int i = 0; i < nitems; ++i) {
    const unsigned slot = ring + (i % RING_D) * p.slot;
    cp_wait<RING_D - 1>();
    __syncwarp();
    const int u = u0 + warp + i * NWARPS;
    const int k = kind_of(p, u);
    const int cl = ch_off(p, u) - c0;
#ifdef CMPQ_RLUT_ONLY_KIND  // SASS counts of one kind's whole unit loop (benchmarks/rlut_sass.py)
    (void)k;
    unit_body<CMPQ_RLUT_ONLY_KIND, NTL, Q, BF>(slot, p.lutmax, p.recmax, xsa, cl, lane, acc);
#else
    if (k == 1) unit_body<1, NTL, Q, BF>(slot, p.lutmax, p.recmax, xsa, cl, lane, acc);
    else if (k == 0) unit_body<0, NTL, Q, BF>(slot, p.lutmax, p.recmax, xsa, cl, lane, acc);
    else if (k == 2) unit_body<2, NTL, Q, BF>(slot, p.lutmax, p.recmax, xsa, cl, lane, acc);
    else unit_body<3, NTL, Q, BF>(slot, p.lutmax, p.recmax, xsa, cl, lane, acc);
#endif
    __syncwarp();  // every lane has read the slot before it is refilled
    if (i + RING_D < nitems) issue<Q>(p, u + RING_D * NWARPS, tg0, slot, lane);
    cp_commit();
  }
  cp_wait<0>();
  // 4. C fragments -> shared [row][TP]: c[i] = C[m = g + 8(i>>1)][n = 2t + (i&1)], row 2m + parity
  if (nitems > 0) {
#pragma unroll
    for (int a = 0; a < Q * 4; ++a)
#pragma unroll
      for (int n = 0; n < NTL; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int m = g + 8 * (i >> 1), nn = 2 * t + (i & 1);
          int e, tok;
          if constexpr (NTL == 1) { e = nn >> 2; tok = nn & 3; }
          else { e = n & 1; tok = nn + 8 * (n >> 1); }
          atomicAdd(red + (a * 32 + 2 * m + e) * TP + tok, acc[a][n][i]);
        }
  }
  __syncthreads();
  // 5. sparse corrections (this split's share) of the block's rows
  const int row0 = rbk * ROWS;
  for (int i = tid; i < ROWS; i += NTHREADS) {
    const int r = row0 + i;
    if (r >= p.out) break;
    const int k1 = p.crow[r + 1];
    for (int k = p.crow[r] + sp; k < k1; k += p.S) {
      const float v = p.corr[k];
      const int col = p.scol[k];
      for (int tk = 0; tk < p.T; ++tk) {
        const float xv = BF ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[(size_t)tk * p.ldx + col])
                            : __half2float(reinterpret_cast<const __half*>(p.x)[(size_t)tk * p.ldx + col]);
        red[i * TP + tk] += v * xv;
      }
    }
  }
  __syncthreads();
  // 6. split-K: one float4 reduction per 4 (row, token) into the zeroed accumulator [out][TP]
  for (int e = tid * 4; e < ROWS * TP; e += NTHREADS * 4) {
    const int r = row0 + e / TP;
    if (r < p.out)
      atomicAdd(reinterpret_cast<float4*>(p.part + (size_t)r * TP + (e % TP)), *reinterpret_cast<const float4*>(red + e));
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(&p.cnt[rbk], 1) == p.S - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int e = tid; e < ROWS * p.T; e += NTHREADS) {
    const int tk = e / ROWS, i = e - tk * ROWS, r = row0 + i;
    if (r < p.out) {
      float* ptr = p.part + (size_t)r * TP + tk;
      float sum = __ldcg(ptr);
      __stcg(ptr, 0.f);  // leave the accumulator zeroed for the next call (also inside a CUDA graph)
      if (p.bias) sum += p.bias[r];
      if (BF) reinterpret_cast<__nv_bfloat16*>(p.y)[(size_t)tk * p.out + r] = __float2bfloat16(sum);
      else reinterpret_cast<__half*>(p.y)[(size_t)tk * p.out + r] = __float2half(sum);
    }
  }
  if (tid == 0) p.cnt[rbk] = 0;
}

#ifdef CMPQ_RLUT_PROBE
// SASS probe (benchmarks/rlut_sass.py, never built by the package): one kind's unit body in a loop,
// so the instructions per weight of each width's inner loop can be counted from the cubin.
template <int K, int NTL, int Q>
__global__ void __launch_bounds__(NTHREADS, 4) rlut_probe(const int* n, float* out, unsigned lutmax, unsigned recmax) {
  extern __shared__ __align__(16) char sm[];
  const unsigned base = (unsigned)__cvta_generic_to_shared(sm);
  const int lane = threadIdx.x & 31;
  float acc[Q * 4][NTL][4];
#pragma unroll
  for (int a = 0; a < Q * 4; ++a)
#pragma unroll
    for (int b = 0; b < NTL; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[a][b][i] = 0.f;
#pragma unroll 1
  for (int i = 0; i < *n; ++i)
    unit_body<K, NTL, Q, 0>(base + (i & 3) * 8192, lutmax, recmax, base + 32768, i * 32, lane, acc);
  float s = 0.f;
#pragma unroll
  for (int a = 0; a < Q * 4; ++a)
#pragma unroll
    for (int b = 0; b < NTL; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) s += acc[a][b][i];
  out[threadIdx.x] = s;
}
#define PROBE(K)                                                                              \
  template __global__ void rlut_probe<K, 1, 2>(const int*, float*, unsigned, unsigned);       \
  template __global__ void rlut_probe<K, 2, 1>(const int*, float*, unsigned, unsigned);       \
  template __global__ void rlut_probe<K, 4, 1>(const int*, float*, unsigned, unsigned);
PROBE(0)
PROBE(1)
PROBE(2)
PROBE(3)
#endif

template <int NTL, int Q, int BF>
static int launch(const PR* p, int gx, int gy, int smem, cudaStream_t st) {
  static bool init = false;
  if (!init) {
    cudaError_t e = cudaFuncSetAttribute(rlut_kernel<NTL, Q, BF>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return (int)e;
    init = true;
  }
  rlut_kernel<NTL, Q, BF><<<dim3(gx, gy), NTHREADS, smem, st>>>(*p);
  return (int)cudaGetLastError();
}

// q: tile groups of 128 rows per block (kernel_rlut.GROUPS: 2 at 1-4 tokens, 1 or 2 at 5-8, 1 at 9-16)
extern "C" int cmpq_rlut_launch(const PR* p, int ntl, int q, int bf, int gx, int gy, int smem, void* stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch ((ntl * 4 + q) * 2 + bf) {
    case (1 * 4 + 2) * 2: return launch<1, 2, 0>(p, gx, gy, smem, st);
    case (1 * 4 + 2) * 2 + 1: return launch<1, 2, 1>(p, gx, gy, smem, st);
    case (2 * 4 + 1) * 2: return launch<2, 1, 0>(p, gx, gy, smem, st);
    case (2 * 4 + 1) * 2 + 1: return launch<2, 1, 1>(p, gx, gy, smem, st);
    case (2 * 4 + 2) * 2: return launch<2, 2, 0>(p, gx, gy, smem, st);
    case (2 * 4 + 2) * 2 + 1: return launch<2, 2, 1>(p, gx, gy, smem, st);
    case (4 * 4 + 1) * 2: return launch<4, 1, 0>(p, gx, gy, smem, st);
    case (4 * 4 + 1) * 2 + 1: return launch<4, 1, 1>(p, gx, gy, smem, st);
  }
  return -1;
}

extern "C" int cmpq_rlut_params_size() { return (int)sizeof(PR); }
extern "C" const char* cmpq_rlut_error_string(int e) { return cudaGetErrorString((cudaError_t)e); }
