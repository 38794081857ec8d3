// Fused expressive attention for CPU: a flash-attention-shaped forward and backward.
//
//   s_ij = scale * q_i . k_j,   f = s^2/(1+s^2) ("saturating"), s^2 ("squared") or exp(s^2) ("exp_squared")
//   Z_i  = eps + sum_j keep_ij f_ij   (Z_i := 1 when that is 0),   out_i = sum_j keep_ij f_ij v_j / Z_i
//
// Forward: parallel over (batch, head, query block); each task walks the key blocks and
// accumulates acc += f(Q K^T) V and z += rowsum f, dividing once at the end. For "saturating" and
// "squared" there is no running max and no rescaling of the accumulator; only Z (one float per row)
// is saved for backward.
//
// "exp_squared" (softmax of s^2) is flash attention's online softmax applied to x = s^2: a running
// row maximum m of x over the allowed keys (starting at 0, as the reference's clamp does), f taken as
// exp(x - m), acc and z rescaled by exp(m_old - m_new) when m grows, and at the end
// Z = eps exp(-m) + z (the reference's eps compensated by the row constant) and out = acc / Z. The
// slot of Z then holds lse = m + log Z, so that backward recomputes a = exp(x - lse) directly.
//
// Backward (recomputing, one pass): with a = f/Z, D_i = dO_i . O_i,
//   dP = dO V^T,  dS = keep * f'(s) * (dP - D_i) / Z_i * scale   (exp_squared: f'/Z = 2 s a),
//   dQ += dS K,   dK += dS^T Q,   dV += a^T dO.
// Parallel over (batch, key/value head): each task owns its dK/dV rows, and loops over the G
// query heads of its group (GQA) and all query blocks, so no two threads write the same memory.
// When B x Hkv is smaller than the thread count, each (batch, key head) is split further over its
// (query head, query block) items, dealt in a zigzag (causal blocks differ in cost); each split
// writes its own dQ rows and accumulates dK/dV in a private buffer, summed at the end.
//
// Decode schedule (L <= kDecodeMaxRows, e.g. one new token against a KV cache): one task per
// (batch, key/value head, key split) takes the G x L query rows of that key head together (GQA:
// K/V are read once), and the key axis is split when B x Hkv is smaller than the thread count
// (flash-decoding). Each split returns acc = sum f v and z = sum f; for "saturating"/"squared" the
// combine is a plain sum, then one division; for "exp_squared" each split also returns its row
// maximum and the combine rescales the splits to the largest one first.
//
// Block products go to the BLAS sgemm_/dgemm_ that libtorch exports (MKL on x86 wheels); if
// the symbol is absent, a slower at::mm_out path is used. Inputs are float32/float64; bf16/fp16
// are converted to float32 on entry and results cast back (accumulation is always >= fp32).
// Tensors: q (B,H,L,E), k (B,Hkv,S,E), v (B,Hkv,S,Ev), rows may be strided, last dim contiguous;
// mask bool (Bm,Hm,Lm,S) with any strides (broadcast dims of size 1 or stride 0).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

