// CPU decode kernels for kimi-engine: bf16 and INT4 (Kimi's pack-quantized layout) matmuls with
// float32 activations and accumulation, a fused SiLU-gated MLP, a fused routed-expert MoE, absorbed
// MLA attention, RMSNorm, rope, the router, and a whole decode step built from them (kt_decode_step).
// Plain C ABI, no torch headers (builds in a second or two; loaded with ctypes by cpu.py).
// Weights are read once per call whatever the number of rows; the activations are rearranged
// once per call so that each weight vector unpacks with one or two instructions.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "kimi-engine CPU kernels need AVX-512 F/BW/VL"
#endif

namespace {

// ------------------------------------------------------------------------------------ thread pool
// The caller works too, and a job is finished when all of its tasks are done, not when every
// thread has arrived: a worker the OS has descheduled (a shared machine) delays a job by at most
// the one task it holds, where a barrier would wait for it to be scheduled again. Tasks are
// claimed from one 64-bit word (generation | task count | next task), so a worker that wakes late
// can never claim a task of a newer job under an older job's count.
constexpr int kTaskBits = 20;
constexpr uint64_t kTaskMask = (uint64_t(1) << kTaskBits) - 1;
std::atomic<int> g_spin_micros{50};   // a worker spins this long for the next job, then sleeps (kt_set_spin)

using TaskFn = void (*)(void*, int);

class Pool {
 public:
  ~Pool() { resize(1); }

  void resize(int n) {
    n = std::max(1, n);
    std::lock_guard<std::mutex> one_job(run_mu_);   // not while a job runs
    if (n == int(workers_.size()) + 1) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_ = false;
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { loop(); });
  }

  int threads() const { return int(workers_.size()) + 1; }

  void run(int tasks, TaskFn fn, void* ctx) {
    if (tasks <= 0) return;
    // ctypes drops the GIL around these calls: two Python threads may get here at once. (A task
    // never starts a job of its own, so this cannot deadlock.)
    std::lock_guard<std::mutex> one_job(run_mu_);
    if (workers_.empty() || tasks == 1) {
      for (int i = 0; i < tasks; ++i) fn(ctx, i);
      return;
    }
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    uint64_t gen = (gen_.load() + 1) & kTaskMask;
    state_.store((gen << (2 * kTaskBits)) | (uint64_t(tasks) << kTaskBits), std::memory_order_release);
    gen_.store(gen);
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(mu_); }
      cv_.notify_all();
    }
    work(gen);
    while (done_.load(std::memory_order_acquire) < tasks) _mm_pause();
  }

 private:
  void work(uint64_t gen) {
    for (;;) {
      uint64_t v = state_.load(std::memory_order_acquire);
      uint64_t total = (v >> kTaskBits) & kTaskMask, next = v & kTaskMask;
      if ((v >> (2 * kTaskBits)) != gen || next >= total) return;
      if (!state_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      fn_(ctx_, int(next));   // the job cannot end (and fn_ change) before this task is counted done
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = gen_.load();
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spin = 0; gen_.load() == seen && !stop_; ++spin) {
        _mm_pause();
        if ((spin & 255) == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(g_spin_micros.load(std::memory_order_relaxed))) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1);
          cv_.wait(lock, [&] { return gen_.load() != seen || stop_; });
          sleepers_.fetch_sub(1);
        }
      }
      if (stop_) return;
      seen = gen_.load();
      work(seen);
    }
  }

  std::vector<std::thread> workers_;
  std::atomic<uint64_t> state_{0}, gen_{0};
  std::atomic<int> done_{0}, sleepers_{0};
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<bool> stop_{false};
};

Pool& pool() {
  static Pool p;
  return p;
}

template <class F>
void parallel(int tasks, F& f) {
  pool().run(tasks, [](void* c, int i) { (*static_cast<F*>(c))(i); }, &f);
}

// ------------------------------------------------------------------------------------ conversions
inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {   // round to nearest even, as torch rounds
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 0x40);   // NaN stays NaN
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

inline float load_act(const void* x, bool bf16, int64_t i) {
  return bf16 ? bf16_to_float(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
}

inline void store_act(void* y, bool bf16, int64_t i, float v) {
  if (bf16) static_cast<uint16_t*>(y)[i] = float_to_bf16(v);
  else static_cast<float*>(y)[i] = v;
}

// ------------------------------------------------------------------------------------ bf16 weights
// A 512-bit load holds 32 bf16 weights as 16 (even, odd) pairs: shifting left by 16 gives the even
// ones as float32, masking the low half gives the odd ones. The activations are stored per 32
// columns as their 16 even then their 16 odd values to match (BF16_BLOCK floats, zero padded).
constexpr int BF16_BLOCK = 32;

inline int64_t bf16_blocks(int64_t K) { return (K + BF16_BLOCK - 1) / BF16_BLOCK; }

void bf16_prepare_row(const void* x, bool bf16, int64_t K, float* out) {
  int64_t nb = bf16_blocks(K);
  std::memset(out, 0, sizeof(float) * nb * BF16_BLOCK);
  for (int64_t k = 0; k < K; ++k) out[(k / 32) * 32 + (k & 1) * 16 + (k % 32) / 2] = load_act(x, bf16, k);
}

// Weight rows are streamed one at a time, front to back, with a software prefetch PREFETCH_BYTES
// ahead: measured on the 2-core Zen 4 box, rows read 4 at a time (4 streams) or without the prefetch
// left a core at 60-80% of its DRAM read bandwidth, each task starting new streams cold. The
// distance hardly matters (512 B to 8 KB within noise for bf16 and INT4 rows). KT_* macros: for
// experiments (-DKT_PREFETCH_BYTES=..., -DKT_TASK_BYTES=...).
#ifndef KT_PREFETCH_BYTES
#define KT_PREFETCH_BYTES 1024
#endif
constexpr int PREFETCH_BYTES = KT_PREFETCH_BYTES;

inline void prefetch(const void* p) {
  if constexpr (PREFETCH_BYTES > 0) _mm_prefetch(static_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
}

// out[m] = dot(x row m, weight row w) for MR activation rows (prepared by bf16_prepare_row).
template <int MR>
inline void bf16_row(const float* const* xs, const uint16_t* w, int64_t K, float out[MR]) {
  constexpr int U = MR <= 2 ? 2 : 1;   // blocks per iteration: enough independent FMA chains for few rows
  __m512 acc[MR][2 * U];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 2 * U; ++i) acc[m][i] = _mm512_setzero_ps();
  const __m512i hi_mask = _mm512_set1_epi32(int(0xffff0000u));
  const int64_t full = K / BF16_BLOCK, nb = bf16_blocks(K);
  int64_t b = 0;
  for (; b + U <= full; b += U)
    for (int u = 0; u < U; ++u) {
      prefetch(w + (b + u) * BF16_BLOCK);
      __m512i v = _mm512_loadu_si512(w + (b + u) * BF16_BLOCK);
      __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
      for (int m = 0; m < MR; ++m) {
        acc[m][2 * u] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xs[m] + (b + u) * BF16_BLOCK), acc[m][2 * u]);
        acc[m][2 * u + 1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xs[m] + (b + u) * BF16_BLOCK + 16), acc[m][2 * u + 1]);
      }
    }
  for (; b < nb; ++b) {   // the last blocks: fewer than U, or one partial
    int64_t left = K - b * BF16_BLOCK;
    __mmask32 mask = left >= 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << left) - 1);
    __m512i v = _mm512_maskz_loadu_epi16(mask, w + b * BF16_BLOCK);
    __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xs[m] + b * BF16_BLOCK), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xs[m] + b * BF16_BLOCK + 16), acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    __m512 t = acc[m][0];
    for (int i = 1; i < 2 * U; ++i) t = _mm512_add_ps(t, acc[m][i]);
    out[m] = _mm512_reduce_add_ps(t);
  }
}

// ------------------------------------------------------------------------------------ INT4 weights
// Kimi's layout: int32 word c/8 of a row holds columns c..c+7 as 4-bit nibbles (q + 8), one bf16
// scale per G columns. A 512-bit load is 16 words = 128 columns. Prepared activations take 512
// bytes per 128 columns (INT4_BLOCK), in the order the unpacking below produces the weights.
constexpr int INT4_BLOCK = 128;

inline int64_t int4_blocks(int64_t K) { return (K + INT4_BLOCK - 1) / INT4_BLOCK; }

struct Int4Layout {
  int64_t K, G;           // columns, group size (32, 64, 128 or a multiple of 128)
  __m512i scale_index;    // 16-bit lane 2i + 1: the group of float lane i within a block, relative to its first group
  int per_block;          // scales a block spans
  bool split;             // float32 activations (the vpermps tile), else bf16 (the vdpbf16ps tile)
};

inline Int4Layout int4_layout(int64_t K, int64_t G, bool split) {
  Int4Layout l{K, G, _mm512_setzero_si512(), 1, split};
  if (G < INT4_BLOCK) {
    alignas(64) int16_t idx[32] = {};
    for (int i = 0; i < 16; ++i) idx[2 * i + 1] = int16_t(8 * i / G);   // both unpackings: float lane i covers columns of group 8i/G
    l.scale_index = _mm512_load_si512(idx);
    l.per_block = int(INT4_BLOCK / G);
  }
  return l;
}

// Scales for block b, as one float per lane: each bf16 scale moved into the high half of its lanes
// (a float32 with the same value), the low halves zeroed, by one vpermw.
inline __m512 int4_scale_lanes(__m512i raw, const Int4Layout& L) {
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(__mmask32(0xaaaaaaaau), L.scale_index, raw));
}

// f(b, words, scales) for every block b of a row: the full blocks with plain loads, then the partial
// one (K not a multiple of 128) with masked ones, its index arithmetic (two divisions, a min) kept
// out of the loop (measured: the 64-expert MoE of benchmarks/bench_cpu.py, 128 tokens, ~10% faster).
template <class F>
inline void int4_for_blocks(const int32_t* w, const uint16_t* s, const Int4Layout& L, F f) {
  const int64_t full = L.K / INT4_BLOCK;
  const __mmask32 scale_mask = __mmask32((1u << L.per_block) - 1);
  for (int64_t b = 0; b < full; ++b) {
    prefetch(w + b * 16);
    const int64_t g0 = L.G <= INT4_BLOCK ? b * L.per_block : b * INT4_BLOCK / L.G;
    f(b, _mm512_loadu_si512(w + b * 16), int4_scale_lanes(_mm512_maskz_loadu_epi16(scale_mask, s + g0), L));
  }
  if (L.K % INT4_BLOCK) {
    const int64_t g0 = full * INT4_BLOCK / L.G, ns = std::min<int64_t>(L.per_block, L.K / L.G - g0);
    const __mmask16 words = __mmask16((1u << ((L.K - full * INT4_BLOCK) / 8)) - 1);
    f(full, _mm512_maskz_loadu_epi32(words, w + full * 16),
      int4_scale_lanes(_mm512_maskz_loadu_epi16(__mmask32((1u << ns) - 1), s + g0), L));
  }
}

