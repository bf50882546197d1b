// The big-tensor passes of batch whitening on the CPU (see exoticnorm/whitening_kernel.py).
// x is (N, C, S) contiguous with C = G c: group g of sample n is a c x S block whose rows are
// contiguous. Every pass walks each block in chunks of positions that stay in L1 while small tiles
// of its c x c work run over them with their sums in vector registers (GCC's vector extension);
// sums are taken in T per lane over ~512 positions and accumulated in double after that.
//
//   moments(x, shift)            -> sum_k (x_k - s) (G, c),  sum_k (x_k - s)(x_k - s)^T (G, c, c)
//   affine(x, A, m, b, y)        -> y = A (x - m) + b per group, into y
//   grad_moments(gy, x, m)       -> sum_k gy_k (G, c),       sum_k gy_k (x_k - m)^T (G, c, c)
//   grad_input(gy, x, P, Q, m, v) -> gx = P gy + Q (x - m) + v per group
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <vector>

namespace {

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

// One 256-bit vector of T.
template <typename T>
constexpr int kLanes = 32 / int(sizeof(T));

// A vector of kLanes<T> values (GCC's vector extension: plain loads, FMAs and registers).
// (An alias template would drop the attribute; a typedef in a specialization keeps it.)
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
static_assert(sizeof(Vec<float>) == 32 && sizeof(Vec<double>) == 32, "a vector is 256 bits");

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// acc[(r RJ + q) L + l] += (a_r[s] - sa_r)(b_q[s] - sb_q) for s = l, l + L, ... < len: a tile of RI
// rows of a against RJ rows of b (rows S apart), one partial sum per lane, kept in registers.
template <typename T, int RI, int RJ>
inline void tile_sums(const T* __restrict A, const T* __restrict B, int64_t S, int64_t len, const T* sa, const T* sb,
                      T* __restrict acc) {
  constexpr int L = kLanes<T>;
  Vec<T> v[RI][RJ], ta[RI], tb[RJ];
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r) {
    ta[r] = Vec<T>{} + (sa ? sa[r] : T(0));
#pragma GCC unroll 4
    for (int q = 0; q < RJ; ++q) v[r][q] = load(acc + (r * RJ + q) * L);
  }
#pragma GCC unroll 4
  for (int q = 0; q < RJ; ++q) tb[q] = Vec<T>{} + (sb ? sb[q] : T(0));
  for (int64_t s = 0; s < len; s += L) {
    Vec<T> a[RI], b[RJ];
#pragma GCC unroll 4
    for (int r = 0; r < RI; ++r) a[r] = load(A + r * S + s) - ta[r];
#pragma GCC unroll 4
    for (int q = 0; q < RJ; ++q) b[q] = load(B + q * S + s) - tb[q];
#pragma GCC unroll 4
    for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
      for (int q = 0; q < RJ; ++q) v[r][q] += a[r] * b[q];
  }
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < RJ; ++q) std::memcpy(acc + (r * RJ + q) * L, &v[r][q], sizeof(Vec<T>));
}

template <typename T, int RI>
inline void tile_sums_rj(int rj, const T* A, const T* B, int64_t S, int64_t len, const T* sa, const T* sb, T* acc) {
  if (rj == 2) tile_sums<T, RI, 2>(A, B, S, len, sa, sb, acc);
  else tile_sums<T, RI, 1>(A, B, S, len, sa, sb, acc);
}

template <typename T>
inline void tile_sums_any(int ri, int rj, const T* A, const T* B, int64_t S, int64_t len, const T* sa, const T* sb,
                          T* acc) {
  switch (ri) {
    case 4: tile_sums_rj<T, 4>(rj, A, B, S, len, sa, sb, acc); break;
    case 3: tile_sums_rj<T, 3>(rj, A, B, S, len, sa, sb, acc); break;
    case 2: tile_sums_rj<T, 2>(rj, A, B, S, len, sa, sb, acc); break;
    default: tile_sums_rj<T, 1>(rj, A, B, S, len, sa, sb, acc);
  }
}