extern "C" {
// Fortran BLAS, column-major. Weak: resolved from libtorch_cpu (MKL) when present.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace {

// Tile sizes (query rows x keys) of the forward and the backward; set_block_sizes is for tuning.
int64_t kQBlock = 64, kKvBlock = 512;
int64_t kBwdQBlock = 128, kBwdKvBlock = 512;
// Forward calls with at most this many query rows use the decode schedule; its key block.
int64_t kDecodeMaxRows = 16, kDecodeKvBlock = 1024;
// Split counts forced by tests (0: chosen from the thread count and the work).
int64_t g_decode_splits = 0, g_bwd_splits = 0;
// Problems below this many multiply-adds per thread run on one thread (no fork/join cost).
constexpr int64_t kMinWorkPerThread = 1 << 18;
// The decode schedule's threshold: a decode step is short, so a smaller piece already pays for the
// fork/join of the threads (a few us on an idle machine).
constexpr int64_t kDecodeMinWorkPerThread = 1 << 16;

// parallel_for grain (in tasks) so that each thread gets at least kMinWorkPerThread.
inline int64_t grain_for(int64_t work_per_task, int64_t min_work = kMinWorkPerThread) {
  return std::max<int64_t>(1, min_work / std::max<int64_t>(1, work_per_task));
}

// How many pieces to cut each of `units` independent tasks into so that every thread works:
// 1 when units >= threads; never more than `max_pieces`, nor so many that a piece falls below
// kMinWorkPerThread multiply-adds (`work` per unit). `forced` > 0 (tests) overrides.
inline int64_t split_count(int64_t units, int64_t work, int64_t max_pieces, int64_t forced,
                           int64_t min_work = kMinWorkPerThread) {
  if (forced > 0) return std::max<int64_t>(1, std::min(forced, max_pieces));
  const int64_t threads = at::get_num_threads();
  if (units >= threads || max_pieces <= 1) return 1;
  const int64_t want = (threads + units - 1) / units;
  const int64_t affordable = std::max<int64_t>(1, work / min_work);
  return std::max<int64_t>(1, std::min({want, max_pieces, affordable}));
}

// Tests set this to exercise the ATen fallback used when libtorch exports no BLAS gemm.
bool g_force_aten_gemm = false;

template <typename T>
at::ScalarType scalar_type_of();
template <>
at::ScalarType scalar_type_of<float>() { return at::kFloat; }
template <>
at::ScalarType scalar_type_of<double>() { return at::kDouble; }

// Row-major C(m x n) = alpha * op(A)(m x k) @ op(B)(k x n) + beta * C.
// A is stored (m x k) with leading dim lda, or (k x m) when ta; likewise B.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Column-major C^T = op(B)^T op(A)^T: hand B first.
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int ildb = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ildc = static_cast<int>(std::max<int64_t>(ldc, 1));
  if (k == 0) {  // BLAS semantics, without relying on it for a degenerate call
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < n; ++c) C[r * ldc + c] = beta == T(0) ? T(0) : beta * C[r * ldc + c];
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ && !g_force_aten_gemm) {
      sgemm_(&tra, &trb, &im, &in, &ik, &alpha, B, &ilda, A, &ildb, &beta, C, &ildc);
      return;
    }
  } else {
    if (dgemm_ && !g_force_aten_gemm) {
      dgemm_(&tra, &trb, &im, &in, &ik, &alpha, B, &ilda, A, &ildb, &beta, C, &ildc);
      return;
    }
  }
  // Fallback: ATen on non-owning views.
  auto opts = at::TensorOptions().dtype(scalar_type_of<T>());
  auto a = ta ? at::from_blob(const_cast<T*>(A), {k, m}, {lda, 1}, opts).t()
              : at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opts);
  auto b = tb ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opts).t()
              : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  c.addmm_(a, b, beta, alpha);
}

// Strides of the 4-D problem (elements).
struct Strides4 {
  int64_t b, h, r;
  explicit Strides4(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), r(t.stride(2)) {}
};

struct MaskView {
  const bool* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, sj = 0;
  MaskView() = default;
  explicit MaskView(const at::Tensor& m) : data(m.data_ptr<bool>()) {
    sb = m.size(0) == 1 ? 0 : m.stride(0);
    sh = m.size(1) == 1 ? 0 : m.stride(1);
    sl = m.size(2) == 1 ? 0 : m.stride(2);
    sj = m.stride(3);
  }
  const bool* row(int64_t b, int64_t h, int64_t i, int64_t j0) const {
    return data ? data + b * sb + h * sh + i * sl + j0 * sj : nullptr;
  }
};

// Number of leading keys of [j0, j0 + n) that row i may see (causal: j <= i, top-left aligned).
inline int64_t causal_count(bool is_causal, int64_t i, int64_t j0, int64_t n) {
  if (!is_causal) return n;
  return std::min(n, std::max<int64_t>(0, i + 1 - j0));
}

// f in place on one score row; returns the row sum. Keys past `cnt` and masked keys give 0.
template <typename T, bool SAT>
inline T f_row(T* s, int64_t n, int64_t cnt, const bool* m, int64_t mj) {
  T sum = 0;
  if (m == nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cnt; ++c) {
      const T x2 = s[c] * s[c];
      const T f = SAT ? x2 / (T(1) + x2) : x2;
      s[c] = f;
      sum += f;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cnt; ++c) {
      const T x2 = s[c] * s[c];
      const T f = m[c * mj] ? (SAT ? x2 / (T(1) + x2) : x2) : T(0);
      s[c] = f;
      sum += f;
    }
  }
  for (int64_t c = cnt; c < n; ++c) s[c] = 0;
  return sum;
}

// Backward on one row: s <- a = f/Z, dp <- dS = f'(s) (dp - D) / Z * scale; masked -> 0.
template <typename T, bool SAT>
inline void grad_row(T* s, T* dp, int64_t n, int64_t cnt, const bool* m, int64_t mj, T D,
                     T inv_z, T scale) {
  const T g = inv_z * scale;
#pragma omp simd
  for (int64_t c = 0; c < cnt; ++c) {
    const T x = s[c], x2 = x * x;
    T f, fp;
    if (SAT) {
      const T r = T(1) / (T(1) + x2);
      f = x2 * r;
      fp = T(2) * x * r * r;
    } else {
      f = x2;
      fp = T(2) * x;
    }
    const bool keep = m == nullptr || m[c * mj];
    s[c] = keep ? f * inv_z : T(0);
    dp[c] = keep ? fp * (dp[c] - D) * g : T(0);
  }
  for (int64_t c = cnt; c < n; ++c) s[c] = dp[c] = 0;
}