#ifdef __AVX512BF16__
// vdpbf16ps multiplies 32 bf16 pairs per instruction. 16-bit lane L of the 64 loaded bytes holds
// columns 4L..4L+3; vpermw with a 32-entry table (bf16(n - 8), twice) turns the low nibble of every
// lane into bf16(q), reading only the low 5 bits of each index, so shifting the lanes by 4, 8, 12
// gives the other three: vector j holds column 4L + j in lane L. Float lane i of the products sums
// lanes 2i, 2i+1, i.e. columns of word i, one group. Activations bf16 (bf16 inputs only: it would
// round float32 ones), column 4L + j of a block at 32j + L (int4_position).
inline int64_t int4_position(int64_t c) { return (c % 4) * 32 + c / 4; }

inline void int4_put_bh(float* row, int64_t k, float v) {
  reinterpret_cast<uint16_t*>(row + (k / INT4_BLOCK) * INT4_BLOCK)[int4_position(k % INT4_BLOCK)] = float_to_bf16(v);
}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }
inline __m256i bh_bits(__m256bh v) { return reinterpret_cast<__m256i&>(v); }

// e^x within a few float32 ulps: 2^n e^r, |r| <= ln 2 / 2, e^r by Cephes' expf polynomial (used for
// x <= 0, scores less their running max, and for SiLU before a bf16 rounding; 0 and inf at the ends).
inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);   // x - n ln 2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);   // 0 where n is very negative
}

inline __m512i bcast32(const void* p) {   // the 32 bits at p in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// out[m] = dot(x row m, INT4 weight row w with scales s) for MR activation rows.
template <int MR>
inline void int4_row_bh(const float* const* xs, const int32_t* w, const uint16_t* s, const Int4Layout& L, float out[MR]) {
  alignas(64) static const uint16_t table_words[32] = {
      0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
      0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0};
  const __m512i table = _mm512_load_si512(table_words);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  int4_for_blocks(w, s, L, [&](int64_t b, __m512i v, __m512 sv) {
    __m512i q[4] = {_mm512_permutexvar_epi16(v, table), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table),
                    _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table),
                    _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table)};
    for (int m = 0; m < MR; ++m) {
      const uint16_t* xb = reinterpret_cast<const uint16_t*>(xs[m] + b * INT4_BLOCK);
      // Two independent chains: vdpbf16ps has a latency of several cycles.
      __m512 t0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(q[0]), as_bh(_mm512_loadu_si512(xb)));
      __m512 t1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(q[1]), as_bh(_mm512_loadu_si512(xb + 32)));
      t0 = _mm512_dpbf16_ps(t0, as_bh(q[2]), as_bh(_mm512_loadu_si512(xb + 64)));
      t1 = _mm512_dpbf16_ps(t1, as_bh(q[3]), as_bh(_mm512_loadu_si512(xb + 96)));
      acc[m] = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), sv, acc[m]);
    }
  });
  for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}
#endif

// float32 activations (and every input without AVX512-BF16): lane i of (words >> 4j) holds column 8i + j in its low nibble, and vpermps
// with a 16-entry table turns a nibble into q as a float (it reads only the low 4 bits of each
// index); activations float32, column 8i + j of a block at 16j + i. A lane's 8 columns share a group.
inline void int4_put_ps(float* row, int64_t k, float v) {
  int64_t c = k % INT4_BLOCK;
  row[(k / INT4_BLOCK) * INT4_BLOCK + (c % 8) * 16 + c / 8] = v;
}

template <int MR>
inline void int4_row_ps(const float* const* xs, const int32_t* w, const uint16_t* s, const Int4Layout& L, float out[MR]) {
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  int4_for_blocks(w, s, L, [&](int64_t b, __m512i wv, __m512 sv) {
    __m512 t[MR][2];
    for (int m = 0; m < MR; ++m) t[m][0] = t[m][1] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {   // two chains (even and odd j): the FMA latency
      __m512 q = _mm512_permutexvar_ps(wv, table);
      wv = _mm512_srli_epi32(wv, 4);   // the next nibble down
      for (int m = 0; m < MR; ++m)
        t[m][j & 1] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xs[m] + b * INT4_BLOCK + 16 * j), t[m][j & 1]);
    }
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(t[m][0], t[m][1]), sv, acc[m]);
  });
  for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}

// Column k of a prepared row; which layout follows the tile that will read it.
inline void int4_put(float* row, int64_t k, float v, bool fp32) {
#ifdef __AVX512BF16__
  if (!fp32) return int4_put_bh(row, k, v);
#endif
  int4_put_ps(row, k, v);
}

template <int MR>
inline void int4_row(const float* const* xs, const int32_t* w, const uint16_t* s, const Int4Layout& L, float out[MR]) {
#ifdef __AVX512BF16__
  if (!L.split) return int4_row_bh<MR>(xs, w, s, L, out);
#endif
  int4_row_ps<MR>(xs, w, s, L, out);
}

void int4_prepare_row(const void* x, bool bf16, int64_t K, float* out) {
  std::memset(out, 0, sizeof(float) * int4_blocks(K) * INT4_BLOCK);
  for (int64_t k = 0; k < K; ++k) int4_put(out, k, load_act(x, bf16, k), !bf16);
}

// ------------------------------------------------------------------------------------ row blocking
// One weight row at a time against up to 4 activation rows: each weight vector is loaded and
// unpacked once for all of them, and the weights stream in order.
#ifndef KT_TASK_BYTES
#define KT_TASK_BYTES (512 << 10)
#endif
// Weights per task: each task streams one contiguous range of rows. Measured on the 2-core Zen 4
// box (a 201 MB bf16 GEMV, 2 threads): 128 KB tasks 24 GB/s, 512 KB 36, 2 MB 35; one thread reads
// ~21 GB/s either way. Short ranges taken alternately by the two threads read at two-thirds the rate.
constexpr int64_t TASK_BYTES = KT_TASK_BYTES;
// With more than 4 activation rows a task reads its weights once per 4 rows: they must stay in L2
// beside the activations (measured: float32 prefill of 128 tokens at half speed with 512 KB tasks).
constexpr int64_t REUSED_TASK_BYTES = 128 << 10;

// Tasks for n weight rows of row_bytes each, against m activation rows: about TASK_BYTES apiece
// (REUSED_TASK_BYTES when m > 4); with balance, a multiple of the threads, so that on a quiet
// machine every thread gets the same share.
inline int64_t task_count(int64_t n, int64_t row_bytes, int64_t m, bool balance) {
  const int64_t bytes = m > 4 ? REUSED_TASK_BYTES : TASK_BYTES;
  int64_t tasks = std::clamp<int64_t>((n * row_bytes + bytes - 1) / bytes, 1, std::max<int64_t>(n, 1));
  if (balance) {
    int64_t threads = pool().threads();
    tasks = std::min<int64_t>(std::max<int64_t>(n, 1), (tasks + threads - 1) / threads * threads);
  }
  return tasks;
}

// Rows [n0, n1) of task t when n rows are split into `tasks` near-equal parts.
inline std::pair<int64_t, int64_t> task_range(int64_t t, int64_t tasks, int64_t n) {
  return {n * t / tasks, n * (t + 1) / tasks};
}

template <int MR>
using Rows = std::integral_constant<int, MR>;

// emit(n, m, value) for weight rows [n0, n1) x activation rows [0, M) (xs[m] prepared rows);
// row(n, xs, Rows<MR>{}, out) computes weight row n against activation rows xs[0 .. MR).
template <class Row, class Emit>
inline void rows_times_acts(int64_t n0, int64_t n1, int64_t M, const float* const* xs, Row row, Emit emit) {
  auto rows = [&](int64_t m, auto mr) {
    constexpr int MR = decltype(mr)::value;
    for (int64_t n = n0; n < n1; ++n) {
      float o[MR];
      row(n, xs + m, mr, o);
      for (int i = 0; i < MR; ++i) emit(n, m + i, o[i]);
    }
  };
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows(m, Rows<4>{});
  switch (M - m) {
    case 3: rows(m, Rows<3>{}); break;
    case 2: rows(m, Rows<2>{}); break;
    case 1: rows(m, Rows<1>{}); break;
    default: break;
  }
}

struct Bf16Weight {
  const uint16_t* w;
  int64_t K;
  template <class Emit>
  void apply(int64_t n0, int64_t n1, int64_t M, const float* const* xs, Emit emit) const {
    rows_times_acts(n0, n1, M, xs, [&](int64_t n, const float* const* x, auto mr, float* o) {
      bf16_row<decltype(mr)::value>(x, w + n * K, K, o);
    }, emit);
  }
  int64_t row_bytes() const { return 2 * K; }
  static int64_t row_floats(int64_t K) { return bf16_blocks(K) * BF16_BLOCK; }
  static void prepare(const void* x, bool bf16, int64_t K, float* out) { bf16_prepare_row(x, bf16, K, out); }
};

struct Int4Weight {
  const int32_t* w;
  const uint16_t* s;
  Int4Layout L;
  template <class Emit>
  void apply(int64_t n0, int64_t n1, int64_t M, const float* const* xs, Emit emit) const {
    int64_t ws = L.K / 8, ss = L.K / L.G;
    rows_times_acts(n0, n1, M, xs, [&](int64_t n, const float* const* x, auto mr, float* o) {
      int4_row<decltype(mr)::value>(x, w + n * ws, s + n * ss, L, o);
    }, emit);
  }
  int64_t row_bytes() const { return row_bytes(L.K, L.G); }
  static int64_t row_bytes(int64_t K, int64_t G) { return K / 2 + 2 * (K / G); }
  static int64_t row_floats(int64_t K) { return int4_blocks(K) * INT4_BLOCK; }
  static void prepare(const void* x, bool bf16, int64_t K, float* out) { int4_prepare_row(x, bf16, K, out); }
};

