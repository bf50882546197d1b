// The big-tensor passes of batch whitening on the CPU (see exoticnorm/whitening_kernel.py).
// x is (N, C, S) contiguous with C = G c: group g of sample n is a c x S block whose rows are
// contiguous. Every pass reads each block once while it is in cache, and does its c x c work as
// rows of length S (loops the compiler vectorizes); sums are taken in T over chunks of kChunk
// values and accumulated in double across chunks.
//
//   moments(x, shift)            -> sum_k (x_k - s) (G, c),  sum_k (x_k - s)(x_k - s)^T (G, c, c)
//   affine(x, A, m, b, y)        -> y = A (x - m) + b per group, into y
//   grad_moments(gy, x, m)       -> sum_k gy_k (G, c),       sum_k gy_k (x_k - m)^T (G, c, c)
//   grad_input(gy, x, P, Q, m, v) -> gx = P gy + Q (x - m) + v per group
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kChunk = 512;

void check_x(const torch::Tensor& x, int64_t c) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), "x must be a contiguous CPU (N, C, S) tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64, "x must be float32 or float64");
  TORCH_CHECK(c >= 1 && x.size(1) % c == 0, "the group size must divide C");
}

void check_small(const torch::Tensor& t, const torch::Tensor& x, std::vector<int64_t> shape, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == x.scalar_type() && t.sizes() == at::IntArrayRef(shape),
              name, " must be contiguous, of x's dtype and shape ", at::IntArrayRef(shape));
}

// Per-thread double accumulators of `width` numbers per group, summed at the end.
struct Accumulators {
  int64_t width, groups;
  std::vector<double> data;
  Accumulators(int64_t groups_, int64_t width_)
      : width(width_), groups(groups_), data(size_t(at::get_num_threads()) * groups_ * width_, 0.0) {}
  double* of(int64_t g) { return data.data() + (int64_t(at::get_thread_num()) * groups + g) * width; }
  torch::Tensor total(at::TensorOptions opt) const {
    auto out = torch::zeros({groups, width}, opt.dtype(torch::kFloat64));
    double* o = out.data_ptr<double>();
    for (size_t t = 0; t < data.size() / size_t(groups * width); ++t)
      for (int64_t i = 0; i < groups * width; ++i) o[i] += data[t * groups * width + i];
    return out;
  }
};

// acc[i] += sum_s a_i[s], and acc[c + i c + j] += sum_s a_i[s] b_j[s] (all j, or j <= i when
// `lower`), over one block's chunk [s0, s1) of rows a_i = A + i S, b_j = B + j S, after
// subtracting shift_i from a and shift_b_j from b.
template <typename T>
void block_sums(const T* A, const T* B, const T* shift_a, const T* shift_b, int64_t c, int64_t S, bool lower,
                double* acc, std::vector<T>& da, std::vector<T>& db) {
  for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
    const int64_t len = std::min(kChunk, S - s0);
    for (int64_t i = 0; i < c; ++i) {
      const T* a = A + i * S + s0;
      const T* b = B + i * S + s0;
      T* pa = da.data() + i * kChunk;
      T* pb = db.data() + i * kChunk;
      const T sa = shift_a ? shift_a[i] : T(0), sb = shift_b ? shift_b[i] : T(0);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t s = 0; s < len; ++s) {
        pa[s] = a[s] - sa;
        pb[s] = b[s] - sb;
        sum += pa[s];
      }
      acc[i] += double(sum);
    }
    for (int64_t i = 0; i < c; ++i) {
      const T* pa = da.data() + i * kChunk;
      const int64_t top = lower ? i + 1 : c;
      int64_t j = 0;
      for (; j + 4 <= top; j += 4) {  // four independent sums: not bound by the adds' latency
        const T* p0 = db.data() + j * kChunk;
        const T* p1 = p0 + kChunk;
        const T* p2 = p1 + kChunk;
        const T* p3 = p2 + kChunk;
        T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t s = 0; s < len; ++s) {
          d0 += pa[s] * p0[s];
          d1 += pa[s] * p1[s];
          d2 += pa[s] * p2[s];
          d3 += pa[s] * p3[s];
        }
        double* out = acc + c + i * c + j;
        out[0] += double(d0), out[1] += double(d1), out[2] += double(d2), out[3] += double(d3);
      }
      for (; j < top; ++j) {
        const T* pb = db.data() + j * kChunk;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t s = 0; s < len; ++s) dot += pa[s] * pb[s];
        acc[c + i * c + j] += double(dot);
      }
    }
  }
}

// Sums over every (n, g) block of x (and y) with block_sums; per group (G, c + c^2) in double.
template <typename T>
torch::Tensor all_block_sums(const torch::Tensor& a, const torch::Tensor& b, const T* shift_a, const T* shift_b,
                             int64_t c, bool lower) {
  const int64_t N = a.size(0), G = a.size(1) / c, S = a.size(2);
  Accumulators acc(G, c + c * c);
  const T* A = a.data_ptr<T>();
  const T* B = b.data_ptr<T>();
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> da(size_t(c) * kChunk), db(size_t(c) * kChunk);  // the chunk's shifted rows
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % G;
      const int64_t o = task * c * S;  // block (n, g) starts at (n G + g) c S
      block_sums<T>(A + o, B + o, shift_a ? shift_a + g * c : nullptr, shift_b ? shift_b + g * c : nullptr, c, S,
                    lower, acc.of(g), da, db);
    }
  });
  return acc.total(a.options());
}