// The kernel's weight functions; V below is one of these.
enum Variant : int { kSquared = 0, kSaturating = 1, kExpSquared = 2 };

// The exp_squared row functions below are compiled without -ftrapping-math (GCC's default; clang's
// default is off): with it GCC does not vectorise a loop that selects between computed values, as
// exp's range checks do. Nothing here reads floating-point exception flags; the code of the other
// variants is compiled as before.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// exp(x) in float32 for x <= 88 (x may be -inf), in plain arithmetic that the compiler vectorises
// inside `omp simd` loops (a call to std::exp is not, without -ffast-math): x = n ln2 + r with
// |r| <= ln2/2 (Cody-Waite, ln2 in two parts), exp(r) by its Taylor series to degree 7 (truncation
// < 6e-9; measured max relative error 8e-8 on [-87, 0]), times 2^n put in the exponent bits.
// Below -87, where float32 turns subnormal, it returns 0; NaN stays NaN.
inline float exp_upto88(float x) {
  float xc = x < -87.0f ? -87.0f : x;  // (comparisons that are false for NaN: it passes through)
  xc = xc > 88.0f ? 88.0f : xc;
  const float nm = xc * 1.44269504088896341f + 12582912.0f;  // n + 1.5 * 2^23: n in the low bits
  const float n = nm - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (__builtin_bit_cast(int32_t, nm) - 0x4B400000 + 127) << 23;  // 2^n, n in [-126, 127]
  return x < -87.0f ? 0.0f : p * __builtin_bit_cast(float, bits);
}
inline double exp_upto88(double x) { return std::exp(x); }  // float64: the library's exp

// exp_squared, forward, one score row: s <- exp(s^2 - m') on the allowed keys, 0 elsewhere, where
// m' = max(m, largest allowed s^2 of the row); returns the row sum, sets m <- m' and `alpha` to the
// factor exp(m - m') by which the row's earlier sums must be rescaled.
template <typename T>
T exp_sq_row(T* s, int64_t n, int64_t cnt, const bool* m, int64_t mj, T& row_max, T& alpha) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T mx = row_max;
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < cnt; ++c) {
    const T x2 = s[c] * s[c];
    s[c] = m == nullptr || m[c * mj] ? x2 : kNegInf;  // masked: exp(-inf - m) = 0 below
    mx = s[c] > mx ? s[c] : mx;  // (not std::max: no inlining across the optimize pragma)
  }
  alpha = mx > row_max ? std::exp(row_max - mx) : T(1);
  row_max = mx;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < cnt; ++c) {
    s[c] = exp_upto88(s[c] - mx);
    sum += s[c];
  }
  for (int64_t c = cnt; c < n; ++c) s[c] = 0;
  return sum;
}