// Per group (G, c + c^2) in double: sum_k (a_k - sa) and sum_k (a_k - sa)(b_k - sb)^T (all of it, or
// the tiles that hold its lower triangle when `lower`), over every sample and position. Work goes
// to the threads as (group, range of samples); each block is walked in chunks of positions that
// stay in L1 while every 4 x 2 tile of rows passes over them; the lanes' float partial sums go
// to double every 512 positions or so.
template <typename T>
torch::Tensor all_block_sums(const torch::Tensor& a, const torch::Tensor& b, const T* shift_a, const T* shift_b,
                             int64_t c, bool lower) {
  constexpr int L = kLanes<T>;
  constexpr int RI = 4, RJ = 2;
  const int64_t N = a.size(0), C = a.size(1), G = C / c, S = a.size(2);
  const int64_t chunk = std::max<int64_t>(L, (4096 / c) / L * L);  // positions per chunk: ~16 KB of rows
  std::vector<std::array<int64_t, 4>> tiles;  // i0, j0, rows of a, rows of b
  for (int64_t i0 = 0; i0 < c; i0 += RI)
    for (int64_t j0 = 0; j0 < (lower ? std::min(c, i0 + RI) : c); j0 += RJ)
      tiles.push_back({i0, j0, std::min<int64_t>(RI, c - i0), std::min<int64_t>(RJ, c - j0)});
  const int64_t pieces = G >= 2 * at::get_num_threads() ? 1 : std::min<int64_t>(N, 2 * at::get_num_threads());
  Accumulators acc(G, c + c * c);
  const T* A = a.data_ptr<T>();
  const T* B = b.data_ptr<T>();
  at::parallel_for(0, G * pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> part(tiles.size() * RI * RJ * L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / pieces, piece = task % pieces;
      const int64_t n0 = N * piece / pieces, n1 = N * (piece + 1) / pieces;
      const T* sa = shift_a ? shift_a + g * c : nullptr;
      const T* sb = shift_b ? shift_b + g * c : nullptr;
      double* out = acc.of(g);
      std::fill(part.begin(), part.end(), T(0));
      int64_t pending = 0;
      auto flush = [&] {
        for (size_t t = 0; t < tiles.size(); ++t) {
          const auto& tile = tiles[t];
          const T* p = part.data() + t * RI * RJ * L;
          for (int64_t r = 0; r < tile[2]; ++r)
            for (int64_t q = 0; q < tile[3]; ++q) {
              double sum = 0;
              for (int l = 0; l < L; ++l) sum += double(p[(r * tile[3] + q) * L + l]);
              out[c + (tile[0] + r) * c + tile[1] + q] += sum;
            }
        }
        std::fill(part.begin(), part.end(), T(0));
        pending = 0;
      };
      for (int64_t n = n0; n < n1; ++n) {
        const T* An = A + (n * C + g * c) * S;
        const T* Bn = B + (n * C + g * c) * S;
        for (int64_t i = 0; i < c; ++i) {  // the sums of a
          const T* row = An + i * S;
          const T shift = sa ? sa[i] : T(0);
          for (int64_t s0 = 0; s0 < S; s0 += 512) {
            const int64_t s1 = std::min(S, s0 + 512);
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t s = s0; s < s1; ++s) sum += row[s] - shift;
            out[i] += double(sum);
          }
        }
        const int64_t vec = S / L * L;
        for (int64_t s0 = 0; s0 < vec; s0 += chunk) {
          const int64_t len = std::min(chunk, vec - s0);
          for (size_t t = 0; t < tiles.size(); ++t) {
            const auto& tile = tiles[t];
            tile_sums_any<T>(int(tile[2]), int(tile[3]), An + tile[0] * S + s0, Bn + tile[1] * S + s0, S, len,
                             sa ? sa + tile[0] : nullptr, sb ? sb + tile[1] : nullptr,
                             part.data() + t * RI * RJ * L);
          }
          pending += len;
          if (pending >= 512) flush();
        }
        for (int64_t s = vec; s < S; ++s)  // the positions left over after whole vectors
          for (const auto& tile : tiles)
            for (int64_t r = 0; r < tile[2]; ++r)
              for (int64_t q = 0; q < tile[3]; ++q) {
                const int64_t i = tile[0] + r, j = tile[1] + q;
                out[c + i * c + j] += double(An[i * S + s] - (sa ? sa[i] : T(0))) * double(Bn[j * S + s] - (sb ? sb[j] : T(0)));
              }
      }
      flush();
    }
  });
  auto total = acc.total(a.options());
  if (lower) {  // mirror the lower triangle (the tiles on the diagonal also summed a little above it)
    double* t = total.data_ptr<double>();
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < c; ++i)
        for (int64_t j = i + 1; j < c; ++j) t[g * (c + c * c) + c + i * c + j] = t[g * (c + c * c) + c + j * c + i];
  }
  return total;
}