// out_i = sum_j M1_ij (u_j - mu_j) + sum_j M2_ij (w_j - mw_j) + v_i over one block's rows, in
// chunks of kChunk positions whose rows are first shifted into scratch (so that values far
// from zero are centred before they are multiplied, as in A (x - mean)); M2, w optional.
template <typename T>
void block_affine(const T* M1, const T* U, const T* mu, const T* M2, const T* Wx, const T* mw, const T* v, int64_t c,
                  int64_t S, T* out, std::vector<T>& su, std::vector<T>& sw) {
  for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
    const int64_t len = std::min(kChunk, S - s0);
    for (int64_t j = 0; j < c; ++j) {
      const T* u = U + j * S + s0;
      T* pu = su.data() + j * kChunk;
      const T shift_u = mu ? mu[j] : T(0);
#pragma omp simd
      for (int64_t s = 0; s < len; ++s) pu[s] = u[s] - shift_u;
      if (M2) {
        const T* w = Wx + j * S + s0;
        T* pw = sw.data() + j * kChunk;
        const T shift_w = mw ? mw[j] : T(0);
#pragma omp simd
        for (int64_t s = 0; s < len; ++s) pw[s] = w[s] - shift_w;
      }
    }
    for (int64_t i = 0; i < c; ++i) {
      T* o = out + i * S + s0;
      const T vi = v[i];
#pragma omp simd
      for (int64_t s = 0; s < len; ++s) o[s] = vi;
      for (int64_t j = 0; j < c; ++j) {
        const T m = M1[i * c + j];
        const T* pu = su.data() + j * kChunk;
#pragma omp simd
        for (int64_t s = 0; s < len; ++s) o[s] += m * pu[s];
      }
      if (M2) {
        for (int64_t j = 0; j < c; ++j) {
          const T m = M2[i * c + j];
          const T* pw = sw.data() + j * kChunk;
#pragma omp simd
          for (int64_t s = 0; s < len; ++s) o[s] += m * pw[s];
        }
      }
    }
  }
}

// block_affine for a group size C known at compile time: every position's c values (and w's)
// are loaded once and all C outputs are formed in registers, instead of C^2 passes over a row.
template <typename T, int C>
void block_affine_fixed(const T* M1, const T* U, const T* mu, const T* M2, const T* Wx, const T* mw, const T* v,
                        int64_t S, T* __restrict out) {
  T m1[C * C], m2[C * C], vi[C], su[C], sw[C];
  for (int i = 0; i < C * C; ++i) {
    m1[i] = M1[i];
    m2[i] = M2 ? M2[i] : T(0);
  }
  for (int i = 0; i < C; ++i) {
    vi[i] = v[i];
    su[i] = mu ? mu[i] : T(0);
    sw[i] = mw ? mw[i] : T(0);
  }
  if (M2) {
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      T xu[C], xw[C];
#pragma GCC unroll 32
      for (int j = 0; j < C; ++j) {
        xu[j] = U[j * S + s] - su[j];
        xw[j] = Wx[j * S + s] - sw[j];
      }
#pragma GCC unroll 32
      for (int i = 0; i < C; ++i) {
        T acc = vi[i];
#pragma GCC unroll 32
        for (int j = 0; j < C; ++j) acc += m1[i * C + j] * xu[j] + m2[i * C + j] * xw[j];
        out[i * S + s] = acc;
      }
    }
  } else {
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      T xu[C];
#pragma GCC unroll 32
      for (int j = 0; j < C; ++j) xu[j] = U[j * S + s] - su[j];
#pragma GCC unroll 32
      for (int i = 0; i < C; ++i) {
        T acc = vi[i];
#pragma GCC unroll 32
        for (int j = 0; j < C; ++j) acc += m1[i * C + j] * xu[j];
        out[i * S + s] = acc;
      }
    }
  }
}

// The compile-time group sizes (others take the general loops).
#define EXOTICNORM_FIXED_SIZES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(8) X(12) X(16)