// exp_squared, backward, one row: s <- a = exp(s^2 - lse), dp <- dS = 2 s a (dp - D) scale; masked -> 0.
template <typename T>
void exp_sq_grad_row(T* s, T* dp, int64_t n, int64_t cnt, const bool* m, int64_t mj, T D, T lse,
                     T scale) {
  const T g = T(2) * scale;
#pragma omp simd
  for (int64_t c = 0; c < cnt; ++c) {
    const T x = s[c], a = exp_upto88(x * x - lse);  // a masked key's value is overwritten below
    s[c] = a;
    dp[c] = g * x * a * (dp[c] - D);
  }
  if (m != nullptr)
    for (int64_t c = 0; c < cnt; ++c)
      if (!m[c * mj]) s[c] = dp[c] = 0;
  for (int64_t c = cnt; c < n; ++c) s[c] = dp[c] = 0;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// The value the forward saves per row (Z, or lse = m + log Z for exp_squared; see the top) from the
// row's sum z and maximum m; `inv` is set to 1 / Z. Z := 1 when it is 0 (eps = 0, nothing to attend).
template <typename T, int V>
inline T row_normaliser(T z, T m, T eps, T& inv) {
  T zr = V == kExpSquared ? eps * std::exp(-m) + z : eps + z;
  zr = zr > T(0) ? zr : T(1);
  inv = T(1) / zr;
  return V == kExpSquared ? m + std::log(zr) : zr;
}

// One row of a key block's scores -> its weights f, in place (keys past `cnt` and masked ones: 0),
// their sum added to z. exp_squared: f is relative to the running row maximum *m, and z and the
// row's accumulator acc (Ev values) are first rescaled when the maximum grows.
template <typename T, int V>
inline void weights_row(T* s, int64_t n, int64_t cnt, const bool* mrow, int64_t mj, T& z, T* m,
                        T* acc, int64_t Ev) {
  if constexpr (V == kExpSquared) {
    T alpha;
    const T sum = exp_sq_row<T>(s, n, cnt, mrow, mj, *m, alpha);
    if (alpha != T(1)) {
      z *= alpha;
      for (int64_t c = 0; c < Ev; ++c) acc[c] *= alpha;
    }
    z += sum;
  } else {
    z += f_row<T, V == kSaturating>(s, n, cnt, mrow, mj);
  }
}

template <typename T, int V>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MaskView& mv,
                  bool is_causal, T scale, T eps, at::Tensor& out, at::Tensor& z) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3), G = H / Hkv;
  const int64_t QB = kQBlock, KB = kKvBlock;
  const Strides4 sq(q), sk(k), sv(v), so(out);
  const T *qd = q.data_ptr<T>(), *kd = k.data_ptr<T>(), *vd = v.data_ptr<T>();
  T *od = out.data_ptr<T>(), *zd = z.data_ptr<T>();
  const int64_t nqb = (L + QB - 1) / QB;

  const int64_t grain = grain_for(std::min(QB, L) * S * (E + Ev));
  at::parallel_for(0, B * H * nqb, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> sbuf(QB * KB), acc(QB * Ev), zrow(QB), mrow(V == kExpSquared ? QB : 0);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (H * nqb), h = (idx / nqb) % H, i0 = (idx % nqb) * QB;
      const int64_t m = std::min(QB, L - i0), hk = h / G;
      const int64_t kend = is_causal ? std::min(S, i0 + m) : S;
      const T* qb = qd + b * sq.b + h * sq.h + i0 * sq.r;
      const T* kb = kd + b * sk.b + hk * sk.h;
      const T* vb = vd + b * sv.b + hk * sv.h;
      std::fill(acc.begin(), acc.begin() + m * Ev, T(0));
      std::fill(zrow.begin(), zrow.end(), T(0));
      std::fill(mrow.begin(), mrow.end(), T(0));
      for (int64_t j0 = 0; j0 < kend; j0 += KB) {
        const int64_t n = std::min(KB, kend - j0);
        T* s = sbuf.data();
        gemm<T>(false, true, m, n, E, scale, qb, sq.r, kb + j0 * sk.r, sk.r, T(0), s, n);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          weights_row<T, V>(s + r * n, n, causal_count(is_causal, i, j0, n), mv.row(b, h, i, j0),
                            mv.sj, zrow[r], V == kExpSquared ? mrow.data() + r : nullptr, acc.data() + r * Ev, Ev);
        }
        gemm<T>(false, false, m, Ev, n, T(1), s, n, vb + j0 * sv.r, sv.r, T(1), acc.data(), Ev);
      }
      T* ob = od + b * so.b + h * so.h + i0 * so.r;
      T* zb = zd + (b * H + h) * L + i0;
      for (int64_t r = 0; r < m; ++r) {
        T inv;
        zb[r] = row_normaliser<T, V>(zrow[r], V == kExpSquared ? mrow[r] : T(0), eps, inv);
        for (int64_t c = 0; c < Ev; ++c) ob[r * so.r + c] = acc[r * Ev + c] * inv;
      }
    }
  });
}