// out_r = v_r + sum_j M1_rj (u_j - mu_j) + sum_j M2_rj (w_j - mw_j) for R rows r of one block, positions
// [0, len): M1, M2 (row stride c), v and out start at the tile's first row, U and Wx at the block's
// (rows S apart). Values are centred before they are multiplied (inputs far from zero lose nothing
// to cancellation); 2 vectors of positions x R rows of sums stay in registers. M2, Wx optional.
template <typename T, int R>
inline void tile_affine(const T* M1, const T* U, const T* mu, const T* M2, const T* Wx, const T* mw, const T* v,
                        int64_t c, int64_t S, int64_t len, T* out) {
  constexpr int L = kLanes<T>;
  int64_t s = 0;
  for (; s + 2 * L <= len; s += 2 * L) {
    Vec<T> acc[R][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Vec<T>{} + v[r];
    for (int64_t j = 0; j < c; ++j) {
      const T m = mu ? mu[j] : T(0);
      const Vec<T> x0 = load(U + j * S + s) - m, x1 = load(U + j * S + s + L) - m;
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const T k = M1[r * c + j];
        acc[r][0] += k * x0;
        acc[r][1] += k * x1;
      }
    }
    if (M2)
      for (int64_t j = 0; j < c; ++j) {
        const T m = mw ? mw[j] : T(0);
        const Vec<T> x0 = load(Wx + j * S + s) - m, x1 = load(Wx + j * S + s + L) - m;
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const T k = M2[r * c + j];
          acc[r][0] += k * x0;
          acc[r][1] += k * x1;
        }
      }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      std::memcpy(out + r * S + s, &acc[r][0], sizeof(Vec<T>));
      std::memcpy(out + r * S + s + L, &acc[r][1], sizeof(Vec<T>));
    }
  }
  for (; s < len; ++s)  // positions left over after pairs of vectors
    for (int r = 0; r < R; ++r) {
      T acc = v[r];
      for (int64_t j = 0; j < c; ++j) acc += M1[r * c + j] * (U[j * S + s] - (mu ? mu[j] : T(0)));
      if (M2)
        for (int64_t j = 0; j < c; ++j) acc += M2[r * c + j] * (Wx[j * S + s] - (mw ? mw[j] : T(0)));
      out[r * S + s] = acc;
    }
}

