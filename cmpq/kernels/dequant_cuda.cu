// CMPQ prefill dequantization, CUDA C++: a layer's b-bit groups and FP16 columns -> rows of the
// transposed dense weight Wt [in, out] (fp16 or bf16), each channel at its own row (the group's
// channel ids), which cuBLAS then multiplies with x as it comes.
//
// Reads the runtime layout's quads (cmpq/kernels/layout.py; per group: q [nq, out, 4] int32, K = 32/b contiguous b-bit
// fields per word, 4 words = one "quad" of 4K channels per row; codebooks padded to whole quads).
// Block (row tile of R * 256 rows, quad): the quad's codebooks go to shared memory, each thread
// takes R consecutive output rows, loads their R x 16 bytes of indices and writes, per channel,
// its R values as one R * 2-byte store. With R = 4 a warp writes 256 contiguous bytes per store
// (two whole 128-byte lines) where R = 1 wrote 64: a quarter of the store instructions, no
// partial lines. R = 1 remains for layers whose row count is not a multiple of 4.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <type_traits>

#define NTHREADS 256

struct DQ {
  const int4* q;       // [nq, out] int4
  const __half* cb;    // [nq * 4K, 2^b]
  const int* ch;       // [nq * 4K] input channel of each quad field (zero-padded)
  void* wt;            // [in, out]
  int nq, out, n, bits, is_bf16;  // n: channels of the group
};

template <typename T> __device__ __forceinline__ unsigned short bits_of(float v) {
  if constexpr (std::is_same<T, __half>::value) return __half_as_ushort(__float2half(v));
  else return __bfloat16_as_ushort(__float2bfloat16(v));
}

// One launch for the whole layer: every width group and the FP16 outlier columns. Block row y
// of the grid is one quad of one group (groups in order) or, past the last quad, one outlier
// column, copied from outlier_weight_t [n_act, out] to its row of Wt. Separate launches per width
// left most of the GPU idle on every launch (4096x4096 at 3 bits: ~100 quads x 4 row tiles = 400
// blocks for 1,056 block slots, split three ways) and added the launches' gaps; the FP16 columns
// were a PyTorch index_put with an int32 -> int64 conversion before it. Measured on 2026-12-07
// (H100, 7B shapes, 3 bits, graph-timed with cuBLAS): 4096x4096 at 2048 tokens 135.4 -> 122.7 us,
// at 512 64.9 -> 53.3 us; faster on all six points (benchmarks/notes-kernels.md). The per-group
// kernels are deleted.
#define MAXG 3
struct DQL {
  DQ g[MAXG];            // the width groups (ng of them; wt, out and is_bf16 as below)
  const __half* owt;     // [n_act, out] the FP16 outlier columns
  const int* och;        // [n_act] their input channels
  void* wt;              // [in, out]
  int ng, n_act, out, is_bf16;
};

// one quad of a b-bit group: R rows per thread (R = 4: vector stores, needs out % 4 == 0)
template <int B, int R, typename T>
__device__ __forceinline__ void quad_rows(const DQ& p, int quad, int r0, __half* cb, void* wt_, int out) {
  constexpr int K = 32 / B, V = 1 << B, C = 4 * K;
  const __half* src = p.cb + (size_t)quad * C * V;
  for (int i = threadIdx.x; i < C * V; i += NTHREADS) cb[i] = src[i];
  __syncthreads();
  if (r0 >= out) return;
  int4 w[R];
#pragma unroll
  for (int k = 0; k < R; ++k) w[k] = p.q[(size_t)quad * out + r0 + k];
  const int j0 = quad * C;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int f = 0; f < K; ++f) {
      const int c = i * K + f, j = j0 + c;
      if (j < p.n) {
        unsigned short h[R];
#pragma unroll
        for (int k = 0; k < R; ++k) {
          const unsigned word = i == 0 ? w[k].x : i == 1 ? w[k].y : i == 2 ? w[k].z : w[k].w;
          h[k] = bits_of<T>(__half2float(cb[c * V + ((word >> (B * f)) & (V - 1))]));
        }
        const size_t at = (size_t)p.ch[j] * out + r0;
        if constexpr (R == 4)
          reinterpret_cast<uint2*>(wt_)[at / 4] =
              make_uint2(h[0] | ((unsigned)h[1] << 16), h[2] | ((unsigned)h[3] << 16));
        else
          reinterpret_cast<unsigned short*>(wt_)[at] = h[0];
      }
    }
  }
}

template <int R, typename T>
__global__ void __launch_bounds__(NTHREADS) dequant_layer_kernel(const DQL p) {
  __shared__ __half cb[512];  // the largest quad codebook: 4 bits, 32 channels x 16 entries
  const int r0 = (blockIdx.x * NTHREADS + threadIdx.x) * R;
  int y = blockIdx.y;
  for (int g = 0; g < p.ng; ++g) {
    if (y < p.g[g].nq) {
      switch (p.g[g].bits) {
        case 2: quad_rows<2, R, T>(p.g[g], y, r0, cb, p.wt, p.out); return;
        case 3: quad_rows<3, R, T>(p.g[g], y, r0, cb, p.wt, p.out); return;
        default: quad_rows<4, R, T>(p.g[g], y, r0, cb, p.wt, p.out); return;
      }
    }
    y -= p.g[g].nq;
  }
  if (y >= p.n_act || r0 >= p.out) return;  // an outlier column: its row of Wt, as it is stored
  const __half* src = p.owt + (size_t)y * p.out + r0;
  unsigned short* dst = reinterpret_cast<unsigned short*>(p.wt) + (size_t)p.och[y] * p.out + r0;
#pragma unroll
  for (int k = 0; k < R; ++k) dst[k] = bits_of<T>(__half2float(src[k]));
}

// grid: (row tiles, chosen here from out), (every group's quads, then the outlier columns)
extern "C" int cmpq_dql_launch(const DQL* p, int gy, void* stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (p->ng > MAXG) return -1;
  for (int g = 0; g < p->ng; ++g)
    if (p->g[g].bits < 2 || p->g[g].bits > 4) return -1;
  if (gy == 0) return 0;
  if (p->out % 4 == 0) {
    const int gx = (p->out / 4 + NTHREADS - 1) / NTHREADS;
    if (p->is_bf16) dequant_layer_kernel<4, __nv_bfloat16><<<dim3(gx, gy), NTHREADS, 0, st>>>(*p);
    else dequant_layer_kernel<4, __half><<<dim3(gx, gy), NTHREADS, 0, st>>>(*p);
  } else {
    const int gx = (p->out + NTHREADS - 1) / NTHREADS;
    if (p->is_bf16) dequant_layer_kernel<1, __nv_bfloat16><<<dim3(gx, gy), NTHREADS, 0, st>>>(*p);
    else dequant_layer_kernel<1, __half><<<dim3(gx, gy), NTHREADS, 0, st>>>(*p);
  }
  return (int)cudaGetLastError();
}

extern "C" int cmpq_dql_params_size() { return (int)sizeof(DQL); }
extern "C" const char* cmpq_dql_error_string(int e) { return cudaGetErrorString((cudaError_t)e); }