// Decode schedule: the G x L query rows of a key head at once, the key axis split `ns` ways.
template <typename T, int V>
void decode_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MaskView& mv,
                 bool is_causal, T scale, T eps, at::Tensor& out, at::Tensor& z) {
  constexpr bool EXP = V == kExpSquared;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3), G = H / Hkv;
  const int64_t R = G * L, KB = kDecodeKvBlock;  // rows per task: query row r = (head g, row i)
  const int64_t kend = is_causal ? std::min(S, L) : S;  // causal (top-left): row i sees j <= i < L
  const Strides4 sq(q), sk(k), sv(v), so(out);
  const T *qd = q.data_ptr<T>(), *kd = k.data_ptr<T>(), *vd = v.data_ptr<T>();
  T *od = out.data_ptr<T>(), *zd = z.data_ptr<T>();
  const int64_t ns = split_count(B * Hkv, R * kend * (E + Ev), kend, g_decode_splits, kDecodeMinWorkPerThread);
  const int64_t chunk = (kend + ns - 1) / ns;  // keys per split
  // partial sums of every split: acc (B Hkv ns, R, Ev), z (B Hkv ns, R); exp_squared: row maxima m (same)
  std::vector<T> pacc(ns > 1 ? B * Hkv * ns * R * Ev : 0), pz(ns > 1 ? B * Hkv * ns * R : 0);
  std::vector<T> pm(ns > 1 && EXP ? B * Hkv * ns * R : 0);

  // out, Z of the rows of (b, hk) from their summed acc (R x Ev), z (R) and maxima m (R; exp_squared)
  auto finish = [&](int64_t b, int64_t hk, const T* acc, const T* zs, const T* ms) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hk * G + r / L, i = r % L;
      T inv;
      zd[(b * H + h) * L + i] = row_normaliser<T, V>(zs[r], EXP ? ms[r] : T(0), eps, inv);
      T* o = od + b * so.b + h * so.h + i * so.r;
      for (int64_t c = 0; c < Ev; ++c) o[c] = acc[r * Ev + c] * inv;
    }
  };

  const int64_t grain = grain_for(R * chunk * (E + Ev), kDecodeMinWorkPerThread);
  at::parallel_for(0, B * Hkv * ns, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> qbuf(R * E), sbuf(R * std::min(KB, std::max<int64_t>(chunk, 1)));
    std::vector<T> acc(ns > 1 ? 0 : R * Ev), zrow(ns > 1 ? 0 : R), mrow(ns > 1 || !EXP ? 0 : R);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / ns, sp = idx % ns, b = bh / Hkv, hk = bh % Hkv;
      const int64_t lo = std::min(kend, sp * chunk), hi = std::min(kend, lo + chunk);
      T* a = ns > 1 ? pacc.data() + idx * R * Ev : acc.data();
      T* zs = ns > 1 ? pz.data() + idx * R : zrow.data();
      T* ms = !EXP ? nullptr : ns > 1 ? pm.data() + idx * R : mrow.data();
      std::fill(a, a + R * Ev, T(0));
      std::fill(zs, zs + R, T(0));
      if (EXP) std::fill(ms, ms + R, T(0));
      for (int64_t r = 0; r < R; ++r) {  // pack the group's query rows: (R, E)
        const T* src = qd + b * sq.b + (hk * G + r / L) * sq.h + (r % L) * sq.r;
        std::copy(src, src + E, qbuf.data() + r * E);
      }
      const T* kb = kd + b * sk.b + hk * sk.h;
      const T* vb = vd + b * sv.b + hk * sv.h;
      for (int64_t j0 = lo; j0 < hi; j0 += KB) {
        const int64_t n = std::min(KB, hi - j0);
        T* s = sbuf.data();
        gemm<T>(false, true, R, n, E, scale, qbuf.data(), E, kb + j0 * sk.r, sk.r, T(0), s, n);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t h = hk * G + r / L, i = r % L;
          weights_row<T, V>(s + r * n, n, causal_count(is_causal, i, j0, n), mv.row(b, h, i, j0),
                            mv.sj, zs[r], EXP ? ms + r : nullptr, a + r * Ev, Ev);
        }
        gemm<T>(false, false, R, Ev, n, T(1), s, n, vb + j0 * sv.r, sv.r, T(1), a, Ev);
      }
      if (ns == 1) finish(b, hk, a, zs, ms);
    }
  });
  if (ns == 1) return;
  // combine: a plain sum of the splits' partials (exp_squared: each scaled by exp(m_split - m_row),
  // m_row the largest of the splits' maxima), then one division per row
  at::parallel_for(0, B * Hkv, grain_for(ns * R * (Ev + 1)), [&](int64_t begin, int64_t end) {
    std::vector<T> acc(R * Ev), zs(R), ms(EXP ? R : 0), w(EXP ? ns * R : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const T* pa = pacc.data() + bh * ns * R * Ev;
      const T* pzz = pz.data() + bh * ns * R;
      if constexpr (EXP) {
        const T* pmm = pm.data() + bh * ns * R;
        for (int64_t r = 0; r < R; ++r) {
          ms[r] = pmm[r];
          for (int64_t sp = 1; sp < ns; ++sp) ms[r] = std::max(ms[r], pmm[sp * R + r]);
          for (int64_t sp = 0; sp < ns; ++sp) w[sp * R + r] = std::exp(pmm[sp * R + r] - ms[r]);
        }
        std::fill(acc.begin(), acc.end(), T(0));
        std::fill(zs.begin(), zs.end(), T(0));
        for (int64_t sp = 0; sp < ns; ++sp)
          for (int64_t r = 0; r < R; ++r) {
            const T ws = w[sp * R + r];
            zs[r] += ws * pzz[sp * R + r];
            for (int64_t c = 0; c < Ev; ++c) acc[r * Ev + c] += ws * pa[(sp * R + r) * Ev + c];
          }
      } else {
        std::copy(pa, pa + R * Ev, acc.begin());
        std::copy(pzz, pzz + R, zs.begin());
        for (int64_t sp = 1; sp < ns; ++sp) {
          for (int64_t x = 0; x < R * Ev; ++x) acc[x] += pa[sp * R * Ev + x];
          for (int64_t r = 0; r < R; ++r) zs[r] += pzz[sp * R + r];
        }
      }
      finish(bh / Hkv, bh % Hkv, acc.data(), zs.data(), ms.data());
    }
  });
}