// tile_affine over every (sample, group) block of u (N, C, S), per group's M1 (G, c, c), mu, M2,
// mw, v (G, c); positions in chunks whose c rows stay in L1 while the row tiles pass over them.
template <typename T>
void all_block_affine(const torch::Tensor& u, const torch::Tensor& m1, const torch::Tensor* mu, const torch::Tensor* w,
                      const torch::Tensor* m2, const torch::Tensor* mw, const torch::Tensor& v, int64_t c,
                      torch::Tensor& out) {
  constexpr int L = kLanes<T>;
  const int64_t N = u.size(0), G = u.size(1) / c, S = u.size(2);
  const int64_t chunk = std::max<int64_t>(2 * L, (4096 / (m2 ? 2 * c : c)) / (2 * L) * (2 * L));
  const T* U = u.data_ptr<T>();
  const T* MU = mu ? mu->data_ptr<T>() : nullptr;
  const T* W = w ? w->data_ptr<T>() : nullptr;
  const T* MW = mw ? mw->data_ptr<T>() : nullptr;
  const T* M1 = m1.data_ptr<T>();
  const T* M2 = m2 ? m2->data_ptr<T>() : nullptr;
  const T* V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % G;
      const int64_t o = task * c * S;
      const T* m1p = M1 + g * c * c;
      const T* m2p = M2 ? M2 + g * c * c : nullptr;
      const T* mup = MU ? MU + g * c : nullptr;
      const T* mwp = MW ? MW + g * c : nullptr;
      for (int64_t s0 = 0; s0 < S; s0 += chunk) {
        const int64_t len = std::min(chunk, S - s0);
        const T* up = U + o + s0;
        const T* wp = W ? W + o + s0 : nullptr;
        for (int64_t i0 = 0; i0 < c; i0 += 4) {
          const T* a = m1p + i0 * c;
          const T* b = m2p ? m2p + i0 * c : nullptr;
          const T* vi = V + g * c + i0;
          T* op = O + o + i0 * S + s0;
          switch (std::min<int64_t>(4, c - i0)) {
            case 4: tile_affine<T, 4>(a, up, mup, b, wp, mwp, vi, c, S, len, op); break;
            case 3: tile_affine<T, 3>(a, up, mup, b, wp, mwp, vi, c, S, len, op); break;
            case 2: tile_affine<T, 2>(a, up, mup, b, wp, mwp, vi, c, S, len, op); break;
            default: tile_affine<T, 1>(a, up, mup, b, wp, mwp, vi, c, S, len, op);
          }
        }
      }
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
  return split_sums(sums, c);
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

// ---- ZCA whitening's training step in one call each way (plain ZCA: W = Sigma_reg^(-1/2) by eigh,
// no sparsification), so that a layer-step costs one Python call forward and one backward instead
// of ~100 small torch ops and an autograd graph. The small c x c map:
//
//   Sigma_reg = (1 - rho) Sigma + (rho m + eps) I, m = tr(Sigma)/c; Sigma_reg = U diag(s^2) U^T
//   (s^2 floored at lambda_max * eps_T as in whitening.py); W = U diag(1/s) U^T; A = gamma o W (row i
//   scaled by gamma_i); b = beta.
// Backward (rho a constant): dW = gamma o dA, dgamma_i = sum_j dA_ij W_ij, dbeta = db,
//   dSigma_reg = U (K o U^T sym(dW) U) U^T with K_ij = -1 / (s_i s_j (s_i + s_j)) (Daleckii-Krein,
//   finite at repeated eigenvalues), dSigma = (1 - rho) dSigma_reg + rho/c tr(dSigma_reg) I.
//
// Up to kSmall channels per group the map runs in double, in plain loops around one eigh call
// (its ~25 ATen ops would cost more than the arithmetic); above, as ATen ops in the input's dtype.
namespace {

using OptTensor = c10::optional<torch::Tensor>;
constexpr int64_t kSmall = 32;

// Batched matrix product of (G, n, k) and (G, k, m); one GEMM when G = 1 (bmm may copy strided operands).
torch::Tensor group_mm(const torch::Tensor& a, const torch::Tensor& b) {
  return a.size(0) == 1 ? at::mm(a[0], b[0]).unsqueeze(0) : at::bmm(a, b);
}

// (C,) -> (G, c), padded with `fill`.
torch::Tensor grouped(const torch::Tensor& v, int64_t groups, int64_t c, double fill) {
  const int64_t pad = groups * c - v.size(0);
  auto p = pad ? at::constant_pad_nd(v, {0, pad}, fill) : v;
  return p.view({groups, c});
}

std::pair<double, double> eps_tiny(at::ScalarType t) {
  if (t == torch::kFloat32) return {std::numeric_limits<float>::epsilon(), std::numeric_limits<float>::min()};
  return {std::numeric_limits<double>::epsilon(), std::numeric_limits<double>::min()};
}

struct Map {
  torch::Tensor w, a, b, u, s;  // W, A, b in the input's dtype; U, s in double (small) or that dtype
};

// The map of the comment above from the biased covariance (G, c, c) and rho (G,), any float dtype;
// the outputs W, A, b in `dtype`.
Map zca_map(const torch::Tensor& cov, const torch::Tensor& rho, double eps, const OptTensor& weight,
            const OptTensor& bias, at::ScalarType dtype) {
  const int64_t G = cov.size(0), c = cov.size(-1);
  const auto [meps, tiny] = eps_tiny(dtype);
  auto gamma = weight ? grouped(*weight, G, c, 1.0) : torch::Tensor();
  auto b = bias ? grouped(*bias, G, c, 0.0).clone() : at::zeros({G, c}, cov.options().dtype(dtype));
  if (c > kSmall) {
    auto cv = cov.to(dtype);
    auto r = rho.to(dtype).view({G, 1, 1});
    auto m = cv.diagonal(0, -2, -1).mean(-1).view({G, 1, 1});
    auto eig = at::linalg_eigh(cv * (1 - r) + (r * m + eps) * at::eye(c, cv.options()));
    auto lam = std::get<0>(eig), u = std::get<1>(eig);
    auto s = at::maximum(lam, lam.narrow(-1, c - 1, 1) * meps).clamp_min(tiny).sqrt();
    auto w = group_mm(u / s.unsqueeze(-2), u.mT());
    return {w, weight ? w * gamma.unsqueeze(-1) : w, b, u, s};
  }
  auto reg = cov.to(torch::kFloat64).clone();
  auto rd = rho.to(torch::kFloat64).contiguous();
  double* R = reg.data_ptr<double>();
  for (int64_t g = 0; g < G; ++g) {
    double* r = R + g * c * c;
    const double p = rd.data_ptr<double>()[g];
    double m = 0;
    for (int64_t i = 0; i < c; ++i) m += r[i * c + i];
    m /= double(c);
    for (int64_t i = 0; i < c * c; ++i) r[i] *= 1 - p;
    for (int64_t i = 0; i < c; ++i) r[i * c + i] += p * m + eps;
  }
  auto eig = at::linalg_eigh(reg);
  auto u = std::get<1>(eig).contiguous();
  auto s = std::get<0>(eig).contiguous();
  auto w = at::empty({G, c, c}, cov.options().dtype(dtype));
  auto a = weight ? at::empty({G, c, c}, w.options()) : w;
  auto gm = weight ? gamma.to(torch::kFloat64).contiguous() : torch::Tensor();
  const double* U = u.data_ptr<double>();
  double* Sv = s.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "zca_map", [&] {
    scalar_t* Wp = w.data_ptr<scalar_t>();
    scalar_t* Ap = a.data_ptr<scalar_t>();
    for (int64_t g = 0; g < G; ++g) {
      double* sg = Sv + g * c;
      const double* ug = U + g * c * c;
      const double top = sg[c - 1];
      for (int64_t k = 0; k < c; ++k) sg[k] = std::sqrt(std::max(std::max(sg[k], top * meps), tiny));
      for (int64_t i = 0; i < c; ++i)
        for (int64_t j = 0; j <= i; ++j) {
          double acc = 0;
          for (int64_t k = 0; k < c; ++k) acc += ug[i * c + k] * ug[j * c + k] / sg[k];
          Wp[(g * c + i) * c + j] = Wp[(g * c + j) * c + i] = scalar_t(acc);
          if (weight) {
            Ap[(g * c + i) * c + j] = scalar_t(acc * gm.data_ptr<double>()[g * c + i]);
            Ap[(g * c + j) * c + i] = scalar_t(acc * gm.data_ptr<double>()[g * c + j]);
          }
        }
    }
  });
  return {w, a, b, u, s};
}

// (dSigma (G, c, c) in the input's dtype, dgamma (G, c) or undefined) from dA (any float dtype).
std::pair<torch::Tensor, torch::Tensor> zca_map_backward(const torch::Tensor& ga, const Map& map,
                                                         const torch::Tensor& rho, const OptTensor& weight,
                                                         bool want_weight, at::ScalarType dtype) {
  const int64_t G = map.w.size(0), c = map.w.size(-1);
  auto gamma = weight ? grouped(*weight, G, c, 1.0) : torch::Tensor();
  if (c > kSmall) {
    auto gat = ga.to(dtype);
    auto gw = weight ? gat * gamma.unsqueeze(-1) : gat;
    torch::Tensor gweight = want_weight ? (gat * map.w).sum(-1) : torch::Tensor();
    auto sym = (gw + gw.mT()) * 0.5;
    auto si = map.s.unsqueeze(-1), sj = map.s.unsqueeze(-2);
    auto k = (si * sj * (si + sj)).reciprocal().neg();
    auto greg = group_mm(group_mm(map.u, group_mm(group_mm(map.u.mT(), sym), map.u) * k), map.u.mT());
    auto r = rho.to(dtype).view({G, 1, 1});
    auto tr = greg.diagonal(0, -2, -1).sum(-1).view({G, 1, 1});
    return {greg * (1 - r) + (r / double(c)) * tr * at::eye(c, greg.options()), gweight};
  }
  auto gad = ga.to(torch::kFloat64).contiguous();
  auto wd = map.w.to(torch::kFloat64).contiguous();
  auto gd = weight ? gamma.to(torch::kFloat64).contiguous() : torch::Tensor();
  auto rd = rho.to(torch::kFloat64).contiguous();
  auto gcov = at::empty({G, c, c}, gad.options());
  auto gweight = want_weight ? at::empty({G, c}, gad.options()) : torch::Tensor();
  std::vector<double> sym(c * c), t1(c * c), t2(c * c);
  for (int64_t g = 0; g < G; ++g) {
    const double* gag = gad.data_ptr<double>() + g * c * c;
    const double* wg = wd.data_ptr<double>() + g * c * c;
    const double* ug = map.u.data_ptr<double>() + g * c * c;
    const double* sg = map.s.data_ptr<double>() + g * c;
    const double* gm = weight ? gd.data_ptr<double>() + g * c : nullptr;
    if (want_weight)
      for (int64_t i = 0; i < c; ++i) {
        double acc = 0;
        for (int64_t j = 0; j < c; ++j) acc += gag[i * c + j] * wg[i * c + j];
        gweight.data_ptr<double>()[g * c + i] = acc;
      }
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < c; ++j)
        sym[i * c + j] = 0.5 * (gag[i * c + j] * (gm ? gm[i] : 1.0) + gag[j * c + i] * (gm ? gm[j] : 1.0));
    // t1 = U^T sym U, then K o t1, then U t1 U^T
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < c; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < c; ++k) acc += sym[i * c + k] * ug[k * c + j];
        t1[i * c + j] = acc;  // (sym U)_ij
      }
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < c; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < c; ++k) acc += ug[k * c + i] * t1[k * c + j];
        t2[i * c + j] = -acc / (sg[i] * sg[j] * (sg[i] + sg[j]));
      }
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < c; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < c; ++k) acc += ug[i * c + k] * t2[k * c + j];
        t1[i * c + j] = acc;  // (U t2)_ij
      }
    double* out = gcov.data_ptr<double>() + g * c * c;
    double tr = 0;
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < c; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < c; ++k) acc += t1[i * c + k] * ug[j * c + k];
        out[i * c + j] = acc;
      }
    for (int64_t i = 0; i < c; ++i) tr += out[i * c + i];
    const double p = rd.data_ptr<double>()[g];
    for (int64_t i = 0; i < c * c; ++i) out[i] *= 1 - p;
    for (int64_t i = 0; i < c; ++i) out[i * c + i] += p / double(c) * tr;
  }
  return {gcov.to(dtype), want_weight ? gweight.to(dtype) : torch::Tensor()};
}