// Activation rows [M, K] (float32 or bf16) -> prepared rows, in parallel when there are many.
template <class W>
std::vector<const float*> prepare_rows(const void* x, bool bf16, int64_t M, int64_t K, std::vector<float>& buf) {
  int64_t rf = W::row_floats(K);
  buf.resize(size_t(M * rf));
  std::vector<const float*> rows(static_cast<size_t>(M));
  size_t esize = bf16 ? 2 : 4;
  auto f = [&](int m) { W::prepare(static_cast<const char*>(x) + m * K * esize, bf16, K, buf.data() + m * rf); };
  if (M >= 16) parallel(int(M), f);
  else for (int m = 0; m < M; ++m) f(m);
  for (int64_t m = 0; m < M; ++m) rows[m] = buf.data() + m * rf;
  return rows;
}

template <class W>
void linear(const W& weight, const void* x, bool x_bf16, int64_t M, int64_t K, int64_t N, void* y, bool y_bf16) {
  std::vector<float> buf;
  auto rows = prepare_rows<W>(x, x_bf16, M, K, buf);
  const int64_t tasks = task_count(N, weight.row_bytes(), M, true);
  auto f = [&](int t) {
    auto [n0, n1] = task_range(t, tasks, N);
    weight.apply(n0, n1, M, rows.data(), [&](int64_t n, int64_t m, float v) { store_act(y, y_bf16, m * N + n, v); });
  };
  parallel(int(tasks), f);
}

// y1 = x w1^T [M, N1] and y2 = x w2^T [M, N2], two bf16 weights of the same K, as one job (the rows
// of w1 then w2, in equal shares): one wait for the threads instead of two, the activations prepared once.
void linear_bf16_pair(const uint16_t* w1, int64_t N1, void* y1, const uint16_t* w2, int64_t N2, void* y2, const void* x,
                      bool x_bf16, int64_t M, int64_t K, bool y_bf16) {
  std::vector<float> buf;
  auto rows = prepare_rows<Bf16Weight>(x, x_bf16, M, K, buf);
  const int64_t N = N1 + N2, tasks = task_count(N, 2 * K, M, true);
  auto f = [&](int t) {
    auto [n0, n1] = task_range(t, tasks, N);
    if (n0 < N1)
      Bf16Weight{w1, K}.apply(n0, std::min(n1, N1), M, rows.data(), [&](int64_t n, int64_t m, float v) { store_act(y1, y_bf16, m * N1 + n, v); });
    if (n1 > N1)
      Bf16Weight{w2, K}.apply(std::max(n0, N1) - N1, n1 - N1, M, rows.data(), [&](int64_t n, int64_t m, float v) { store_act(y2, y_bf16, m * N2 + n, v); });
  };
  parallel(int(tasks), f);
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

#ifdef __AVX512BF16__
// ------------------------------------------------------------------------------------ INT4 strips
// For an expert with many tokens (prefill), int4_row_bh spends half its ops unpacking and scaling.
// Here a strip of 16 weight rows is unpacked once (vpermw, as int4_row_bh) and transposed so that
// each vector holds one 32-bit pair of columns for all 16 rows: vdpbf16ps against a broadcast pair
// of a token's activations (the prepared bh row already pairs them: unit 16j + u of a block is
// columns 8u + j and 8u + 4 + j, both in word u) adds two products to each row's lane, and the
// group's scale is applied once per 32 columns. Rows in the lanes, MT tokens in registers (8: 212
// GFLOP/s on one core from L2, 12: 144, spilling; int4_row_bh at 4 rows: 69-83). The benchmark's
// 64-expert MoE layer (benchmarks/bench_cpu.py), 2 threads, alternating in one process: 128 tokens
// 84-94 ms a layer -> 76-84, 512 tokens 300-326 -> 210-225.
constexpr int STRIP = 16;                 // weight rows per strip: the lanes
constexpr int64_t STRIP_MIN_TOKENS = 16;  // fewer tokens for an expert: int4_row_bh (the unpack is not repaid)

inline bool strips_ok(int64_t K, int64_t G, int64_t N) { return K % INT4_BLOCK == 0 && G % 32 == 0 && N % STRIP == 0; }

// Transpose 16 vectors of 16 32-bit units in place: v[r] unit u -> v[u] unit r.
inline void transpose16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)   // v[i + k]: unit 4l + k of rows i..i+3, in each 128-bit lane l
    for (int k = 0; k < 2; ++k) {
      v[i + 2 * k] = _mm512_unpacklo_epi64(t[i + k], t[i + 2 + k]);
      v[i + 2 * k + 1] = _mm512_unpackhi_epi64(t[i + k], t[i + 2 + k]);
    }
  for (int i = 0; i < 8; ++i) {
    int a = (i / 4) * 8 + i % 4;   // pairs (a, a + 4) of the groups of four
    t[a] = _mm512_shuffle_i32x4(v[a], v[a + 4], 0x88);
    t[a + 4] = _mm512_shuffle_i32x4(v[a], v[a + 4], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    v[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    v[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Rows [n, n + 16) of an INT4 weight of K columns, unpacked and transposed: wq[(b 4 + j) 16 + u] is pair
// unit u of vector j of block b (columns 128b + 8u + j and + 4) for the 16 rows; scales[g 16 + r] is
// row r's scale of group g.
inline void strip_prepare(const int32_t* w, const uint16_t* s, int64_t K, int64_t G, int64_t n, __m512i* wq, float* scales) {
  alignas(64) static const uint16_t table_words[32] = {
      0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
      0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0};
  const __m512i table = _mm512_load_si512(table_words);
  const int64_t words = K / 8, groups = K / G;
  __m512i v[STRIP];
  for (int64_t b = 0; b < K / INT4_BLOCK; ++b)
    for (int j = 0; j < 4; ++j) {
      for (int r = 0; r < STRIP; ++r)
        v[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(_mm512_loadu_si512(w + (n + r) * words + b * 16), 4 * j), table);
      transpose16(v);
      for (int u = 0; u < 16; ++u) _mm512_storeu_si512(wq + (b * 4 + j) * 16 + u, v[u]);
    }
  for (int r = 0; r < STRIP; ++r)
    for (int64_t g = 0; g < groups; ++g) scales[g * STRIP + r] = bf16_to_float(s[(n + r) * groups + g]);
}

// out[t 16 + r] = dot(activation row t (prepared, bh layout), strip row r) for MT rows xs.
template <int MT>
inline void strip_tile(const __m512i* wq, const float* scales, int64_t K, int64_t G, const float* const* xs, float* out) {
  __m512 total[MT];
  for (int t = 0; t < MT; ++t) total[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / INT4_BLOCK; ++b)
    for (int w4 = 0; w4 < 4; ++w4) {   // words 4 w4 .. 4 w4 + 3 of the block: 32 columns, one scale
      __m512 part[MT];
      for (int t = 0; t < MT; ++t) part[t] = _mm512_setzero_ps();
      for (int j = 0; j < 4; ++j)
        for (int u = 4 * w4; u < 4 * w4 + 4; ++u) {
          const __m512i wv = _mm512_loadu_si512(wq + (b * 4 + j) * 16 + u);
          for (int t = 0; t < MT; ++t)
            part[t] = _mm512_dpbf16_ps(part[t], as_bh(wv), as_bh(bcast32(reinterpret_cast<const uint32_t*>(xs[t] + b * INT4_BLOCK) + 16 * j + u)));
        }
      const __m512 sc = _mm512_loadu_ps(scales + (b * INT4_BLOCK + 32 * w4) / G * STRIP);
      for (int t = 0; t < MT; ++t) total[t] = _mm512_fmadd_ps(part[t], sc, total[t]);
    }
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(out + t * STRIP, total[t]);
}

// out[m 16 + r] for the M activation rows xs against strip rows [n, n + 16) of w.
struct Strip {
  std::vector<__m512i> wq;
  std::vector<float> scales;
  void run(const int32_t* w, const uint16_t* s, int64_t K, int64_t G, int64_t n, const float* const* xs, int64_t M, float* out) {
    wq.resize(size_t(K / INT4_BLOCK * 64));
    scales.resize(size_t(K / G * STRIP));
    strip_prepare(w, s, K, G, n, wq.data(), scales.data());
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) strip_tile<8>(wq.data(), scales.data(), K, G, xs + m, out + m * STRIP);
    for (; m + 4 <= M; m += 4) strip_tile<4>(wq.data(), scales.data(), K, G, xs + m, out + m * STRIP);
    for (; m < M; ++m) strip_tile<1>(wq.data(), scales.data(), K, G, xs + m, out + m * STRIP);
  }
};
#endif

}  // namespace

// ------------------------------------------------------------------------------------ C ABI
// All matrices are contiguous, row-major; a dtype flag says whether an activation is bf16 (else
// float32). Shapes are checked by the Python wrappers, which own every pointer passed here.
extern "C" {

int kt_version() { return 3; }

void kt_set_threads(int n) { pool().resize(n); }

void kt_set_spin(int micros) { g_spin_micros.store(std::max(0, micros)); }

int kt_get_threads() { return pool().threads(); }

// y [M, N] = x [M, K] @ w[N, K]^T, w bf16.
void kt_linear_bf16(const void* x, int x_bf16, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y, int y_bf16) {
  linear(Bf16Weight{w, K}, x, x_bf16, M, K, N, y, y_bf16);
}

// y [M, N] = x [M, K] @ W^T with W INT4: packed int32 [N, K/8], scales bf16 [N, K/G].
void kt_linear_int4(const void* x, int x_bf16, int64_t M, int64_t K, const int32_t* packed, const uint16_t* scale,
                    int64_t G, int64_t N, void* y, int y_bf16) {
  linear(Int4Weight{packed, scale, int4_layout(K, G, !x_bf16)}, x, x_bf16, M, K, N, y, y_bf16);
}

// y [M, D] = down(silu(gate(x)) * up(x)), all bf16 weights: gate, up [I, D], down [D, I].
void kt_mlp_bf16(const void* x, int x_bf16, int64_t M, int64_t D, int64_t I, const uint16_t* gate, const uint16_t* up,
                 const uint16_t* down, void* y, int y_bf16) {
  std::vector<float> xbuf, hbuf(size_t(M * Bf16Weight::row_floats(I)), 0.0f);
  auto rows = prepare_rows<Bf16Weight>(x, x_bf16, M, D, xbuf);
  int64_t hf = Bf16Weight::row_floats(I);
  std::vector<float> g(size_t(M * I));
  const int64_t tasks = task_count(I, 4 * D, M, true);   // a gate row and an up row
  auto f1 = [&](int t) {
    auto [n0, n1] = task_range(t, tasks, I);
    Bf16Weight{gate, D}.apply(n0, n1, M, rows.data(), [&](int64_t n, int64_t m, float v) { g[m * I + n] = v; });
    Bf16Weight{up, D}.apply(n0, n1, M, rows.data(), [&](int64_t n, int64_t m, float v) {
      hbuf[m * hf + (n / 32) * 32 + (n & 1) * 16 + (n % 32) / 2] = silu(g[m * I + n]) * v;
    });
  };
  parallel(int(tasks), f1);
  std::vector<const float*> hrows(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) hrows[m] = hbuf.data() + m * hf;
  const int64_t tasks2 = task_count(D, 2 * I, M, true);
  auto f2 = [&](int t) {
    auto [n0, n1] = task_range(t, tasks2, D);
    Bf16Weight{down, I}.apply(n0, n1, M, hrows.data(), [&](int64_t n, int64_t m, float v) { store_act(y, y_bf16, m * D + n, v); });
  };
  parallel(int(tasks2), f2);
}

// Per-head matmuls of absorbed MLA attention, bf16 weights w[h * head_stride + r * row_stride + c].
// transposed = 0: y[m, h, n] = sum_k x[m, h, k] w[h, n, k]   (rows are outputs: o = o_latent @ W_UV^T)
// transposed = 1: y[m, h, c] = sum_n x[m, h, n] w[h, n, c]   (rows are inputs:  q_latent = q_nope @ W_UK)
// x [M, H, Kin], y [M, H, Nout].
// A task is one head (for the value form, at most HEAD_ROWS of its rows): its weights are one
// contiguous stream (head_stride apart), where splitting a head's columns between tasks interleaved
// two strided streams over the same pages (measured 12-14 GB/s on 2 threads for Kimi's 16-head kv_b).
constexpr int64_t HEAD_ROWS = 128;

}  // extern "C"

namespace {
#ifdef __AVX512BF16__
// The transposed form with bf16 x: rows n and n + half (half = ceil(Kin / 2)) interleaved into
// (w[n, c], w[n + half, c]) pairs by vpunpck{l,h}wd, then one vdpbf16ps with (x[n], x[n + half]):
// 4 vector ops per 64 weights where widening each to float32 for an FMA takes 16. Rows n and n + half,
// not n and n + 1: two sequential streams, where alternating 64-byte pieces of neighbouring rows
// (then skipping a row) defeated the hardware prefetcher (Kimi's 16-head kv_b from DRAM, 1 thread:
// 9 GB/s pairing n, n + 1, 18 this way; 2 threads 16 and 23). The unpacks interleave within 128-bit
// lanes, so accumulator lane 4l + k of the low (high) half of a 32-column chunk is column 8l + k
// (8l + 4 + k); the row accumulates in L1 in that order and is put back in order at the end.
void heads_transposed_bh(const uint16_t* x, int64_t M, int64_t H, int64_t Kin, const uint16_t* w, int64_t head_stride,
                         int64_t row_stride, int64_t Nout, void* y, bool y_bf16) {
  const int64_t chunks = (Nout + 31) / 32;
  auto f = [&](int h) {
    const uint16_t* wh = w + h * head_stride;
    std::vector<float> acc(size_t(chunks * 32));
    for (int64_t m = 0; m < M; ++m) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const uint16_t* xr = x + (m * H + h) * Kin;
      const int64_t half = (Kin + 1) / 2;
      for (int64_t n = 0; n < half; ++n) {
        const bool two = n + half < Kin;
        const uint32_t pair = uint32_t(xr[n]) | (two ? uint32_t(xr[n + half]) << 16 : 0u);
        const __m512bh xp = as_bh(_mm512_set1_epi32(int32_t(pair)));
        const uint16_t* w0 = wh + n * row_stride;
        const uint16_t* w1 = w0 + half * row_stride;
        for (int64_t i = 0; i < chunks; ++i) {
          prefetch(w0 + 32 * i);
          if (two) prefetch(w1 + 32 * i);
          const int64_t left = Nout - 32 * i;
          const __mmask32 mask = left >= 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << left) - 1);
          const __m512i a = _mm512_maskz_loadu_epi16(mask, w0 + 32 * i);
          const __m512i b = two ? _mm512_maskz_loadu_epi16(mask, w1 + 32 * i) : _mm512_setzero_si512();
          float* ai = acc.data() + 32 * i;
          _mm512_storeu_ps(ai, _mm512_dpbf16_ps(_mm512_loadu_ps(ai), as_bh(_mm512_unpacklo_epi16(a, b)), xp));
          _mm512_storeu_ps(ai + 16, _mm512_dpbf16_ps(_mm512_loadu_ps(ai + 16), as_bh(_mm512_unpackhi_epi16(a, b)), xp));
        }
      }
      for (int64_t c = 0; c < Nout; ++c) {
        const int64_t i = c / 32, r = c % 32, l = r / 8, k = r % 8;   // column 32i + 8l + k
        store_act(y, y_bf16, (m * H + h) * Nout + c, acc[size_t(32 * i + (k < 4 ? 0 : 16) + 4 * l + k % 4)]);
      }
    }
  };
  parallel(int(H), f);
}
#endif
}  // namespace