template <typename T, int V>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& z,
                   const MaskView& mv, bool is_causal, T scale, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3), G = H / Hkv;
  const int64_t QB = kBwdQBlock, KB = kBwdKvBlock;
  const Strides4 sq(q), sk(k), sv(v), so(out), sdo(dout), sdq(dq), sdk(dk), sdv(dv);
  const T *qd = q.data_ptr<T>(), *kd = k.data_ptr<T>(), *vd = v.data_ptr<T>();
  const T *od = out.data_ptr<T>(), *dod = dout.data_ptr<T>(), *zd = z.data_ptr<T>();
  T *dqd = dq.data_ptr<T>(), *dkd = dk.data_ptr<T>(), *dvd = dv.data_ptr<T>();

  // items of one (batch, key head): (query head of the group, query block), the query block fastest
  const int64_t nqb = (L + QB - 1) / QB, items = G * nqb;
  const int64_t work = G * L * S * (3 * E + 2 * Ev);  // multiply-adds per (batch, key head)
  const int64_t ns = split_count(B * Hkv, work, items, g_bwd_splits);
  // splits 1.. of each (batch, key head) accumulate dK/dV here (split 0 writes dk/dv itself)
  at::Tensor dk_part, dv_part;
  if (ns > 1) {
    dk_part = at::zeros({B * Hkv * (ns - 1), S, E}, dk.options());
    dv_part = at::zeros({B * Hkv * (ns - 1), S, Ev}, dv.options());
  }

  const int64_t grain = grain_for(work / ns);
  at::parallel_for(0, B * Hkv * ns, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> sbuf(QB * KB), pbuf(QB * KB), Drow(QB);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / ns, sp = idx % ns, b = bh / Hkv, hk = bh % Hkv;
      const T* kb = kd + b * sk.b + hk * sk.h;
      const T* vb = vd + b * sv.b + hk * sv.h;
      // zero-initialised, accumulated with beta = 1
      T* dkb = sp == 0 ? dkd + b * sdk.b + hk * sdk.h : dk_part.data_ptr<T>() + (bh * (ns - 1) + sp - 1) * S * E;
      T* dvb = sp == 0 ? dvd + b * sdv.b + hk * sdv.h : dv_part.data_ptr<T>() + (bh * (ns - 1) + sp - 1) * S * Ev;
      const int64_t ldk = sp == 0 ? sdk.r : E, ldv = sp == 0 ? sdv.r : Ev;
      for (int64_t it = 0; it < items; ++it) {
        // dealt in a zigzag (0 1 .. ns-1 ns-1 .. 1 0 0 1 ..): causal blocks grow in cost along L
        const int64_t round = it / ns, pos = it % ns;
        if ((round % 2 == 0 ? pos : ns - 1 - pos) != sp) continue;
        const int64_t h = hk * G + it / nqb, i0 = (it % nqb) * QB;
        const int64_t m = std::min(QB, L - i0);
        const int64_t kend = is_causal ? std::min(S, i0 + m) : S;
        const T* qb = qd + b * sq.b + h * sq.h + i0 * sq.r;
        const T* dob = dod + b * sdo.b + h * sdo.h + i0 * sdo.r;
        const T* ob = od + b * so.b + h * so.h + i0 * so.r;
        const T* zb = zd + (b * H + h) * L + i0;
        T* dqb = dqd + b * sdq.b + h * sdq.h + i0 * sdq.r;
        for (int64_t r = 0; r < m; ++r) {
          T d = 0;
          for (int64_t c = 0; c < Ev; ++c) d += dob[r * sdo.r + c] * ob[r * so.r + c];
          Drow[r] = d;
        }
        for (int64_t j0 = 0; j0 < kend; j0 += KB) {
          const int64_t n = std::min(KB, kend - j0);
          T *s = sbuf.data(), *p = pbuf.data();
          gemm<T>(false, true, m, n, E, scale, qb, sq.r, kb + j0 * sk.r, sk.r, T(0), s, n);
          gemm<T>(false, true, m, n, Ev, T(1), dob, sdo.r, vb + j0 * sv.r, sv.r, T(0), p, n);
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = i0 + r, cnt = causal_count(is_causal, i, j0, n);
            if constexpr (V == kExpSquared)  // zb holds lse = m + log Z
              exp_sq_grad_row<T>(s + r * n, p + r * n, n, cnt, mv.row(b, h, i, j0), mv.sj, Drow[r], zb[r], scale);
            else
              grad_row<T, V == kSaturating>(s + r * n, p + r * n, n, cnt, mv.row(b, h, i, j0), mv.sj,
                                            Drow[r], T(1) / zb[r], scale);
          }
          // dV[j] += a^T dO ; dK[j] += dS^T Q ; dQ[i] += dS K
          gemm<T>(true, false, n, Ev, m, T(1), s, n, dob, sdo.r, T(1), dvb + j0 * ldv, ldv);
          gemm<T>(true, false, n, E, m, T(1), p, n, qb, sq.r, T(1), dkb + j0 * ldk, ldk);
          gemm<T>(false, false, m, E, n, T(1), p, n, kb + j0 * sk.r, sk.r, T(1), dqb, sdq.r);
        }
      }
    }
  });
  if (ns == 1) return;
  // dK/dV of each (batch, key head) += its splits' private sums; parallel over (batch, key head, row)
  const T *dkp = dk_part.data_ptr<T>(), *dvp = dv_part.data_ptr<T>();
  at::parallel_for(0, B * Hkv * S, grain_for((ns - 1) * (E + Ev)), [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      const int64_t bh = x / S, j = x % S, b = bh / Hkv, hk = bh % Hkv;
      T* dkr = dkd + b * sdk.b + hk * sdk.h + j * sdk.r;
      T* dvr = dvd + b * sdv.b + hk * sdv.h + j * sdv.r;
      for (int64_t sp = 0; sp < ns - 1; ++sp) {
        const T* pk = dkp + ((bh * (ns - 1) + sp) * S + j) * E;
        const T* pv = dvp + ((bh * (ns - 1) + sp) * S + j) * Ev;
        for (int64_t c = 0; c < E; ++c) dkr[c] += pk[c];
        for (int64_t c = 0; c < Ev; ++c) dvr[c] += pv[c];
      }
    }
  });
}