template <typename T>
void all_block_affine(const torch::Tensor& u, const torch::Tensor& m1, const torch::Tensor* mu, const torch::Tensor* w,
                      const torch::Tensor* m2, const torch::Tensor* mw, const torch::Tensor& v, int64_t c,
                      torch::Tensor& out) {
  const int64_t N = u.size(0), G = u.size(1) / c, S = u.size(2);
  const T* U = u.data_ptr<T>();
  const T* MU = mu ? mu->data_ptr<T>() : nullptr;
  const T* W = w ? w->data_ptr<T>() : nullptr;
  const T* MW = mw ? mw->data_ptr<T>() : nullptr;
  const T* M1 = m1.data_ptr<T>();
  const T* M2 = m2 ? m2->data_ptr<T>() : nullptr;
  const T* V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> su(size_t(c) * kChunk), sw(M2 ? size_t(c) * kChunk : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % G;
      const int64_t o = task * c * S;
      const T* m1p = M1 + g * c * c;
      const T* m2p = M2 ? M2 + g * c * c : nullptr;
      const T* mup = MU ? MU + g * c : nullptr;
      const T* mwp = MW ? MW + g * c : nullptr;
      const T* wp = W ? W + o : nullptr;
      switch (c) {
#define EXOTICNORM_CASE(K)                                                           \
  case K:                                                                            \
    block_affine_fixed<T, K>(m1p, U + o, mup, m2p, wp, mwp, V + g * c, S, O + o); \
    continue;
        EXOTICNORM_FIXED_SIZES(EXOTICNORM_CASE)
#undef EXOTICNORM_CASE
        default:
          break;
      }
      block_affine<T>(M1 + g * c * c, U + o, MU ? MU + g * c : nullptr, M2 ? M2 + g * c * c : nullptr,
                      W ? W + o : nullptr, MW ? MW + g * c : nullptr, V + g * c, c, S, O + o, su, sw);
    }
  });
}

std::vector<torch::Tensor> split_sums(const torch::Tensor& sums, int64_t c) {
  return {sums.narrow(1, 0, c).contiguous(), sums.narrow(1, c, c * c).reshape({sums.size(0), c, c})};
}

}  // namespace

// (sum of x - s (G, c), sum of (x - s)(x - s)^T (G, c, c)), both float64; shift s (G, c).
std::vector<torch::Tensor> moments(torch::Tensor x, torch::Tensor shift, int64_t c) {
  check_x(x, c);
  check_small(shift, x, {x.size(1) / c, c}, "shift");
  torch::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "whiten_moments", [&] {
    sums = all_block_sums<scalar_t>(x, x, shift.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), c, true);
  });
  auto parts = split_sums(sums, c);
  auto lower = parts[1].tril();
  parts[1] = lower + lower.tril(-1).transpose(1, 2);
  return parts;
}

// y = A (x - mean) + b per group, written into y (a contiguous tensor of x's size and dtype, so
// that the caller can hand out a tensor that is not a view): A (G, c, c), mean and b (G, c).
void affine(torch::Tensor x, torch::Tensor a, torch::Tensor mean, torch::Tensor b, int64_t c, torch::Tensor y) {
  check_x(x, c);
  const int64_t G = x.size(1) / c;
  check_small(a, x, {G, c, c}, "A");
  check_small(mean, x, {G, c}, "mean");
  check_small(b, x, {G, c}, "b");
  TORCH_CHECK(y.is_contiguous() && y.numel() == x.numel() && y.scalar_type() == x.scalar_type(),
              "y must be contiguous, of x's size and dtype");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "whiten_affine", [&] {
    all_block_affine<scalar_t>(x, a, &mean, nullptr, nullptr, nullptr, b, c, y);
  });
}

// (sum of gy (G, c), sum of gy (x - mean)^T (G, c, c)), both float64; mean (G, c).
std::vector<torch::Tensor> grad_moments(torch::Tensor gy, torch::Tensor x, torch::Tensor mean, int64_t c) {
  check_x(x, c);
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.is_contiguous() && gy.scalar_type() == x.scalar_type(),
              "grad must be contiguous, shaped and typed like x");
  check_small(mean, x, {x.size(1) / c, c}, "mean");
  torch::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "whiten_grad_moments", [&] {
    sums = all_block_sums<scalar_t>(gy, x, nullptr, mean.data_ptr<scalar_t>(), c, false);
  });
  return split_sums(sums, c);
}

// gx = P gy + Q (x - mean) + v per group: P, Q (G, c, c), mean and v (G, c).
torch::Tensor grad_input(torch::Tensor gy, torch::Tensor x, torch::Tensor p, torch::Tensor q, torch::Tensor mean,
                         torch::Tensor v, int64_t c) {
  check_x(x, c);
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.is_contiguous() && gy.scalar_type() == x.scalar_type(),
              "grad must be contiguous, shaped and typed like x");
  const int64_t G = x.size(1) / c;
  check_small(p, x, {G, c, c}, "P");
  check_small(q, x, {G, c, c}, "Q");
  check_small(mean, x, {G, c}, "mean");
  check_small(v, x, {G, c}, "v");
  auto gx = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "whiten_grad_input", [&] {
    all_block_affine<scalar_t>(gy, p, nullptr, &x, &q, &mean, v, c, gx);
  });
  return gx;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moments", &moments, "whitening: shifted sums and scatter per channel group");
  m.def("affine", &affine, "whitening: y = A (x - mean) + b per channel group");
  m.def("grad_moments", &grad_moments, "whitening backward: sums of gy and gy (x - mean)^T per group");
  m.def("grad_input", &grad_input, "whitening backward: gx = P gy + Q (x - mean) + v per group");
}