extern "C" {

void kt_heads_bf16(const void* x, int x_bf16, int64_t M, int64_t H, int64_t Kin, const uint16_t* w, int64_t head_stride,
                   int64_t row_stride, int64_t Nout, int transposed, void* y, int y_bf16) {
  if (!transposed) {
    std::vector<float> buf;
    auto rows = prepare_rows<Bf16Weight>(x, x_bf16, M * H, Kin, buf);   // row m * H + h
    int64_t blocks = (Nout + HEAD_ROWS - 1) / HEAD_ROWS;
    auto f = [&](int t) {
      int64_t h = t / blocks, n0 = (t % blocks) * HEAD_ROWS, n1 = std::min<int64_t>(Nout, n0 + HEAD_ROWS);
      const uint16_t* wh = w + h * head_stride;
      std::vector<const float*> xs(static_cast<size_t>(M));
      for (int64_t m = 0; m < M; ++m) xs[size_t(m)] = rows[size_t(m * H + h)];
      rows_times_acts(n0, n1, M, xs.data(), [&](int64_t n, const float* const* xr, auto mr, float* o) {
        bf16_row<decltype(mr)::value>(xr, wh + n * row_stride, Kin, o);
      }, [&](int64_t n, int64_t m, float v) { store_act(y, y_bf16, (m * H + h) * Nout + n, v); });
    };
    parallel(int(H * blocks), f);
    return;
  }
#ifdef __AVX512BF16__
  if (x_bf16) return heads_transposed_bh(static_cast<const uint16_t*>(x), M, H, Kin, w, head_stride, row_stride, Nout, y, y_bf16);
#endif
  // The transposed form, float32 x: the output row accumulates in L1 (Nout floats), two weight rows per pass.
  const int64_t vecs = (Nout + 15) / 16;
  auto f = [&](int h) {
    const uint16_t* wh = w + h * head_stride;
    std::vector<float> acc(size_t(vecs * 16));
    for (int64_t m = 0; m < M; ++m) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t xrow = (m * H + h) * Kin;
      const int64_t half = (Kin + 1) / 2;
      for (int64_t n = 0; n < half; ++n) {   // rows n and n + half: two sequential streams (see heads_transposed_bh)
        const bool two = n + half < Kin;
        const __m512 x0 = _mm512_set1_ps(load_act(x, x_bf16, xrow + n));
        const __m512 x1 = _mm512_set1_ps(two ? load_act(x, x_bf16, xrow + n + half) : 0.0f);
        const uint16_t* w0 = wh + n * row_stride;
        const uint16_t* w1 = two ? w0 + half * row_stride : w0;
        for (int64_t i = 0; i < vecs; ++i) {
          if ((i & 1) == 0) {
            prefetch(w0 + 16 * i);
            prefetch(w1 + 16 * i);
          }
          __mmask16 mask = Nout - 16 * i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (Nout - 16 * i)) - 1);
          __m512 a = _mm512_loadu_ps(acc.data() + 16 * i);
          a = _mm512_fmadd_ps(x0, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, w0 + 16 * i)), 16)), a);
          a = _mm512_fmadd_ps(x1, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, w1 + 16 * i)), 16)), a);
          _mm512_storeu_ps(acc.data() + 16 * i, a);
        }
      }
      for (int64_t c = 0; c < Nout; ++c) store_act(y, y_bf16, (m * H + h) * Nout + c, acc[size_t(c)]);
    }
  };
  parallel(int(H), f);
}