// Ledoit-Wolf's rho (G,) from centred samples (M, G, c) and their covariance (see whitening.py).
torch::Tensor ledoit_wolf(const torch::Tensor& xc, const torch::Tensor& cov) {
  const double M = double(xc.size(0));
  const int64_t c = cov.size(-1);
  auto m = cov.diagonal(0, -2, -1).mean(-1);
  auto fourth = xc.square().sum(-1).square().sum(0);
  auto b2 = (fourth - M * cov.square().sum({-2, -1})) / (M * M);
  auto d2 = (cov - m.view({-1, 1, 1}) * at::eye(c, cov.options())).square().sum({-2, -1});
  const double tiny = eps_tiny(cov.scalar_type()).second;
  auto rho = at::where(d2 > 0, b2.clamp_min(0) / d2.clamp_min(tiny), at::zeros_like(d2));
  return rho.clamp(0.0, 1.0);
}

}  // namespace

// Spatial input x (N, C, *s), groups of c dividing C, fixed shrinkage rho >= 0:
// {y (x's shape, a new tensor), mean (G, c), cov (G, c, c), W, rho (G,), then what backward takes:
//  x as (N, C, S), A, U, s}.
std::vector<torch::Tensor> zca_forward(torch::Tensor x, OptTensor weight, OptTensor bias, int64_t c, double eps,
                                       double shrink) {
  const int64_t N = x.size(0), C = x.size(1), G = C / c;
  auto x3 = x.reshape({N, C, -1}).contiguous();
  check_x(x3, c);
  auto shift = x3[0].mean(-1).view({G, c});
  const double M = double(N * x3.size(2));
  auto cov = at::empty({G, c, c}, x.options().dtype(torch::kFloat64));
  auto mean = at::empty({G, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zca_forward", [&] {
    const scalar_t* sh = shift.data_ptr<scalar_t>();
    auto sums = all_block_sums<scalar_t>(x3, x3, sh, sh, c, true);
    const double* t = sums.data_ptr<double>();
    double* cv = cov.data_ptr<double>();
    scalar_t* mu = mean.data_ptr<scalar_t>();
    for (int64_t g = 0; g < G; ++g) {
      const double* tg = t + g * (c + c * c);
      for (int64_t i = 0; i < c; ++i) mu[g * c + i] = sh[g * c + i] + scalar_t(tg[i] / M);
      for (int64_t i = 0; i < c; ++i)
        for (int64_t j = 0; j < c; ++j) cv[(g * c + i) * c + j] = tg[c + i * c + j] / M - (tg[i] / M) * (tg[j] / M);
    }
  });
  auto rho = at::full({G}, shrink, x.options());
  auto map = zca_map(cov, rho, eps, weight, bias, x.scalar_type());
  auto y = at::empty(x.sizes(), x3.options());
  affine(x3, map.a, mean, map.b, c, y.view(x3.sizes()));
  return {y, mean, cov.to(x.scalar_type()), map.w, rho, x3, map.a, map.u, map.s};
}

