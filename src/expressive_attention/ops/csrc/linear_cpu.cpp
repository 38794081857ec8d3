// Native helpers of EA-squared's linear form (ops/linear_features.py), built into the fused CPU
// kernel's extension (registered by ea_cpu.cpp's module through register_linear_helpers).
//
// The packed degree-2 features of x (N, n, E), feature-major:
//   phi_t[h, f, i] = w_ab x[h, i, a] x[h, i, b]     for f = (a, b), a <= b, rows of the triangle in order
//   (w = 1 on the diagonal, sqrt 2 off it; F = E (E+1) / 2)
// and the gradient through them, given dphi_t (N, F, n) (what the state's GEMM gives):
//   dx[h, i, a] = 2 dphi_aa x_a + sqrt 2 sum_{b != a} dphi_(min(a,b), max(a,b)) x_b.
// The Python path builds these with E (features) or 2 E (gradient) small torch ops per call, each
// a pass over memory and a trip through the dispatcher; here each is one pass, with the row blocks
// of x and dx held transposed in a small buffer (E x kRowBlock) that stays in the L1/L2 cache.
// Parallel over the N heads (at::parallel_for); the Python binding releases the GIL, so the
// linear form's head-split worker threads run these concurrently.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kRowBlock = 64;  // rows i per block of the gradient (x and dx blocks: 2 x E x 64 values)

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be (N, n, E), got ", x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              name, " must be float32 or float64, got ", x.scalar_type());
}

void check_feature_major(const at::Tensor& t, const at::Tensor& x, const char* name) {
  const int64_t N = x.size(0), n = x.size(1), E = x.size(2);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == N && t.size(1) == E * (E + 1) / 2 && t.size(2) == n, name,
              " must be (N, E(E+1)/2, n) = (", N, ", ", E * (E + 1) / 2, ", ", n, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype");
}

// xt[a * nb + r] = x[h, i0 + r, a] * mul for r < nb
template <typename T>
void load_transposed(const T* xh, int64_t sn, int64_t se, int64_t i0, int64_t nb, int64_t E, T mul, T* xt) {
  for (int64_t r = 0; r < nb; ++r) {
    const T* row = xh + (i0 + r) * sn;
    for (int64_t a = 0; a < E; ++a) xt[a * nb + r] = row[a * se] * mul;
  }
}

template <typename T>
void features_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t N = x.size(0), n = x.size(1), E = x.size(2), F = E * (E + 1) / 2;
  const int64_t sh = x.stride(0), sn = x.stride(1), se = x.stride(2);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T r2 = std::sqrt(T(2));
  at::parallel_for(0, N, 1, [&](int64_t h0, int64_t h1) {
    std::vector<T> xt(E * n), xs(E * n);  // x^T and sqrt2 x^T of one head
    for (int64_t h = h0; h < h1; ++h) {
      load_transposed(xp + h * sh, sn, se, 0, n, E, T(1), xt.data());
      for (int64_t j = 0; j < E * n; ++j) xs[j] = r2 * xt[j];
      T* o = op + h * F * n;
      for (int64_t a = 0; a < E; ++a) {
        const T* xa = xt.data() + a * n;
        const T* sa = xs.data() + a * n;
        for (int64_t i = 0; i < n; ++i) o[i] = xa[i] * xa[i];
        o += n;
        for (int64_t b = a + 1; b < E; ++b, o += n) {
          const T* xb = xt.data() + b * n;
          for (int64_t i = 0; i < n; ++i) o[i] = sa[i] * xb[i];
        }
      }
    }
  });
}

template <typename T>
void feature_grad_impl(const at::Tensor& dphi, const at::Tensor& x, at::Tensor& out) {
  const int64_t N = x.size(0), n = x.size(1), E = x.size(2), F = E * (E + 1) / 2;
  const int64_t sh = x.stride(0), sn = x.stride(1), se = x.stride(2);
  const int64_t oh = out.stride(0), on = out.stride(1), oe = out.stride(2);
  const T* xp = x.data_ptr<T>();
  const T* dp = dphi.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T r2 = std::sqrt(T(2));
  at::parallel_for(0, N, 1, [&](int64_t h0, int64_t h1) {
    std::vector<T> xt(E * kRowBlock), acc(E * kRowBlock);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t i0 = 0; i0 < n; i0 += kRowBlock) {
        const int64_t nb = std::min(kRowBlock, n - i0);
        load_transposed(xp + h * sh, sn, se, i0, nb, E, T(1), xt.data());
        std::fill(acc.begin(), acc.begin() + E * nb, T(0));
        const T* d = dp + h * F * n + i0;  // dphi_t[h, f, i0:]
        for (int64_t a = 0; a < E; ++a) {
          const T* xa = xt.data() + a * nb;
          T* ga = acc.data() + a * nb;
          for (int64_t i = 0; i < nb; ++i) ga[i] += T(2) * d[i] * xa[i];
          d += n;
          for (int64_t b = a + 1; b < E; ++b, d += n) {
            const T* xb = xt.data() + b * nb;
            T* gb = acc.data() + b * nb;
            for (int64_t i = 0; i < nb; ++i) {
              const T p = r2 * d[i];
              ga[i] += p * xb[i];
              gb[i] += p * xa[i];
            }
          }
        }
        T* o = op + h * oh + i0 * on;
        for (int64_t r = 0; r < nb; ++r)
          for (int64_t a = 0; a < E; ++a) o[r * on + a * oe] = acc[a * nb + r];
      }
    }
  });
}

// out (N, F, n) contiguous <- phi(x)^T for x (N, n, E) (any strides).
void linear_features(const at::Tensor& x, at::Tensor& out) {
  check_x(x, "x");
  check_feature_major(out, x, "out");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_features", [&] { features_impl<scalar_t>(x, out); });
}

// out (N, n, E) (any strides) <- the gradient w.r.t. x of sum <dphi, phi(x)>, dphi_t (N, F, n) contiguous.
void linear_feature_grad(const at::Tensor& dphi, const at::Tensor& x, at::Tensor& out) {
  check_x(x, "x");
  check_feature_major(dphi, x, "dphi");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "out must have x's shape and dtype, got ", out.sizes());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_feature_grad",
                             [&] { feature_grad_impl<scalar_t>(dphi, x, out); });
}

}  // namespace

void register_linear_helpers(pybind11::module& m) {
  m.def("linear_features", &linear_features, "out (N, F, n) <- packed degree-2 features of x (N, n, E), feature-major",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_feature_grad", &linear_feature_grad,
        "out (N, n, E) <- gradient through the packed features, given dphi (N, F, n)",
        py::call_guard<py::gil_scoped_release>());
}