// The BLAS calls read each (rows x E) head slice as a matrix with unit column stride and leading
// dimension stride(-2), which must be >= E: a sequence axis that is expanded (stride 0) or otherwise
// overlapping is not a valid BLAS operand (the BLAS rejects it, or reads wrong rows). Batch and head
// strides may be anything (expanded included): the kernel indexes them itself.
at::Tensor blas_rows(const at::Tensor& t, at::ScalarType ct) {
  auto x = t.to(ct);
  const bool ok = x.stride(-1) == 1 && x.stride(-2) >= std::max<int64_t>(x.size(-1), 1);
  return ok ? x : x.contiguous();
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "ea_cpu: query, key and value must be CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "ea_cpu: expected 4-D q, k, v");
  TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0), "ea_cpu: batch sizes differ");
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "ea_cpu: query heads must be a multiple of key/value heads");
  TORCH_CHECK(q.size(3) == k.size(3) && k.size(2) == v.size(2), "ea_cpu: shape mismatch");
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4, "ea_cpu: mask must be 4-D bool");
    TORCH_CHECK((m.size(0) == 1 || m.size(0) == q.size(0)) &&
                    (m.size(1) == 1 || m.size(1) == q.size(1)) &&
                    (m.size(2) == 1 || m.size(2) == q.size(2)) && m.size(3) == k.size(2),
                "ea_cpu: mask must be (1|B, 1|H, 1|L, S)");
  }
}

Variant variant_code(const std::string& variant) {
  if (variant == "saturating") return kSaturating;
  if (variant == "squared") return kSquared;
  TORCH_CHECK(variant == "exp_squared",
              "ea_cpu: variant must be 'saturating', 'squared' or 'exp_squared', got '", variant, "'");
  return kExpSquared;
}

// Returns (out in q's dtype, z in the compute dtype, shape (B, H, L): Z, or lse = m + log Z for exp_squared).
std::vector<at::Tensor> ea_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                   const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
                                   bool is_causal, double scale, const std::string& variant, double eps) {
  check_inputs(q_in, k_in, v_in, mask);
  const Variant var = variant_code(variant);
  const auto ct = compute_type(q_in);
  auto q = blas_rows(q_in, ct), k = blas_rows(k_in, ct);
  auto v = blas_rows(v_in, ct);
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  auto z = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  MaskView mv = mask.has_value() ? MaskView(*mask) : MaskView();
  const bool decode = q.size(2) <= kDecodeMaxRows;  // a few query rows: split the key axis instead
  AT_DISPATCH_FLOATING_TYPES(ct, "ea_forward", [&] {
    const auto sc = scalar_t(scale), ep = scalar_t(eps);
    if (var == kSaturating)
      (decode ? decode_impl<scalar_t, kSaturating> : forward_impl<scalar_t, kSaturating>)(q, k, v, mv, is_causal, sc, ep, out, z);
    else if (var == kSquared)
      (decode ? decode_impl<scalar_t, kSquared> : forward_impl<scalar_t, kSquared>)(q, k, v, mv, is_causal, sc, ep, out, z);
    else
      (decode ? decode_impl<scalar_t, kExpSquared> : forward_impl<scalar_t, kExpSquared>)(q, k, v, mv, is_causal, sc, ep, out, z);
  });
  return {out.to(q_in.scalar_type()), z};
}