// The backward of zca_forward: {dx (x's shape), dgamma (G, c) or undefined, dbeta (G, c) or undefined}.
std::vector<torch::Tensor> zca_backward(torch::Tensor gy, torch::Tensor x3, torch::Tensor mean, torch::Tensor w,
                                        torch::Tensor rho, torch::Tensor a, torch::Tensor u, torch::Tensor s,
                                        OptTensor weight, int64_t c, bool want_weight, bool want_bias) {
  auto gy3 = gy.to(x3.scalar_type()).reshape(x3.sizes()).contiguous();
  const int64_t G = x3.size(1) / c;
  const double M = double(x3.size(0) * x3.size(2));
  auto ga = at::empty({G, c, c}, x3.options().dtype(torch::kFloat64));
  auto gb = at::empty({G, c}, x3.options());
  auto p = at::empty({G, c, c}, x3.options()), q = at::empty({G, c, c}, x3.options());
  auto v = at::empty({G, c}, x3.options());
  AT_DISPATCH_FLOATING_TYPES(x3.scalar_type(), "zca_backward", [&] {
    auto sums = all_block_sums<scalar_t>(gy3, x3, nullptr, mean.data_ptr<scalar_t>(), c, false);
    const double* t = sums.data_ptr<double>();
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t i = 0; i < c; ++i) gb.data_ptr<scalar_t>()[g * c + i] = scalar_t(t[g * (c + c * c) + i]);
      std::memcpy(ga.data_ptr<double>() + g * c * c, t + g * (c + c * c) + c, sizeof(double) * c * c);
    }
  });
  auto back = zca_map_backward(ga, {w, a, torch::Tensor(), u, s}, rho, weight, want_weight, x3.scalar_type());
  auto gcov = back.first.contiguous();
  auto ac = a.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x3.scalar_type(), "zca_backward_maps", [&] {  // P = A^T, Q = (dS + dS^T)/M, v = -A^T db / M
    const scalar_t* A = ac.data_ptr<scalar_t>();
    const scalar_t* D = gcov.data_ptr<scalar_t>();
    const scalar_t* B = gb.data_ptr<scalar_t>();
    scalar_t* P = p.data_ptr<scalar_t>();
    scalar_t* Q = q.data_ptr<scalar_t>();
    scalar_t* V = v.data_ptr<scalar_t>();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t o = g * c * c;
      for (int64_t i = 0; i < c; ++i) {
        double acc = 0;
        for (int64_t j = 0; j < c; ++j) {
          P[o + i * c + j] = A[o + j * c + i];
          Q[o + i * c + j] = scalar_t((double(D[o + i * c + j]) + double(D[o + j * c + i])) / M);
          acc += double(A[o + j * c + i]) * double(B[g * c + j]);
        }
        V[g * c + i] = scalar_t(-acc / M);
      }
    }
  });
  auto gx = grad_input(gy3, x3, p, q, mean, v, c);
  return {gx.view(gy.sizes()), back.second, want_bias ? gb : torch::Tensor()};
}