// Routed INT4 experts: y [T, D] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]); ids of -1 skip.
// gate_up packed [E, 2I, D/8] + scales [E, 2I, D/G] (rows :I gate, I: up), down [E, D, I/8] + [E, D, I/G].
// Each touched expert's weights are read once, for all of its tokens.
void kt_moe_int4(const void* x, int x_bf16, int64_t T, int64_t D, int64_t I, int64_t E, int64_t G,
                 const int32_t* gu_packed, const uint16_t* gu_scale, const int32_t* dn_packed, const uint16_t* dn_scale,
                 const int32_t* ids, const float* weights, int64_t K, void* y, int y_bf16) {
  // (token, slot) pairs grouped by expert, in token order.
  std::vector<std::vector<int64_t>> by_expert(static_cast<size_t>(E));
  std::vector<char> valid(size_t(T * K), 0);
  for (int64_t p = 0; p < T * K; ++p)
    if (ids[p] >= 0 && ids[p] < E) by_expert[size_t(ids[p])].push_back(p), valid[size_t(p)] = 1;
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (!by_expert[size_t(e)].empty()) active.push_back(e);

  std::vector<float> xbuf;
  auto rows = prepare_rows<Int4Weight>(x, x_bf16, T, D, xbuf);
  const Int4Layout Ld = int4_layout(D, G, !x_bf16), Li = int4_layout(I, G, !x_bf16);
  const int64_t hf = Int4Weight::row_floats(I);
  std::vector<float> h(size_t(T * K * hf), 0.0f), gbuf(size_t(T * K * I));   // per pair: silu(gate) * up

  // One job: first gate and up of every active expert (tasks over (expert, block of I rows)), then
  // down (tasks over (expert, block of D rows)) into each pair's own row. Tasks start in order, so
  // a down task only waits for its expert's gate and up tasks still running on other threads; one
  // job instead of two saves a wait for the slowest thread and a cold start (measured: the MoE layer
  // of benchmarks/bench_cpu.py at batch 1, 0.99-1.06 ms in two jobs, 0.88-0.93 in one; float32 1.30, 1.13).
  const int64_t pairs_per_expert = T * K / std::max<int64_t>(int64_t(active.size()), 1);   // the mean
  // With strips (see Strip: bf16 activations, experts of many tokens) the row ranges are whole strips.
#ifdef __AVX512BF16__
  const bool strips = x_bf16 && strips_ok(D, G, I) && strips_ok(I, G, D);
#else
  const bool strips = false;
#endif
  const int64_t unit = strips ? STRIP : 1;
  const int64_t iblocks = std::min(I / unit, task_count(I, 2 * Int4Weight::row_bytes(D, G), pairs_per_expert, false));
  const int64_t dblocks = std::min(D / unit, task_count(D, Int4Weight::row_bytes(I, G), pairs_per_expert, false));
  auto rows_of = [&](int64_t task, int64_t tasks, int64_t n) {
    auto [a, b] = task_range(task, tasks, n / unit);
    return std::pair<int64_t, int64_t>{a * unit, b * unit};
  };
  const int64_t up_tasks = int64_t(active.size()) * iblocks;
  std::unique_ptr<std::atomic<int64_t>[]> pending(new std::atomic<int64_t>[active.size()]);   // gate-up tasks left
  for (size_t a = 0; a < active.size(); ++a) pending[a].store(iblocks, std::memory_order_relaxed);
  std::vector<float> out(size_t(T * K * D), 0.0f);
  auto f = [&](int t) {
    const bool down = t >= up_tasks;
    if (down) t -= int(up_tasks);
    const int64_t a = t / (down ? dblocks : iblocks), e = active[size_t(a)];
    const auto& pairs = by_expert[size_t(e)];
    const int64_t M = int64_t(pairs.size());
    std::vector<const float*> xs(pairs.size());
    const bool strip = strips && M >= STRIP_MIN_TOKENS;
    if (!down) {
      auto [n0, n1] = rows_of(t % iblocks, iblocks, I);
      for (size_t i = 0; i < pairs.size(); ++i) xs[i] = rows[size_t(pairs[i] / K)];
      const int32_t* gw = gu_packed + e * 2 * I * (D / 8);
      const uint16_t* gs = gu_scale + e * 2 * I * (D / G);
      if (strip) {
#ifdef __AVX512BF16__
        Strip st;
        std::vector<float> gate(size_t(M * STRIP)), up(size_t(M * STRIP));
        for (int64_t n = n0; n < n1; n += STRIP) {
          st.run(gw, gs, D, G, n, xs.data(), M, gate.data());
          st.run(gw, gs, D, G, I + n, xs.data(), M, up.data());
          for (int64_t m = 0; m < M; ++m) {   // silu(gate) * up for the strip's 16 columns of h, vectorized
            const __m512 g = _mm512_loadu_ps(gate.data() + m * STRIP);
            const __m512 silu_g = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            alignas(32) uint16_t hb[STRIP];
            _mm256_store_si256(reinterpret_cast<__m256i*>(hb), bh_bits(_mm512_cvtneps_pbh(_mm512_mul_ps(silu_g, _mm512_loadu_ps(up.data() + m * STRIP)))));
            uint16_t* row = reinterpret_cast<uint16_t*>(h.data() + pairs[m] * hf + (n / INT4_BLOCK) * INT4_BLOCK);
            for (int r = 0; r < STRIP; ++r) row[int4_position((n + r) % INT4_BLOCK)] = hb[r];
          }
        }
#endif
      } else {
        Int4Weight{gw, gs, Ld}.apply(n0, n1, M, xs.data(), [&](int64_t n, int64_t m, float v) { gbuf[pairs[m] * I + n] = v; });
        Int4Weight{gw + I * (D / 8), gs + I * (D / G), Ld}.apply(n0, n1, M, xs.data(), [&](int64_t n, int64_t m, float v) {
          int4_put(h.data() + pairs[m] * hf, n, silu(gbuf[pairs[m] * I + n]) * v, !x_bf16);
        });
      }
      pending[size_t(a)].fetch_sub(1, std::memory_order_release);
      return;
    }
    while (pending[size_t(a)].load(std::memory_order_acquire) > 0) _mm_pause();
    auto [n0, n1] = rows_of(t % dblocks, dblocks, D);
    for (size_t i = 0; i < pairs.size(); ++i) xs[i] = h.data() + pairs[i] * hf;
    const int32_t* dw = dn_packed + e * D * (I / 8);
    const uint16_t* ds = dn_scale + e * D * (I / G);
    if (strip) {
#ifdef __AVX512BF16__
      Strip st;
      std::vector<float> y(size_t(M * STRIP));
      for (int64_t n = n0; n < n1; n += STRIP) {
        st.run(dw, ds, I, G, n, xs.data(), M, y.data());
        for (int64_t m = 0; m < M; ++m)
          for (int r = 0; r < STRIP; ++r) out[pairs[m] * D + n + r] = y[size_t(m * STRIP + r)];
      }
#endif
    } else {
      Int4Weight{dw, ds, Li}.apply(n0, n1, M, xs.data(), [&](int64_t n, int64_t m, float v) { out[pairs[m] * D + n] = v; });
    }
  };
  parallel(int(up_tasks + int64_t(active.size()) * dblocks), f);
  // Each token sums its pairs, in slot order.
  auto f3 = [&](int tok) {
    for (int64_t n = 0; n < D; ++n) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k)
        if (valid[size_t(tok * K + k)]) sum += weights[tok * K + k] * out[(tok * K + k) * D + n];
      store_act(y, y_bf16, tok * D + n, sum);
    }
  };
  if (T >= 16) parallel(int(T), f3);
  else for (int tok = 0; tok < T; ++tok) f3(tok);
}

// RMSNorm as the model computes it: y = w * round_x(x * rsqrt(mean(x^2) + eps)), in float32, the
// normalized row rounded to x's dtype before the scale (HF's order), y rounded to its own dtype.
// x rows are x_stride elements apart (a column slice of a wider activation); y is contiguous.
void kt_rmsnorm(const void* x, int x_bf16, int64_t M, int64_t D, int64_t x_stride, const void* w, int w_bf16,
                float eps, void* y, int y_bf16) {
  auto f = [&](int m) {
    float ss = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      float v = load_act(x, x_bf16, m * x_stride + d);
      ss += v * v;
    }
    float r = 1.0f / std::sqrt(ss / float(D) + eps);
    for (int64_t d = 0; d < D; ++d) {
      float v = load_act(x, x_bf16, m * x_stride + d) * r;
      if (x_bf16) v = bf16_to_float(float_to_bf16(v));
      store_act(y, y_bf16, m * D + d, load_act(w, w_bf16, d) * v);
    }
  };
  if (M >= 16) parallel(int(M), f);
  else for (int m = 0; m < M; ++m) f(m);
}

// Rope on interleaved pairs, as the model computes it: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) in
// float32, each product rounded before the sum (no FMA: the same bits as torch), then rounded to x's
// dtype. x [T, heads, R] with strides (t_stride, h_stride, 1); cos, sin [T, R/2] float32; y contiguous.
__attribute__((optimize("fp-contract=off")))
void kt_rope(const void* x, int bf16, int64_t T, int64_t heads, int64_t R, int64_t t_stride, int64_t h_stride,
             const float* cos, const float* sin, void* y) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < R / 2; ++i) {
        int64_t at = t * t_stride + h * h_stride + 2 * i, out = (t * heads + h) * R + 2 * i;
        float x0 = load_act(x, bf16, at), x1 = load_act(x, bf16, at + 1), c = cos[t * (R / 2) + i], s = sin[t * (R / 2) + i];
        float a = x0 * c, b = x1 * s, d = x1 * c, e = x0 * s;
        store_act(y, bf16, out, a - b);
        store_act(y, bf16, out + 1, d + e);
      }
}

// The noaux_tc router, as kernels/routing.py's route_ref: s = sigmoid(logits), experts chosen on
// s + bias (within the topk_group best groups when n_group > 1, a group scored by the sum of its two
// best), weights = the chosen s (normalized when norm), times scale. Ties go to the lower index (a
// stable descending sort); ids come out by decreasing biased score. logits [T, E] float32.
void kt_route(const float* logits, const float* bias, int64_t T, int64_t E, int64_t K, int64_t n_group,
              int64_t topk_group, int norm, float scale, float* weights, int32_t* ids) {
  auto best_untaken = [](const float* v, const std::vector<char>& taken, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i)
      if (!taken[size_t(i)] && (best < 0 || v[i] > v[best])) best = i;
    return best;
  };
  auto f = [&](int t) {
    std::vector<float> sc(static_cast<size_t>(E)), choice(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      sc[size_t(e)] = 1.0f / (1.0f + std::exp(-logits[t * E + e]));
      choice[size_t(e)] = bias ? sc[size_t(e)] + bias[e] : sc[size_t(e)];
    }
    if (n_group > 1) {
      const int64_t per = E / n_group;
      std::vector<float> group(static_cast<size_t>(n_group));
      for (int64_t g = 0; g < n_group; ++g) {   // the sum of the group's two best (its best, if alone)
        float a = -INFINITY, b = -INFINITY;
        for (int64_t e = g * per; e < (g + 1) * per; ++e) {
          float v = choice[size_t(e)];
          if (v > a) b = a, a = v;
          else if (v > b) b = v;
        }
        group[size_t(g)] = per >= 2 ? a + b : a;
      }
      std::vector<char> kept(size_t(n_group), 0);
      for (int64_t k = 0; k < std::min(topk_group, n_group); ++k) kept[size_t(best_untaken(group.data(), kept, n_group))] = 1;
      for (int64_t e = 0; e < E; ++e)
        if (!kept[size_t(e / per)]) choice[size_t(e)] = -INFINITY;
    }
    std::vector<char> taken(size_t(E), 0);
    float sum = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      int64_t e = best_untaken(choice.data(), taken, E);
      taken[size_t(e)] = 1;
      ids[t * K + k] = int32_t(e);
      weights[t * K + k] = sc[size_t(e)];
      sum += sc[size_t(e)];
    }
    for (int64_t k = 0; k < K; ++k) weights[t * K + k] = (norm ? weights[t * K + k] / (sum + 1e-20f) : weights[t * K + k]) * scale;
  };
  if (T >= 16) parallel(int(T), f);
  else for (int t = 0; t < T; ++t) f(t);
}

// Absorbed MLA decode attention over the paged latent cache: for query i and head h,
// out[i, h] = softmax_t(scale * (q_latent[i, h] . latent_t + q_rope[i, h] . rope_t)) @ latent_t over
// tokens t < seq_lens[i], token t at kv[block_table[i, t / block_size], t % block_size] = (latent, rope).
// q_latent [Q, H, C], q_rope [Q, H, R], out [Q, H, C]: contiguous; kv [*, block_size, C + R].
// Tasks are (query, split of its tokens): each reads its tokens once for every head, one cache block
// at a time, with an online softmax; the splits are merged by their log-sum-exp (flash decoding).
constexpr int64_t MLA_SPLIT_TOKENS = 128;   // tokens per task (at least) when a query is split