// Returns (dq, dk, dv) in the dtypes of q, k, v.
std::vector<at::Tensor> ea_backward(const at::Tensor& dout_in, const at::Tensor& q_in,
                                    const at::Tensor& k_in, const at::Tensor& v_in,
                                    const at::Tensor& out_in, const at::Tensor& z_in,
                                    const std::optional<at::Tensor>& mask, bool is_causal,
                                    double scale, const std::string& variant) {
  check_inputs(q_in, k_in, v_in, mask);
  const Variant var = variant_code(variant);
  const auto ct = compute_type(q_in);
  auto q = blas_rows(q_in, ct), k = blas_rows(k_in, ct);
  auto v = blas_rows(v_in, ct), out = blas_rows(out_in, ct);
  auto dout = blas_rows(dout_in, ct);
  auto z = z_in.to(ct).contiguous();
  TORCH_CHECK(z.dim() == 3 && z.size(0) == q.size(0) && z.size(1) == q.size(1) &&
                  z.size(2) == q.size(2), "ea_cpu: z must be (B, H, L)");
  TORCH_CHECK(dout.sizes() == out.sizes(), "ea_cpu: grad_out and out shapes differ");
  auto dq = at::zeros(q.sizes(), q.options());
  auto dk = at::zeros(k.sizes(), k.options());
  auto dv = at::zeros(v.sizes(), v.options());
  MaskView mv = mask.has_value() ? MaskView(*mask) : MaskView();
  AT_DISPATCH_FLOATING_TYPES(ct, "ea_backward", [&] {
    const auto sc = scalar_t(scale);
    if (var == kSaturating)
      backward_impl<scalar_t, kSaturating>(dout, q, k, v, out, z, mv, is_causal, sc, dq, dk, dv);
    else if (var == kSquared)
      backward_impl<scalar_t, kSquared>(dout, q, k, v, out, z, mv, is_causal, sc, dq, dk, dv);
    else
      backward_impl<scalar_t, kExpSquared>(dout, q, k, v, out, z, mv, is_causal, sc, dq, dk, dv);
  });
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dv.to(v_in.scalar_type())};
}

void set_block_sizes(int64_t q_block, int64_t kv_block, int64_t bwd_q_block, int64_t bwd_kv_block) {
  TORCH_CHECK(q_block > 0 && kv_block > 0 && bwd_q_block > 0 && bwd_kv_block > 0,
              "block sizes must be positive");
  kQBlock = q_block;
  kKvBlock = kv_block;
  kBwdQBlock = bwd_q_block;
  kBwdKvBlock = bwd_kv_block;
}

void set_force_aten_gemm(bool on) { g_force_aten_gemm = on; }

// Tests: force the decode schedule's key splits and the backward's query splits (0: automatic),
// and the largest query length that uses the decode schedule.
void set_splits(int64_t decode_splits, int64_t bwd_splits, int64_t decode_max_rows) {
  TORCH_CHECK(decode_splits >= 0 && bwd_splits >= 0 && decode_max_rows >= 0,
              "split counts and decode_max_rows must be >= 0");
  g_decode_splits = decode_splits;
  g_bwd_splits = bwd_splits;
  kDecodeMaxRows = decode_max_rows;
}

bool has_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

}  // namespace

void register_linear_helpers(pybind11::module& m);  // linear_cpu.cpp: the linear form's feature helpers

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ea_forward, "fused expressive attention forward -> (out, z)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &ea_backward, "fused expressive attention backward -> (dq, dk, dv)",
        py::call_guard<py::gil_scoped_release>());
  m.def("set_block_sizes", &set_block_sizes, "tile sizes (forward q rows, keys, backward q rows, keys); for tuning");
  m.def("set_splits", &set_splits,
        "force the decode key splits / backward query splits (0: automatic) and the decode row limit (tests)");
  m.def("set_force_aten_gemm", &set_force_aten_gemm, "use the ATen gemm fallback (for tests)");
  m.def("has_blas", &has_blas, "True when the BLAS gemm from libtorch is used for block products");
  register_linear_helpers(m);
}