// (N, C) input in groups of c (the last zero-padded), shrinkage rho >= 0 or Ledoit-Wolf's (shrink < 0):
// {y (N, C), mean (G, c), cov (G, c, c), W, rho (G,), then what backward takes: xc (N, G, c), A, U, s}.
std::vector<torch::Tensor> zca_forward_flat(torch::Tensor x, OptTensor weight, OptTensor bias, int64_t c, double eps,
                                            double shrink) {
  const int64_t N = x.size(0), C = x.size(1), G = (C + c - 1) / c;
  auto xp = G * c > C ? at::constant_pad_nd(x, {0, G * c - C}) : x;
  auto xv = xp.reshape({N, G, c});
  auto mean = xv.mean(0);
  auto xc = xv - mean;
  auto xg = xc.permute({1, 0, 2});  // (G, N, c)
  auto cov = group_mm(xg.transpose(1, 2), xg).div_(double(N));
  auto rho = shrink < 0 ? ledoit_wolf(xc, cov) : at::full({G}, shrink, x.options());
  auto map = zca_map(cov, rho, eps, weight, bias, x.scalar_type());
  torch::Tensor y;
  if (G == 1) {
    y = at::addmm(map.b[0], xc.view({N, c}), map.a[0].t());
  } else {
    y = at::empty({N, C}, x.options());
    y.copy_(at::baddbmm(map.b.unsqueeze(1), xg, map.a.mT()).permute({1, 0, 2}).reshape({N, G * c}).narrow(1, 0, C));
  }
  return {y, mean, cov, map.w, rho, xc, map.a, map.u, map.s};
}