// Token row (C + R values, float32 or bf16) -> float32, zero padded to Wp.
inline void kv_row_to_float(const void* kv, bool bf16, int64_t offset, int64_t W, int64_t Wp, float* out) {
  for (int64_t w = 0; w < Wp; w += 16) {
    __mmask16 mask = W - w >= 16 ? __mmask16(0xffff) : W > w ? __mmask16((1u << (W - w)) - 1) : __mmask16(0);
    __m512 v = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                          mask, static_cast<const uint16_t*>(kv) + offset + w)), 16))
                    : _mm512_maskz_loadu_ps(mask, static_cast<const float*>(kv) + offset + w);
    _mm512_storeu_ps(out + w, v);
  }
}

}  // extern "C"

namespace {
// The float path's scores of head vectors [v0, v0 + NV) for tokens [j, j + NJ) of a block (kvf: token j
// at kvf + j Wp, as float32; qt: the queries transposed and pre-scaled).
template <int NV, int NJ>
inline void mla_scores_ps(const float* qt, const float* kvf, int64_t Wp, int64_t W, int64_t Hv, int64_t v0, int64_t j,
                          int64_t block_size, float* s) {
  __m512 d[NV][NJ];
  for (int v = 0; v < NV; ++v)
    for (int t = 0; t < NJ; ++t) d[v][t] = _mm512_setzero_ps();
  for (int64_t w = 0; w < W; ++w) {
    __m512 k[NJ];
    for (int t = 0; t < NJ; ++t) k[t] = _mm512_set1_ps(kvf[(j + t) * Wp + w]);
    for (int v = 0; v < NV; ++v) {
      __m512 q = _mm512_loadu_ps(qt + (w * Hv + v0 + v) * 16);
      for (int t = 0; t < NJ; ++t) d[v][t] = _mm512_fmadd_ps(q, k[t], d[v][t]);
    }
  }
  for (int v = 0; v < NV; ++v)
    for (int t = 0; t < NJ; ++t) _mm512_storeu_ps(s + ((v0 + v) * block_size + j + t) * 16, d[v][t]);
}

// a[h, c] = a[h, c] * correction[h] + sum_j p[h, j] kvf[j, c] (the float path's block of nt tokens),
// heads [h0, h0 + NH), 16-column chunks [c0, c0 + NC): each loaded value serves NH heads (measured,
// float32, 6 layers: 16 heads over 8k tokens 21.5-24.8 ms with a head at a time, 16.4-18.7 tiled;
// 64 heads over 2k tokens 21.9-22.4, 16.2-17.5).
template <int NH, int NC>
inline void mla_values_ps(const float* kvf, int64_t Wp, const float* p, int64_t block_size, int64_t nt, int64_t C,
                          int64_t h0, int64_t c0, const float* correction, float* a) {
  __mmask16 mask[NC];
  __m512 acc[NH][NC];
  for (int c = 0; c < NC; ++c) {
    int64_t left = C - 16 * (c0 + c);
    mask[c] = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    for (int h = 0; h < NH; ++h)
      acc[h][c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask[c], a + (h0 + h) * C + 16 * (c0 + c)),
                                _mm512_set1_ps(correction[h0 + h]));
  }
  for (int64_t j = 0; j < nt; ++j) {
    __m512 kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = _mm512_maskz_loadu_ps(mask[c], kvf + j * Wp + 16 * (c0 + c));
    for (int h = 0; h < NH; ++h) {
      __m512 w = _mm512_set1_ps(p[(h0 + h) * block_size + j]);
      for (int c = 0; c < NC; ++c) acc[h][c] = _mm512_fmadd_ps(w, kv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(a + (h0 + h) * C + 16 * (c0 + c), mask[c], acc[h][c]);
}

#ifdef __AVX512BF16__
// The bf16 path (bf16 queries and cache, C + R even): vdpbf16ps makes 32 products an instruction to
// the float path's 16 and reads the cache as stored. Scores: the lanes are 16 heads; each product
// pair is two consecutive columns of the heads' queries (qp) against the token's (one 32-bit
// broadcast), the sum scaled after, in float32, as the reference scales q k^T. Values: each
// token's weight p is rounded to bf16 (as the Triton kernel, mla_decode.py, and HF's attention do
// before p V; mla_decode_ref keeps float32) and paired with the next token's, their latent rows
// interleaved column by column (kvi), so a product pair is p_j v_j[c] + p_j+1 v_j+1[c] in lane c;
// 4 heads x 64 columns of sums stay in registers over a block, as on the float path
// (mla_values_ps: the two keep their own copies of that frame, a shared template measured 7-18%
// slower there). The sums l add the rounded weights. Measured (6 layers of C = 512, R = 64, one
// query, alternating in one process): 16 heads over 16k cached tokens 46 ms on the float path, 22
// here; 64 heads (Kimi K2's) over 4k tokens 40 ms, 13.


// Scores of head vectors [v0, v0 + NV) for tokens [j, j + NJ) of a block (rows: token j at rows + j W).
template <int NV, int NJ>
inline void mla_scores_bh(const uint16_t* qp, const uint16_t* rows, int64_t W, int64_t Hv, int64_t v0, int64_t j,
                          float scale, int64_t block_size, float* s) {
  __m512 d[NV][NJ];
  for (int v = 0; v < NV; ++v)
    for (int t = 0; t < NJ; ++t) d[v][t] = _mm512_setzero_ps();
  for (int64_t u = 0; u < W / 2; ++u) {
    __m512i k[NJ];
    for (int t = 0; t < NJ; ++t) k[t] = bcast32(rows + (j + t) * W + 2 * u);
    for (int v = 0; v < NV; ++v) {
      __m512i q = _mm512_loadu_si512(qp + (u * Hv + v0 + v) * 32);
      for (int t = 0; t < NJ; ++t) d[v][t] = _mm512_dpbf16_ps(d[v][t], as_bh(q), as_bh(k[t]));
    }
  }
  for (int v = 0; v < NV; ++v)
    for (int t = 0; t < NJ; ++t)
      _mm512_storeu_ps(s + ((v0 + v) * block_size + j + t) * 16, _mm512_mul_ps(d[v][t], _mm512_set1_ps(scale)));
}

// a[h, c] = a[h, c] * correction[h] + sum over the block's token pairs, heads [h0, h0 + NH),
// 16-column chunks [c0, c0 + NC).
template <int NH, int NC>
inline void mla_values_bh(const uint16_t* kvi, const uint32_t* pp, int64_t P, int64_t Hp, int64_t C, int64_t Cv, int64_t h0,
                          int64_t c0, const float* correction, float* a) {
  __mmask16 mask[NC];
  __m512 acc[NH][NC];
  for (int c = 0; c < NC; ++c) {
    int64_t left = C - 16 * (c0 + c);
    mask[c] = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    for (int h = 0; h < NH; ++h)
      acc[h][c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask[c], a + (h0 + h) * C + 16 * (c0 + c)),
                                _mm512_set1_ps(correction[h0 + h]));
  }
  for (int64_t u = 0; u < P; ++u) {
    __m512i kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = _mm512_loadu_si512(kvi + ((c0 + c) * P + u) * 32);
    for (int h = 0; h < NH; ++h) {
      __m512i p = _mm512_set1_epi32(int(pp[u * Hp + h0 + h]));
      for (int c = 0; c < NC; ++c) acc[h][c] = _mm512_dpbf16_ps(acc[h][c], as_bh(kv[c]), as_bh(p));
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(a + (h0 + h) * C + 16 * (c0 + c), mask[c], acc[h][c]);
}

// One task of kt_mla_decode on the bf16 path: tokens [t0, t1) of one query (q_latent [H, C], q_rope
// [H, R]) into a [H, C], mt, lt (initialized by the caller).
void mla_task_bh(const uint16_t* q_latent, const uint16_t* q_rope, int64_t H, int64_t C, int64_t R, const uint16_t* kv,
                 int64_t block_size, const int32_t* table, int64_t t0, int64_t t1, float scale, float* a, float* mt,
                 float* lt) {
  const int64_t W = C + R, Hv = (H + 15) / 16, Cv = (C + 15) / 16, Pmax = (block_size + 1) / 2;
  std::vector<uint16_t> qp(size_t(W / 2 * Hv * 32), 0);   // qp[(u Hv + v) 32 + 2 lane + k]: head 16v + lane, column 2u + k
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w)
      qp[size_t((w / 2 * Hv + h / 16) * 32 + 2 * (h % 16) + w % 2)] = w < C ? q_latent[h * C + w] : q_rope[h * R + w - C];
  const int64_t Hp = Hv * 16;
  std::vector<float> s(size_t(Hp * block_size)), correction(static_cast<size_t>(Hp));   // s[(v block_size + j) 16 + lane]
  std::vector<uint32_t> pp(size_t(Hp * Pmax));     // pp[u Hp + h]: head h's bf16 weights of tokens 2u, 2u + 1
  std::vector<uint16_t> kvi(size_t(Pmax * Cv * 32));   // kvi[(cv P + u) 32 + 2 i + k]: column 16 cv + i of token 2u + k
  alignas(64) static const uint16_t interleave[2][32] = {
      {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
      {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};
  const __m512i lo_pairs = _mm512_load_si512(interleave[0]), hi_pairs = _mm512_load_si512(interleave[1]);
  for (int64_t tb = t0; tb < t1;) {
    const int64_t block = table[tb / block_size], slot0 = tb % block_size, nt = std::min(t1 - tb, block_size - slot0);
    const uint16_t* rows = kv + (block * block_size + slot0) * W;
    for (int64_t v0 = 0; v0 < Hv; v0 += 4) {
      auto scores = [&](auto nv) {
        constexpr int NV = decltype(nv)::value;
        int64_t j = 0;
        for (; j + 4 <= nt; j += 4) mla_scores_bh<NV, 4>(qp.data(), rows, W, Hv, v0, j, scale, block_size, s.data());
        for (; j < nt; ++j) mla_scores_bh<NV, 1>(qp.data(), rows, W, Hv, v0, j, scale, block_size, s.data());
      };
      switch (std::min<int64_t>(4, Hv - v0)) {
        case 4: scores(Rows<4>{}); break;
        case 3: scores(Rows<3>{}); break;
        case 2: scores(Rows<2>{}); break;
        default: scores(Rows<1>{}); break;
      }
    }
    const int64_t P = (nt + 1) / 2;
    for (int64_t v = 0; v < Hv; ++v) {   // online softmax, 16 heads at once: the weights rounded to bf16, in pairs
      const float* sv = s.data() + v * 16 * block_size;   // token j at sv + 16 j
      const __mmask16 heads = H - 16 * v >= 16 ? __mmask16(0xffff) : __mmask16((1u << (H - 16 * v)) - 1);
      const __m512 m_old = _mm512_mask_loadu_ps(_mm512_set1_ps(0.0f), heads, mt + 16 * v);
      __m512 mx = m_old;
      for (int64_t j = 0; j < nt; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sv + 16 * j));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t u = 0; u < P; ++u) {
        __m512i p0 = _mm512_cvtepu16_epi32(bh_bits(_mm512_cvtneps_pbh(exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sv + 32 * u), mx)))));
        __m512i p1 = 2 * u + 1 < nt ? _mm512_cvtepu16_epi32(bh_bits(_mm512_cvtneps_pbh(
                                          exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sv + 32 * u + 16), mx)))))
                                    : _mm512_setzero_si512();
        sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(p0, 16)),
                                               _mm512_castsi512_ps(_mm512_slli_epi32(p1, 16))));
        _mm512_storeu_si512(pp.data() + u * Hp + 16 * v, _mm512_or_si512(p0, _mm512_slli_epi32(p1, 16)));
      }
      // exp(m_old - mx), 0 on the first block (m_old = -inf)
      const __m512 corr = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_old, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                              exp_ps(_mm512_sub_ps(m_old, mx)));
      _mm512_mask_storeu_ps(correction.data() + 16 * v, heads, corr);
      _mm512_mask_storeu_ps(lt + 16 * v, heads, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(heads, lt + 16 * v), corr, sum));
      _mm512_mask_storeu_ps(mt + 16 * v, heads, mx);
    }
    for (int64_t u = 0; u < P; ++u) {   // the latent rows of tokens 2u and 2u + 1, interleaved
      const uint16_t* r0 = rows + 2 * u * W;
      const bool two = 2 * u + 1 < nt;
      for (int64_t c = 0; c < C; c += 32) {
        __mmask32 mask = C - c >= 32 ? ~__mmask32(0) : __mmask32((1u << (C - c)) - 1);
        __m512i x0 = _mm512_maskz_loadu_epi16(mask, r0 + c);
        __m512i x1 = two ? _mm512_maskz_loadu_epi16(mask, r0 + W + c) : _mm512_setzero_si512();
        _mm512_storeu_si512(kvi.data() + (c / 16 * P + u) * 32, _mm512_permutex2var_epi16(x0, lo_pairs, x1));
        if (c + 16 < C) _mm512_storeu_si512(kvi.data() + ((c / 16 + 1) * P + u) * 32, _mm512_permutex2var_epi16(x0, hi_pairs, x1));
      }
    }
    for (int64_t c0 = 0; c0 < Cv;) {   // columns outside: 64 of them over the block's pairs (8 KB) stay in L1 for every head
      const int nc = Cv - c0 >= 4 ? 4 : 1;
      for (int64_t h0 = 0; h0 < H;) {
        const int nh = H - h0 >= 4 ? 4 : 1;
        if (nh == 4 && nc == 4) mla_values_bh<4, 4>(kvi.data(), pp.data(), P, Hp, C, Cv, h0, c0, correction.data(), a);
        else if (nh == 4) mla_values_bh<4, 1>(kvi.data(), pp.data(), P, Hp, C, Cv, h0, c0, correction.data(), a);
        else if (nc == 4) mla_values_bh<1, 4>(kvi.data(), pp.data(), P, Hp, C, Cv, h0, c0, correction.data(), a);
        else mla_values_bh<1, 1>(kvi.data(), pp.data(), P, Hp, C, Cv, h0, c0, correction.data(), a);
        h0 += nh;
      }
      c0 += nc;
    }
    tb += nt;
  }
}
#endif
}  // namespace