// The backward of zca_forward_flat: {dx (N, C), dgamma (G, c) or undefined, dbeta (G, c) or undefined}.
// Rows: dx = dy A + xc S - (db A) / M with S = (dSigma + dSigma^T) / M.
std::vector<torch::Tensor> zca_backward_flat(torch::Tensor gy, torch::Tensor xc, torch::Tensor w, torch::Tensor rho,
                                             torch::Tensor a, torch::Tensor u, torch::Tensor s, OptTensor weight,
                                             bool want_weight, bool want_bias) {
  const int64_t N = xc.size(0), G = xc.size(1), c = xc.size(2), C = gy.size(1);
  auto g2 = gy.to(xc.scalar_type());
  auto gp = G * c > C ? at::constant_pad_nd(g2, {0, G * c - C}) : g2;
  auto gg = gp.reshape({N, G, c}).permute({1, 0, 2});  // (G, N, c)
  auto xg = xc.permute({1, 0, 2});
  auto gb = gg.sum(1);
  auto ga = group_mm(gg.transpose(1, 2), xg);
  auto back = zca_map_backward(ga, {w, a, torch::Tensor(), u, s}, rho, weight, want_weight, xc.scalar_type());
  const double M = double(N);
  auto sym = (back.first + back.first.mT()).div_(M);
  auto shift = group_mm(gb.unsqueeze(1), a).div_(-M);  // (G, 1, c): -(db A) / M
  torch::Tensor gx;
  if (G == 1) {
    gx = at::addmm(shift[0], gg[0], a[0]).addmm_(xg[0], sym[0]);
  } else {
    gx = at::baddbmm(at::baddbmm(shift, gg, a), xg, sym).permute({1, 0, 2}).reshape({N, G * c});
    gx = G * c > C ? gx.narrow(1, 0, C).contiguous() : gx;
  }
  return {gx, back.second, want_bias ? gb : torch::Tensor()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moments", &moments, "whitening: shifted sums and scatter per channel group");
  m.def("affine", &affine, "whitening: y = A (x - mean) + b per channel group");
  m.def("grad_moments", &grad_moments, "whitening backward: sums of gy and gy (x - mean)^T per group");
  m.def("grad_input", &grad_input, "whitening backward: gx = P gy + Q (x - mean) + v per group");
  m.def("zca_forward", &zca_forward, "ZCA training forward, (N, C, S) input");
  m.def("zca_backward", &zca_backward, "ZCA training backward, (N, C, S) input");
  m.def("zca_forward_flat", &zca_forward_flat, "ZCA training forward, (N, C) input");
  m.def("zca_backward_flat", &zca_backward_flat, "ZCA training backward, (N, C) input");
}