extern "C" {

void kt_mla_decode(const void* q_latent, const void* q_rope, int q_bf16, int64_t Q, int64_t H, int64_t C, int64_t R,
                   const void* kv, int kv_bf16, int64_t block_size, const int32_t* block_table, int64_t table_stride,
                   const int32_t* seq_lens, float scale, void* out, int out_bf16) {
  const int64_t W = C + R, Wp = (W + 15) / 16 * 16;   // a cached token's width; padded rows
  const int64_t Hv = (H + 15) / 16;                   // 16-head vectors: scores have a lane per head
  const int64_t Cv = (C + 15) / 16;                   // 16-column vectors of the values
  std::vector<int64_t> first(size_t(Q) + 1, 0);      // task index of each query's first split
  int64_t threads = pool().threads();
  for (int64_t i = 0; i < Q; ++i) {
    int64_t n = seq_lens[i], splits = 1;
    if (n > MLA_SPLIT_TOKENS && Q < 2 * threads)
      splits = std::min<int64_t>(2 * threads, (n + MLA_SPLIT_TOKENS - 1) / MLA_SPLIT_TOKENS);
    first[size_t(i) + 1] = first[size_t(i)] + splits;
  }
  const int64_t tasks = first[size_t(Q)];
  std::vector<float> acc(size_t(tasks * H * C)), m(size_t(tasks * H)), l(size_t(tasks * H));
  auto f = [&](int task) {
    int64_t i = std::upper_bound(first.begin(), first.end(), int64_t(task)) - first.begin() - 1;
    int64_t split = task - first[size_t(i)], splits = first[size_t(i) + 1] - first[size_t(i)], n = seq_lens[i];
    int64_t per = (n + splits - 1) / splits, t0 = split * per, t1 = std::min(n, t0 + per);
    float* a = acc.data() + task * H * C;
    float* mt = m.data() + task * H;
    float* lt = l.data() + task * H;
    std::fill(a, a + H * C, 0.0f);
    std::fill(mt, mt + H, -INFINITY);
    std::fill(lt, lt + H, 0.0f);
#ifdef __AVX512BF16__
    if (q_bf16 && kv_bf16 && W % 2 == 0)
      return mla_task_bh(static_cast<const uint16_t*>(q_latent) + i * H * C, static_cast<const uint16_t*>(q_rope) + i * H * R,
                         H, C, R, static_cast<const uint16_t*>(kv), block_size, block_table + i * table_stride, t0, t1,
                         scale, a, mt, lt);
#endif
    // Queries transposed, pre-scaled: qt[(w * Hv + v) * 16 + lane] is head 16v + lane's value w (latent, then rope).
    std::vector<float> qt(size_t(W * Hv * 16), 0.0f), s(size_t(Hv * 16 * block_size)), kvf(size_t(block_size * Wp));
    std::vector<float> p(size_t(H * block_size)), correction(static_cast<size_t>(H));   // p[h block_size + j]: weights
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t c = 0; c < C; ++c) qt[size_t(c * Hv * 16 + h)] = scale * load_act(q_latent, q_bf16, (i * H + h) * C + c);
      for (int64_t r = 0; r < R; ++r) qt[size_t((C + r) * Hv * 16 + h)] = scale * load_act(q_rope, q_bf16, (i * H + h) * R + r);
    }
    for (int64_t tb = t0; tb < t1;) {   // one cache block (or the part of it in [t0, t1)) at a time
      int64_t block = block_table[i * table_stride + tb / block_size], slot0 = tb % block_size;
      int64_t nt = std::min(t1 - tb, block_size - slot0);
      for (int64_t j = 0; j < nt; ++j) kv_row_to_float(kv, kv_bf16, (block * block_size + slot0 + j) * W, W, Wp, kvf.data() + j * Wp);
      for (int64_t v0 = 0; v0 < Hv; v0 += 4) {   // scores: up to 4 head vectors x 4 tokens share each load
        auto scores = [&](auto nv) {
          constexpr int NV = decltype(nv)::value;
          int64_t j = 0;
          for (; j + 4 <= nt; j += 4) mla_scores_ps<NV, 4>(qt.data(), kvf.data(), Wp, W, Hv, v0, j, block_size, s.data());
          for (; j < nt; ++j) mla_scores_ps<NV, 1>(qt.data(), kvf.data(), Wp, W, Hv, v0, j, block_size, s.data());
        };
        switch (std::min<int64_t>(4, Hv - v0)) {
          case 4: scores(Rows<4>{}); break;
          case 3: scores(Rows<3>{}); break;
          case 2: scores(Rows<2>{}); break;
          default: scores(Rows<1>{}); break;
        }
      }
      for (int64_t h = 0; h < H; ++h) {   // online softmax
        const float* sh = s.data() + (h / 16) * 16 * block_size + h % 16;   // token j at sh[16 j]
        float mx = mt[h];
        for (int64_t j = 0; j < nt; ++j) mx = std::max(mx, sh[16 * j]);
        float* ph = p.data() + h * block_size, sum = 0.0f;
        for (int64_t j = 0; j < nt; ++j) sum += (ph[j] = std::exp(sh[16 * j] - mx));
        correction[size_t(h)] = std::exp(mt[h] - mx);   // exp(-inf) = 0 on the first block
        lt[h] = lt[h] * correction[size_t(h)] + sum;
        mt[h] = mx;
      }
      for (int64_t c0 = 0; c0 < Cv;) {   // as on the bf16 path: 64 columns outside, 4 heads inside
        const int nc = Cv - c0 >= 4 ? 4 : 1;
        for (int64_t h0 = 0; h0 < H;) {
          const int nh = H - h0 >= 4 ? 4 : 1;
          if (nh == 4 && nc == 4) mla_values_ps<4, 4>(kvf.data(), Wp, p.data(), block_size, nt, C, h0, c0, correction.data(), a);
          else if (nh == 4) mla_values_ps<4, 1>(kvf.data(), Wp, p.data(), block_size, nt, C, h0, c0, correction.data(), a);
          else if (nc == 4) mla_values_ps<1, 4>(kvf.data(), Wp, p.data(), block_size, nt, C, h0, c0, correction.data(), a);
          else mla_values_ps<1, 1>(kvf.data(), Wp, p.data(), block_size, nt, C, h0, c0, correction.data(), a);
          h0 += nh;
        }
        c0 += nc;
      }
      tb += nt;
    }
  };
  parallel(int(tasks), f);
  for (int64_t i = 0; i < Q; ++i)   // merge the splits of each query
    for (int64_t h = 0; h < H; ++h) {
      int64_t t0 = first[size_t(i)], t1 = first[size_t(i) + 1];
      float mx = -INFINITY, denom = 0.0f;
      for (int64_t t = t0; t < t1; ++t) mx = std::max(mx, m[size_t(t * H + h)]);
      for (int64_t t = t0; t < t1; ++t) {   // each split's weight, its sums rescaled to the common max
        float& weight = m[size_t(t * H + h)];
        weight = l[size_t(t * H + h)] > 0 ? std::exp(weight - mx) : 0.0f;
        denom += l[size_t(t * H + h)] * weight;
      }
      for (int64_t c = 0; c < C; ++c) {
        float v = 0.0f;
        for (int64_t t = t0; t < t1; ++t) v += acc[size_t((t * H + h) * C + c)] * m[size_t(t * H + h)];
        store_act(out, out_bf16, (i * H + h) * C + c, v / denom);
      }
    }
}


// ------------------------------------------------------------------------------------ decode step
// One decode step of the whole model (one new token for each of B sequences) in one call: the
// same kernels in the same order as the model's modules call them through ops.py, each result
// rounded to the activation dtype where the module path rounds it, so the logits and the cache are
// the same bits. What it saves is the Python between the kernels: ~10 ms a step for 6 layers of the
// benchmark model, slowed 3-7x because each weight stream evicts the interpreter's working set.
// The plan (weights per layer, dims) is built once by kimi_engine/cpu_step.py.
struct KtLayer {
  const void *input_norm, *post_norm;            // [D], activation dtype
  const uint16_t* q_a;                           // [Lq, D], or null: q_b is q_proj [H (N + R), D]
  const void* q_a_norm;                          // [Lq]
  const uint16_t *q_b, *kv_a;                    // [H (N + R), Lq], [C + R, D]
  const void* kv_a_norm;                         // [C]
  const uint16_t *kv_b, *o;                      // [H (N + V), C], [D, H V]
  const uint16_t *gate, *up, *down;              // the dense MLP or the shared expert; null: none
  int64_t inter;                                 // its intermediate size
  const uint16_t* router;                        // [E, D]; null: a dense layer
  const float* router_bias;                      // [E] or null
  const int32_t* gu_packed;                      // [E, 2I, D/8]
  const uint16_t* gu_scale;                      // [E, 2I, D/G]
  const int32_t* dn_packed;                      // [E, D, I/8]
  const uint16_t* dn_scale;                      // [E, D, I/G]
};

struct KtModel {
  int64_t layers, D, H, N, R, V, C, Lq, E, K, I, G, n_group, topk_group, vocab;
  int act_bf16, norm_topk;
  float scaling, eps, latent_eps, softmax_scale;
  const KtLayer* layer;
  const void* embed;                             // [vocab, D], activation dtype
  const void* final_norm;                        // [D]
  const uint16_t* lm_head;                       // [vocab, D]
};

namespace {
struct Acts {   // an activation buffer of n values in the activation dtype
  std::vector<float> data;
  bool bf16;
  Acts(int64_t n, bool b) : data(size_t(n)), bf16(b) {}
  void* at(int64_t i) { return reinterpret_cast<char*>(data.data()) + i * (bf16 ? 2 : 4); }
  void* p() { return data.data(); }
};

// Where a step's time goes, when the caller asks (timings != null): seconds added per phase.
enum Phase { kSmallOps, kAttnProj, kHeads, kAttention, kRouter, kExperts, kMlp, kLmHead };
struct PhaseClock {
  double* t;
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  void lap(Phase p) {   // the time since the last lap was phase p's
    if (!t) return;
    auto now = std::chrono::steady_clock::now();
    t[p] += std::chrono::duration<double>(now - last).count();
    last = now;
  }
};

void add_into(Acts& h, Acts& f, int64_t n) {   // h += f, rounded as torch rounds a + b
  for (int64_t i = 0; i < n; ++i) store_act(h.p(), h.bf16, i, load_act(h.p(), h.bf16, i) + load_act(f.p(), f.bf16, i));
}
}  // namespace

// tokens, positions, slots [B]; cos, sin [P, R/2] float32 (the model's tables); kv[l] is layer l's
// pool [blocks, block_size, C + R]; block_table [B, table_stride], seq_lens [B] int32 (with the new
// token); logits [B, vocab] in the activation dtype. timings: null, or 8 doubles to which each
// phase's seconds are added (the order of Phase: small ops, attention projections, head products,
// attention, router, routed experts, MLPs, lm_head).
void kt_decode_step(const KtModel* m, int64_t B, const int64_t* tokens, const int64_t* positions, const int64_t* slots,
                    const float* cos, const float* sin, void* const* kv, int kv_bf16, int64_t block_size,
                    const int32_t* block_table, int64_t table_stride, const int32_t* seq_lens, void* logits,
                    double* timings) {
  PhaseClock clock{timings};
  const bool bf = m->act_bf16;
  const int64_t D = m->D, H = m->H, N = m->N, R = m->R, V = m->V, C = m->C, W = C + R, Q = H * (N + R);
  const size_t es = bf ? 2 : 4;
  Acts h(B * D, bf), xn(B * D, bf), attn(B * D, bf), f(B * D, bf), shared(B * D, bf);
  Acts qa(B * std::max<int64_t>(m->Lq, 1), bf), q(B * Q, bf), q_nope(B * H * N, bf), q_rope(B * H * R, bf);
  Acts kva(B * W, bf), latent(B * C, bf), k_rope(B * R, bf), q_latent(B * H * C, bf), o_latent(B * H * C, bf), o(B * H * V, bf);
  std::vector<float> cs(size_t(B * R / 2)), sn(size_t(B * R / 2)), router_logits(size_t(B * std::max<int64_t>(m->E, 1)));
  std::vector<float> weights(size_t(B * std::max<int64_t>(m->K, 1)));
  std::vector<int32_t> ids(size_t(B * std::max<int64_t>(m->K, 1)));
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(h.at(b * D), static_cast<const char*>(m->embed) + tokens[b] * D * es, size_t(D) * es);
    std::memcpy(cs.data() + b * R / 2, cos + positions[b] * R / 2, sizeof(float) * size_t(R / 2));
    std::memcpy(sn.data() + b * R / 2, sin + positions[b] * R / 2, sizeof(float) * size_t(R / 2));
  }
  for (int64_t l = 0; l < m->layers; ++l) {
    const KtLayer& L = m->layer[l];
    // attention
    kt_rmsnorm(h.p(), bf, B, D, D, L.input_norm, bf, m->eps, xn.p(), bf);
    clock.lap(kSmallOps);
    // q_a (or q_proj) and kv_a read the same input: one job
    linear_bf16_pair(L.q_a ? L.q_a : L.q_b, L.q_a ? m->Lq : Q, L.q_a ? qa.p() : q.p(), L.kv_a, W, kva.p(), xn.p(), bf, B, D, bf);
    clock.lap(kAttnProj);
    if (L.q_a) {
      kt_rmsnorm(qa.p(), bf, B, m->Lq, m->Lq, L.q_a_norm, bf, m->latent_eps, qa.p(), bf);   // row by row: in place is safe
      clock.lap(kSmallOps);
      kt_linear_bf16(qa.p(), bf, B, m->Lq, L.q_b, Q, q.p(), bf);
      clock.lap(kAttnProj);
    }
    kt_rope(q.at(N), bf, B, H, R, Q, N + R, cs.data(), sn.data(), q_rope.p());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hd = 0; hd < H; ++hd) std::memcpy(q_nope.at((b * H + hd) * N), q.at(b * Q + hd * (N + R)), size_t(N) * es);
    kt_rmsnorm(kva.p(), bf, B, C, W, L.kv_a_norm, bf, m->latent_eps, latent.p(), bf);
    kt_rope(kva.at(C), bf, B, 1, R, W, R, cs.data(), sn.data(), k_rope.p());
    for (int64_t b = 0; b < B; ++b) {   // the new token's latent and rope key into its slot
      for (int64_t c = 0; c < C; ++c) store_act(kv[l], kv_bf16, slots[b] * W + c, load_act(latent.p(), bf, b * C + c));
      for (int64_t r = 0; r < R; ++r) store_act(kv[l], kv_bf16, slots[b] * W + C + r, load_act(k_rope.p(), bf, b * R + r));
    }
    clock.lap(kSmallOps);
    kt_heads_bf16(q_nope.p(), bf, B, H, N, L.kv_b, (N + V) * C, C, C, 1, q_latent.p(), bf);
    clock.lap(kHeads);
    kt_mla_decode(q_latent.p(), q_rope.p(), bf, B, H, C, R, kv[l], kv_bf16, block_size, block_table, table_stride, seq_lens,
                  m->softmax_scale, o_latent.p(), bf);
    clock.lap(kAttention);
    kt_heads_bf16(o_latent.p(), bf, B, H, C, L.kv_b + N * C, (N + V) * C, C, V, 0, o.p(), bf);
    clock.lap(kHeads);
    kt_linear_bf16(o.p(), bf, B, H * V, L.o, D, attn.p(), bf);
    clock.lap(kAttnProj);
    add_into(h, attn, B * D);
    // feed-forward
    kt_rmsnorm(h.p(), bf, B, D, D, L.post_norm, bf, m->eps, xn.p(), bf);
    clock.lap(kSmallOps);
    if (L.router) {
      kt_linear_bf16(xn.p(), bf, B, D, L.router, m->E, router_logits.data(), 0);
      kt_route(router_logits.data(), L.router_bias, B, m->E, m->K, m->n_group, m->topk_group, m->norm_topk, m->scaling,
               weights.data(), ids.data());
      clock.lap(kRouter);
      kt_moe_int4(xn.p(), bf, B, D, m->I, m->E, m->G, L.gu_packed, L.gu_scale, L.dn_packed, L.dn_scale, ids.data(),
                  weights.data(), m->K, f.p(), bf);
      clock.lap(kExperts);
      if (L.gate) {
        kt_mlp_bf16(xn.p(), bf, B, D, L.inter, L.gate, L.up, L.down, shared.p(), bf);
        clock.lap(kMlp);
        add_into(f, shared, B * D);
      }
    } else {
      kt_mlp_bf16(xn.p(), bf, B, D, L.inter, L.gate, L.up, L.down, f.p(), bf);
      clock.lap(kMlp);
    }
    add_into(h, f, B * D);
    clock.lap(kSmallOps);
  }
  kt_rmsnorm(h.p(), bf, B, D, D, m->final_norm, bf, m->eps, xn.p(), bf);
  clock.lap(kSmallOps);
  kt_linear_bf16(xn.p(), bf, B, D, m->lm_head, m->vocab, logits, bf);
  clock.lap(kLmHead);
}

}  // extern "C"
