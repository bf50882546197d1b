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

#include "small_eigh.h"
#include "transpose.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
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

// out += sum_s (row[s] - shift) over S values: float sums over chunks of 512 (vectorized), added to
// out (double) one chunk at a time.
template <typename T>
void add_shifted_sum(const T* row, int64_t S, T shift, double& out) {
  for (int64_t s0 = 0; s0 < S; s0 += 512) {
    const int64_t s1 = std::min(S, s0 + 512);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t s = s0; s < s1; ++s) sum += row[s] - shift;
    out += double(sum);
  }
}

// Multiply-adds below which a pass runs on the calling thread alone (waking the others costs more).
constexpr int64_t kSerialWork = 1 << 16;

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
  const int64_t chunk = std::max<int64_t>(L, (4096 / c) / L * L);  // positions per chunk: c rows of ~4096 values
  std::vector<std::array<int64_t, 4>> tiles;  // i0, j0, rows of a, rows of b
  for (int64_t i0 = 0; i0 < c; i0 += RI)
    for (int64_t j0 = 0; j0 < (lower ? std::min(c, i0 + RI) : c); j0 += RJ)
      tiles.push_back({i0, j0, std::min<int64_t>(RI, c - i0), std::min<int64_t>(RJ, c - j0)});
  const bool small = N * C * c * S < kSerialWork;  // not worth waking the other threads
  const int64_t pieces = small || G >= 2 * at::get_num_threads() ? 1 : std::min<int64_t>(N, 2 * at::get_num_threads());
  Accumulators acc(G, c + c * c);
  const T* A = a.data_ptr<T>();
  const T* B = b.data_ptr<T>();
  at::parallel_for(0, G * pieces, small ? G * pieces : 1, [&](int64_t begin, int64_t end) {
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
          add_shifted_sum(row, S, sa ? sa[i] : T(0), out[i]);
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

// acc[r] += sum_j M_rj (x_j[s, s + 2L) - mu_j) for R rows of M (row stride c), rows x_j S apart.
template <typename T, int R>
inline void add_products(Vec<T> (&acc)[R][2], const T* M, const T* X, const T* mu, int64_t c, int64_t S, int64_t s) {
  constexpr int L = kLanes<T>;
  for (int64_t j = 0; j < c; ++j) {
    const T m = mu ? mu[j] : T(0);
    const Vec<T> x0 = load(X + j * S + s) - m, x1 = load(X + j * S + s + L) - m;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const T k = M[r * c + j];
      acc[r][0] += k * x0;
      acc[r][1] += k * x1;
    }
  }
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
    add_products<T, R>(acc, M1, U, mu, c, S, s);
    if (M2) add_products<T, R>(acc, M2, Wx, mw, c, S, s);
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
  const int64_t grain = std::max<int64_t>(1, kSerialWork / (c * c * S * (m2 ? 2 : 1)));  // blocks per thread, at least
  at::parallel_for(0, N * G, grain, [&](int64_t begin, int64_t end) {
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

// ---- ZCA whitening's training step in one call each way (W = Sigma_reg^(-1/2) by eigh), so that a
// layer-step costs one call forward and one backward (an autograd Function, below) instead of ~100
// small torch ops and an autograd graph. The small c x c map:
//
//   Sigma_reg = (1 - rho) Sigma + (rho m + eps) I, m = tr(Sigma)/c; Sigma_reg = U diag(s^2) U^T
//   (s^2 floored at lambda_max * eps_T as in whitening.py); W = U diag(1/s) U^T; A = gamma o W (row i
//   scaled by gamma_i); b = beta.
// With sparsification (SparseZCANorm, sparsify="whitening") W is then W_s of sparsify_rows.
// Backward (rho a constant): dW = gamma o dA, dgamma_i = sum_j dA_ij W_ij, dbeta = db,
//   dSigma_reg = U (K o U^T sym(dW) U) U^T with K_ij = -1 / (s_i s_j (s_i + s_j)) (Daleckii-Krein,
//   finite at repeated eigenvalues), dSigma = (1 - rho) dSigma_reg + rho/c tr(dSigma_reg) I.
//
// The map's c x c work is plain loops, and its products and eigendecompositions (small_eigh.h) are
// loops up to kSmall channels per group (in double); above, BLAS and LAPACK in the input's dtype.
namespace {

using OptTensor = c10::optional<torch::Tensor>;
constexpr int64_t kSmall = 32;

// Batched matrix product of (G, n, k) and (G, k, m); one GEMM when G = 1 (bmm may copy strided operands).
torch::Tensor group_mm(const torch::Tensor& a, const torch::Tensor& b) {
  return a.size(0) == 1 ? at::mm(a[0], b[0]).unsqueeze(0) : at::bmm(a, b);
}

template <typename S>
constexpr at::ScalarType dtype_of() {
  return c10::CppTypeToScalarType<S>::value;
}

// out = op(a) op(b) for c x c row-major matrices, op a transpose where flagged.
template <typename S>
void matmul(const S* a, bool ta, const S* b, bool tb, S* out, int64_t c) {
  if (c > kSmall) {
    auto opt = at::TensorOptions().dtype(dtype_of<S>());
    auto A = at::from_blob(const_cast<S*>(a), {c, c}, opt), B = at::from_blob(const_cast<S*>(b), {c, c}, opt);
    auto O = at::from_blob(out, {c, c}, opt);
    at::mm_out(O, ta ? A.t() : A, tb ? B.t() : B);
    return;
  }
  S at[kSmall * kSmall], bt[kSmall * kSmall];  // transposed operands, so that the loops run along rows
  if (ta) {
    exoticnorm::transpose_into(a, c, c, at);
    a = at;
  }
  if (tb) {
    exoticnorm::transpose_into(b, c, c, bt);
    b = bt;
  }
  for (int64_t i = 0; i < c; ++i) {  // out_i = sum_k a_ik b_k, k in order: a row of c vectorized
    S* o = out + i * c;
    std::fill(o, o + c, S(0));
    for (int64_t k = 0; k < c; ++k) {
      const S aik = a[i * c + k];
      const S* bk = b + k * c;
      for (int64_t j = 0; j < c; ++j) o[j] += aik * bk[j];
    }
  }
}

// f(begin, end) over groups [0, G): spread over the threads where the groups are small (c <= kSmall:
// plain loops, no ATen op in the workers), else on the calling thread (the products go to BLAS).
template <typename F>
void for_groups(int64_t G, int64_t c, const F& f) {
  if (c <= kSmall && G > 1)
    at::parallel_for(0, G, 1, f);
  else
    f(0, G);
}

// Entry i of group g of a (C,) vector grouped as (G, c) and padded with `fill`.
template <typename T>
inline double grouped_at(const T* v, int64_t C, int64_t g, int64_t c, int64_t i, double fill) {
  const int64_t k = g * c + i;
  return k < C ? double(v[k]) : fill;
}

// gamma or beta as a contiguous tensor of dtype T (or none).
template <typename T>
OptTensor as_dtype(const OptTensor& v) {
  return v ? OptTensor(v->to(dtype_of<T>()).contiguous()) : OptTensor();
}

struct Map {
  torch::Tensor w, a, b, u, s;  // W, A, b in the input's dtype T; U, s in the map's S
  std::vector<torch::Tensor> sparse;  // with sparsification: mask, W o mask, row variances v, Sigma_reg (in S)
};

// Sparsification of W (group g, c x c, in S) to `density` as whitening.py's sparsify: keep the
// diagonal and the k = round(density (c^2 - c)) largest |W_ij| off it (ties at the k-th kept), then
// W_s = diag(v)^(-1/2) (W o mask), v_i = ((W o mask) Sigma_reg (W o mask)^T)_ii: unit variance rows.
template <typename S>
void sparsify_rows(S* w, const S* reg, double density, int64_t c, double tiny, S* mask, S* ws, S* v) {
  const int64_t off = c * c - c;
  const int64_t k = int64_t(std::nearbyint(density * double(off)));  // Python's round(): half to even
  std::vector<S> score(c * c);
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < c; ++j) score[i * c + j] = i == j ? S(-1) : std::abs(w[i * c + j]);
  S threshold = 0;
  if (k > 0 && k < off) {
    std::vector<S> sorted(score);
    std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<S>());
    threshold = sorted[k - 1];
  }
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < c; ++j) {
      const bool keep = i == j || k >= off || (k > 0 && score[i * c + j] >= threshold);
      mask[i * c + j] = keep ? S(1) : S(0);
      ws[i * c + j] = keep ? w[i * c + j] : S(0);
    }
  std::vector<S> wr(c * c);
  matmul<S>(ws, false, reg, false, wr.data(), c);
  for (int64_t i = 0; i < c; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < c; ++j) acc += double(wr[i * c + j]) * double(ws[i * c + j]);
    v[i] = S(acc);
    const double r = 1.0 / std::sqrt(std::max(acc, tiny));
    for (int64_t j = 0; j < c; ++j) w[i * c + j] = S(double(ws[i * c + j]) * r);
  }
}

// s (G, c), u (G, c, c) of reg (G, c, c) by LAPACK (through torch), the groups spread over the threads.
void lapack_eigh(const torch::Tensor& reg, torch::Tensor& s, torch::Tensor& u) {
  const int64_t G = reg.size(0);
  if (G == 1) {
    auto eig = at::linalg_eigh(reg);
    s = std::get<0>(eig).contiguous();
    u = std::get<1>(eig).contiguous();
    return;
  }
  // The workers run in inference mode: nothing here is recorded by autograd (this Function owns the
  // gradient), and writes into the caller's buffers are allowed whether or not the caller is in
  // inference mode. Not the caller's whole thread-local state: that can hold Python objects (saved
  // tensor hooks of torch.utils.checkpoint) whose copy takes the GIL, held by the waiting caller.
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode no_autograd;
    auto eig = at::linalg_eigh(reg.slice(0, begin, end));  // one batched call per thread
    s.slice(0, begin, end).copy_(std::get<0>(eig));
    u.slice(0, begin, end).copy_(std::get<1>(eig));
  });
}

// The map of the comment above, from the biased covariance (G, c, c) (any float dtype) and rho (G,),
// with gamma, beta (C,) of dtype T.
template <typename T, typename S>
Map map_forward(const torch::Tensor& cov, const torch::Tensor& rho, double eps, const OptTensor& weight_,
                const OptTensor& bias_, int64_t C, double density) {
  const OptTensor weight = as_dtype<T>(weight_), bias = as_dtype<T>(bias_);
  const int64_t G = cov.size(0), c = cov.size(-1);
  const double meps = std::numeric_limits<T>::epsilon(), tiny = std::numeric_limits<T>::min();
  torch::Tensor reg = cov.to(dtype_of<S>(), false, true).contiguous();
  auto rd = rho.to(torch::kFloat64).contiguous();
  S* R = reg.data_ptr<S>();
  for (int64_t g = 0; g < G; ++g) {
    S* r = R + g * c * c;
    const double p = rd.data_ptr<double>()[g];
    double m = 0;
    for (int64_t i = 0; i < c; ++i) m += double(r[i * c + i]);
    m /= double(c);
    for (int64_t i = 0; i < c * c; ++i) r[i] = S(double(r[i]) * (1 - p));
    for (int64_t i = 0; i < c; ++i) r[i * c + i] += S(p * m + eps);
  }
  torch::Tensor s = at::empty({G, c}, reg.options()), u = at::empty({G, c, c}, reg.options());
  std::atomic<bool> solved{std::is_same_v<S, double> && c <= exoticnorm::kSmallEigh};
  if (solved)  // small groups: plain loops in double, spread over the threads
    for_groups(G, c, [&](int64_t begin, int64_t end) {
      std::vector<S> work(c * c);
      for (int64_t g = begin; g < end && solved; ++g) {
        std::copy(R + g * c * c, R + (g + 1) * c * c, work.begin());
        if (!exoticnorm::small_eigh<S>(work.data(), c, s.data_ptr<S>() + g * c, u.data_ptr<S>() + g * c * c))
          solved = false;
      }
    });
  if (!solved) lapack_eigh(reg, s, u);  // large groups, or what the loops could not solve (NaN, inf)
  at::TensorOptions topt = cov.options().dtype(dtype_of<T>());
  auto w = at::empty({G, c, c}, topt);
  auto a = weight ? at::empty({G, c, c}, topt) : w;
  auto b = at::empty({G, c}, topt);
  const T* gam = weight ? weight->data_ptr<T>() : nullptr;
  const T* bet = bias ? bias->data_ptr<T>() : nullptr;
  const bool sparse = density < 1.0;
  std::vector<torch::Tensor> kept;
  if (sparse)
    kept = {at::empty({G, c, c}, reg.options()), at::empty({G, c, c}, reg.options()), at::empty({G, c}, reg.options()),
            reg};
  for_groups(G, c, [&](int64_t begin, int64_t end) {
    std::vector<S> tmp(c * c), ws(c * c);
    for (int64_t g = begin; g < end; ++g) {
      S* sg = s.data_ptr<S>() + g * c;
      const S* ug = u.data_ptr<S>() + g * c * c;
      const double top = double(sg[c - 1]);
      for (int64_t k = 0; k < c; ++k) sg[k] = S(std::sqrt(std::max(std::max(double(sg[k]), top * meps), tiny)));
      for (int64_t i = 0; i < c; ++i)
        for (int64_t k = 0; k < c; ++k) tmp[i * c + k] = ug[i * c + k] / sg[k];
      matmul<S>(tmp.data(), false, ug, true, ws.data(), c);  // U diag(1/s) U^T
      for (int64_t i = 0; i < c; ++i)
        for (int64_t j = 0; j < i; ++j) ws[j * c + i] = ws[i * c + j];  // exactly symmetric
      if (sparse)
        sparsify_rows<S>(ws.data(), R + g * c * c, density, c, tiny, kept[0].data_ptr<S>() + g * c * c,
                         kept[1].data_ptr<S>() + g * c * c, kept[2].data_ptr<S>() + g * c);
      T* wg = w.data_ptr<T>() + g * c * c;
      T* ag = a.data_ptr<T>() + g * c * c;
      for (int64_t i = 0; i < c; ++i) {
        const double gi = gam ? grouped_at(gam, C, g, c, i, 1.0) : 1.0;
        for (int64_t j = 0; j < c; ++j) {
          const S v = ws[i * c + j];
          wg[i * c + j] = T(v);
          if (gam) ag[i * c + j] = T(double(v) * gi);
        }
        b.data_ptr<T>()[g * c + i] = T(bet ? grouped_at(bet, C, g, c, i, 0.0) : 0.0);
      }
    }
  });
  return {w, a, b, u, s, kept};
}

// (dSigma (G, c, c), dgamma (G, c) or undefined), both of dtype T, from dA (G, c, c) of any float dtype.
template <typename T, typename S>
std::pair<torch::Tensor, torch::Tensor> map_backward(const torch::Tensor& ga, const Map& map, const torch::Tensor& rho,
                                                     const OptTensor& weight_, bool want_weight, int64_t C) {
  const OptTensor weight = as_dtype<T>(weight_);
  const int64_t G = map.w.size(0), c = map.w.size(-1);
  torch::Tensor gad = ga.to(dtype_of<S>()).contiguous();
  auto rd = rho.to(torch::kFloat64).contiguous();
  auto wc = map.w.contiguous();
  auto gcov = at::empty({G, c, c}, map.w.options());
  auto gweight = want_weight ? at::empty({G, c}, map.w.options()) : torch::Tensor();
  const T* gam = weight ? weight->data_ptr<T>() : nullptr;
  const bool sparse = !map.sparse.empty();
  const double tiny = std::numeric_limits<T>::min();
  for_groups(G, c, [&](int64_t begin, int64_t end) {
    std::vector<S> sym(c * c), t1(c * c), t2(c * c), gw(c * c), extra(sparse ? c * c : 0), dv(c);
    for (int64_t g = begin; g < end; ++g) {
      const S* gag = gad.data_ptr<S>() + g * c * c;
      const T* wg = wc.data_ptr<T>() + g * c * c;
      const S* ug = map.u.data_ptr<S>() + g * c * c;
      const S* sg = map.s.data_ptr<S>() + g * c;
      if (want_weight)
        for (int64_t i = 0; i < c; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < c; ++j) acc += double(gag[i * c + j]) * double(wg[i * c + j]);
          gweight.data_ptr<T>()[g * c + i] = T(acc);
        }
      for (int64_t i = 0; i < c; ++i) {  // dW = gamma o dA
        const S gi = gam ? S(grouped_at(gam, C, g, c, i, 1.0)) : S(1);
        for (int64_t j = 0; j < c; ++j) gw[i * c + j] = gi * gag[i * c + j];
      }
      if (sparse) {  // back through W_s = diag(v)^(-1/2) (W o mask): into dW and the extra dSigma_reg
        const S* mk = map.sparse[0].data_ptr<S>() + g * c * c;
        const S* wsg = map.sparse[1].data_ptr<S>() + g * c * c;
        const S* vg = map.sparse[2].data_ptr<S>() + g * c;
        const S* rg = map.sparse[3].data_ptr<S>() + g * c * c;
        matmul<S>(wsg, false, rg, false, t1.data(), c);  // W_m Sigma_reg
        for (int64_t i = 0; i < c; ++i) {
          const bool clamped = double(vg[i]) < tiny;
          const double r = 1.0 / std::sqrt(std::max(double(vg[i]), tiny));
          double dot = 0;
          for (int64_t j = 0; j < c; ++j) dot += double(gw[i * c + j]) * double(wsg[i * c + j]);
          dv[i] = clamped ? S(0) : S(-0.5 * r * r * r * dot);
          for (int64_t j = 0; j < c; ++j)
            gw[i * c + j] = S((double(gw[i * c + j]) * r + 2 * double(dv[i]) * double(t1[i * c + j])) * double(mk[i * c + j]));
        }
        for (int64_t k = 0; k < c; ++k)
          for (int64_t j = 0; j < c; ++j) t2[k * c + j] = dv[k] * wsg[k * c + j];
        matmul<S>(wsg, true, t2.data(), false, extra.data(), c);  // W_m^T diag(dv) W_m
      }
      for (int64_t i = 0; i < c; ++i)
        for (int64_t j = 0; j < c; ++j) sym[i * c + j] = S(0.5) * (gw[i * c + j] + gw[j * c + i]);
      matmul<S>(ug, true, sym.data(), false, t1.data(), c);  // U^T sym
      matmul<S>(t1.data(), false, ug, false, t2.data(), c);  // U^T sym U
      for (int64_t i = 0; i < c; ++i)
        for (int64_t j = 0; j < c; ++j) t2[i * c + j] /= -(sg[i] * sg[j] * (sg[i] + sg[j]));
      matmul<S>(ug, false, t2.data(), false, t1.data(), c);
      matmul<S>(t1.data(), false, ug, true, t2.data(), c);  // U (K o U^T sym U) U^T
      if (sparse)
        for (int64_t i = 0; i < c * c; ++i) t2[i] += extra[i];
      double tr = 0;
      for (int64_t i = 0; i < c; ++i) tr += double(t2[i * c + i]);
      const double p = rd.data_ptr<double>()[g];
      T* out = gcov.data_ptr<T>() + g * c * c;
      for (int64_t i = 0; i < c; ++i)
        for (int64_t j = 0; j < c; ++j) out[i * c + j] = T(double(t2[i * c + j]) * (1 - p) + (i == j ? p / double(c) * tr : 0.0));
    }
  });
  return {gcov, gweight};
}

Map zca_map(const torch::Tensor& cov, const torch::Tensor& rho, double eps, const OptTensor& weight,
            const OptTensor& bias, at::ScalarType dtype, int64_t C, double density) {
  Map out;
  AT_DISPATCH_FLOATING_TYPES(dtype, "zca_map", [&] {
    out = cov.size(-1) > kSmall ? map_forward<scalar_t, scalar_t>(cov, rho, eps, weight, bias, C, density)
                                : map_forward<scalar_t, double>(cov, rho, eps, weight, bias, C, density);
  });
  return out;
}

std::pair<torch::Tensor, torch::Tensor> zca_map_backward(const torch::Tensor& ga, const Map& map,
                                                         const torch::Tensor& rho, const OptTensor& weight,
                                                         bool want_weight, int64_t C) {
  std::pair<torch::Tensor, torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(map.w.scalar_type(), "zca_map_backward", [&] {
    out = map.w.size(-1) > kSmall ? map_backward<scalar_t, scalar_t>(ga, map, rho, weight, want_weight, C)
                                  : map_backward<scalar_t, double>(ga, map, rho, weight, want_weight, C);
  });
  return out;
}

// Ledoit-Wolf's rho for one group from sum_k |x_k|^4 over its M centred samples (`fourth`) and their
// covariance vg (c x c): min(1, b^2 / d^2), b^2 = (fourth - M |Sigma|_F^2) / M^2, d^2 = |Sigma - m I|_F^2.
template <typename V>
double ledoit_wolf_rho(double fourth, double M, const V* vg, int64_t c, double tiny) {
  double frob = 0, m = 0, d2 = 0;
  for (int64_t i = 0; i < c; ++i) m += double(vg[i * c + i]);
  m /= double(c);
  for (int64_t i = 0; i < c * c; ++i) frob += double(vg[i]) * double(vg[i]);
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < c; ++j) {
      const double d = double(vg[i * c + j]) - (i == j ? m : 0.0);
      d2 += d * d;
    }
  const double b2 = (fourth - M * frob) / (M * M);
  return d2 > 0 ? std::min(1.0, std::max(0.0, b2) / std::max(d2, tiny)) : 0.0;
}

// Ledoit-Wolf's rho (G,) (see whitening.py) from centred samples xc (M, G, c) and their covariance.
torch::Tensor ledoit_wolf(const torch::Tensor& xc, const torch::Tensor& cov) {
  const int64_t M = xc.size(0), G = xc.size(1), c = xc.size(2);
  auto rho = at::empty({G}, cov.options());
  auto xcc = xc.contiguous();
  auto cc = cov.contiguous();
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "ledoit_wolf", [&] {
    const scalar_t* X = xcc.data_ptr<scalar_t>();
    for (int64_t g = 0; g < G; ++g) {
      double fourth = 0;
      for (int64_t n = 0; n < M; ++n) {
        double sq = 0;
        for (int64_t i = 0; i < c; ++i) sq += double(X[(n * G + g) * c + i]) * double(X[(n * G + g) * c + i]);
        fourth += sq * sq;
      }
      rho.data_ptr<scalar_t>()[g] = scalar_t(ledoit_wolf_rho(fourth, double(M), cc.data_ptr<scalar_t>() + g * c * c, c,
                                                             std::numeric_limits<scalar_t>::min()));
    }
  });
  return rho;
}

// The same from rows x3 (1, G c, M) (a sample per position), their mean (G, c) and covariance (G, c, c,
// float64); rho in x3's dtype.
torch::Tensor ledoit_wolf_rows(const torch::Tensor& x3, const torch::Tensor& mean, const torch::Tensor& cov) {
  const int64_t G = mean.size(0), c = mean.size(1), M = x3.size(2);
  auto rho = at::empty({G}, x3.options());
  AT_DISPATCH_FLOATING_TYPES(x3.scalar_type(), "ledoit_wolf_rows", [&] {
    const scalar_t* X = x3.data_ptr<scalar_t>();
    const scalar_t* mu = mean.data_ptr<scalar_t>();
    std::vector<double> sq(M);
    for (int64_t g = 0; g < G; ++g) {
      std::fill(sq.begin(), sq.end(), 0.0);
      for (int64_t i = 0; i < c; ++i) {
        const scalar_t* row = X + (g * c + i) * M;
        const double m = double(mu[g * c + i]);
        for (int64_t k = 0; k < M; ++k) sq[k] += (double(row[k]) - m) * (double(row[k]) - m);
      }
      double fourth = 0;
      for (int64_t k = 0; k < M; ++k) fourth += sq[k] * sq[k];
      rho.data_ptr<scalar_t>()[g] = scalar_t(ledoit_wolf_rho(fourth, double(M), cov.data_ptr<double>() + g * c * c, c,
                                                             std::numeric_limits<scalar_t>::min()));
    }
  });
  return rho;
}

// The mean of each row of x3[0] (C, S) as (G, c): the shift of the moments' sums (a value near the
// data keeps them free of cancellation; the first sample is at hand). A plain loop: torch's mean of a
// (128, 256) float tensor took ~20 us here.
torch::Tensor first_sample_means(const torch::Tensor& x3, int64_t G, int64_t c) {
  auto out = at::empty({G, c}, x3.options());
  const int64_t S = x3.size(2);
  AT_DISPATCH_FLOATING_TYPES(x3.scalar_type(), "first_sample_means", [&] {
    for (int64_t r = 0; r < G * c; ++r) {
      double sum = 0;
      add_shifted_sum(x3.data_ptr<scalar_t>() + r * S, S, scalar_t(0), sum);
      out.data_ptr<scalar_t>()[r] = scalar_t(sum / double(S));
    }
  });
  return out;
}

// (N, C) as rows (1, R, N), one per channel (zero rows from C on: the padding of a short last group),
// so that small groups of (N, C) input run through the spatial passes as one sample of N positions.
torch::Tensor to_rows(const torch::Tensor& x, int64_t R) {
  const int64_t N = x.size(0), C = x.size(1);
  auto out = at::empty({1, R, N}, x.options());
  auto src = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "to_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    exoticnorm::transpose_into(src.data_ptr<scalar_t>(), N, C, o);
    std::fill(o + C * N, o + R * N, scalar_t(0));
  });
  return out;
}

// The first C rows of (1, R, N) as (N, C).
torch::Tensor from_rows(const torch::Tensor& rows, int64_t C) {
  const int64_t N = rows.size(2);
  auto out = at::empty({N, C}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "from_rows",
                             [&] { exoticnorm::transpose_into(rows.data_ptr<scalar_t>(), C, N, out.data_ptr<scalar_t>()); });
  return out;
}

}  // namespace

// x3 (N, C, S) contiguous, groups of c dividing C, shrinkage rho >= 0 or Ledoit-Wolf's (shrink < 0), W
// sparsified to `density` (1: not); gamma and beta have `channels` <= C entries (the rest: padding).
// Returns {y (a new tensor of shape `shape`, x3's size), mean (G, c), cov (G, c, c), W, rho (G,), then what backward takes: x3, A, U, s
// and, when sparsified, its four (Map::sparse)}.
std::vector<torch::Tensor> zca_forward_rows(const torch::Tensor& x3, const OptTensor& weight, const OptTensor& bias,
                                            int64_t c, double eps, double shrink, double density, int64_t channels,
                                            at::IntArrayRef shape) {
  check_x(x3, c);
  const int64_t N = x3.size(0), C = x3.size(1), G = C / c;
  auto shift = first_sample_means(x3, G, c);
  const double M = double(N * x3.size(2));
  auto cov = at::empty({G, c, c}, x3.options().dtype(torch::kFloat64));
  auto mean = at::empty({G, c}, x3.options());
  AT_DISPATCH_FLOATING_TYPES(x3.scalar_type(), "zca_forward", [&] {
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
  auto rho = shrink < 0 ? ledoit_wolf_rows(x3, mean, cov) : at::full({G}, shrink, x3.options());
  auto map = zca_map(cov, rho, eps, weight, bias, x3.scalar_type(), channels, density);
  auto y = at::empty(shape, x3.options());  // not a view: the output may be modified in place
  affine(x3, map.a, mean, map.b, c, y.view(x3.sizes()));
  std::vector<torch::Tensor> out{y, mean, cov.to(x3.scalar_type()), map.w, rho, x3, map.a, map.u, map.s};
  out.insert(out.end(), map.sparse.begin(), map.sparse.end());
  return out;
}

// Spatial input x (N, C, *s), groups of c dividing C, fixed shrinkage: zca_forward_rows, y in x's shape.
std::vector<torch::Tensor> zca_forward(torch::Tensor x, OptTensor weight, OptTensor bias, int64_t c, double eps,
                                       double shrink, double density) {
  return zca_forward_rows(x.reshape({x.size(0), x.size(1), -1}).contiguous(), weight, bias, c, eps, shrink, density,
                          x.size(1), x.sizes());
}

// The backward of zca_forward(_rows): {dx (gy's shape), dgamma (G, c) or undefined, dbeta (G, c) or
// undefined}; gamma has `channels` entries.
std::vector<torch::Tensor> zca_backward(torch::Tensor gy, torch::Tensor x3, torch::Tensor mean, torch::Tensor w,
                                        torch::Tensor rho, torch::Tensor a, torch::Tensor u, torch::Tensor s,
                                        OptTensor weight, int64_t c, bool want_weight, bool want_bias,
                                        std::vector<torch::Tensor> sparse, int64_t channels) {
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
  auto back = zca_map_backward(ga, {w, a, torch::Tensor(), u, s, sparse}, rho, weight, want_weight, channels);
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
// {y (N, C), mean (G, c), cov (G, c, c), W, rho (G,), then what backward takes: xc (N, G, c), A, U, s
// and, when sparsified to `density` < 1, its four}. Groups of up to kSmall channels go as rows through
// zca_forward_rows instead (x saved as rows (1, G c, N)): the passes and their loops replace ~15 small
// ATen ops (pads, permutes, copies, batched GEMMs of c x c), which cost more than the arithmetic there.
std::vector<torch::Tensor> zca_forward_flat(torch::Tensor x, OptTensor weight, OptTensor bias, int64_t c, double eps,
                                            double shrink, double density) {
  const int64_t N = x.size(0), C = x.size(1), G = (C + c - 1) / c;
  if (c <= kSmall) {  // as rows through the spatial passes (x as saved: rows (1, G c, N))
    auto rows = to_rows(x, G * c);
    auto out = zca_forward_rows(rows, weight, bias, c, eps, shrink, density, C, rows.sizes());
    out[0] = from_rows(out[0], C);
    return out;
  }
  auto xp = G * c > C ? at::constant_pad_nd(x, {0, G * c - C}) : x;
  auto xv = xp.reshape({N, G, c});
  auto mean = xv.mean(0);
  auto xc = xv - mean;
  auto xg = xc.permute({1, 0, 2});  // (G, N, c)
  auto cov = group_mm(xg.transpose(1, 2), xg).div_(double(N));
  auto rho = shrink < 0 ? ledoit_wolf(xc, cov) : at::full({G}, shrink, x.options());
  auto map = zca_map(cov, rho, eps, weight, bias, x.scalar_type(), C, density);
  torch::Tensor y;
  if (G == 1) {
    y = at::addmm(map.b[0], xc.view({N, c}), map.a[0].t());
  } else {
    y = at::empty({N, C}, x.options());
    y.copy_(at::baddbmm(map.b.unsqueeze(1), xg, map.a.mT()).permute({1, 0, 2}).reshape({N, G * c}).narrow(1, 0, C));
  }
  std::vector<torch::Tensor> out{y, mean, cov, map.w, rho, xc, map.a, map.u, map.s};
  out.insert(out.end(), map.sparse.begin(), map.sparse.end());
  return out;
}

// The backward of zca_forward_flat: {dx (N, C), dgamma (G, c) or undefined, dbeta (G, c) or undefined}.
// Rows: dx = dy A + xc S - (db A) / M with S = (dSigma + dSigma^T) / M.
std::vector<torch::Tensor> zca_backward_flat(torch::Tensor gy, torch::Tensor xc, torch::Tensor w, torch::Tensor rho,
                                             torch::Tensor a, torch::Tensor u, torch::Tensor s, OptTensor weight,
                                             bool want_weight, bool want_bias, std::vector<torch::Tensor> sparse) {
  const int64_t N = xc.size(0), G = xc.size(1), c = xc.size(2), C = gy.size(1);
  auto g2 = gy.to(xc.scalar_type());
  auto gp = G * c > C ? at::constant_pad_nd(g2, {0, G * c - C}) : g2;
  auto gg = gp.reshape({N, G, c}).permute({1, 0, 2});  // (G, N, c)
  auto xg = xc.permute({1, 0, 2});
  auto gb = gg.sum(1);
  auto ga = group_mm(gg.transpose(1, 2), xg);
  auto back = zca_map_backward(ga, {w, a, torch::Tensor(), u, s, sparse}, rho, weight, want_weight, C);
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

// ---- ZCA's training step as an autograd Function (one call each way, no Python in between) ----

namespace {

// Inputs: x, gamma, beta, then c, eps, shrink, flat, density (see zca_step).
class ZCAStepFunction : public torch::autograd::Function<ZCAStepFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, torch::Tensor x,
                                                OptTensor weight, OptTensor bias, int64_t c, double eps, double shrink,
                                                bool flat, double density) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto out = flat ? zca_forward_flat(x, weight, bias, c, eps, shrink, density)
                    : zca_forward(x, weight, bias, c, eps, shrink, density);
    std::vector<torch::Tensor> saved{out[1], out[3], out[4], weight ? *weight : torch::Tensor()};
    saved.insert(saved.end(), out.begin() + 5, out.end());  // x (or xc), A, U, s, and the sparse four
    ctx->save_for_backward(saved);
    ctx->saved_data["flat"] = flat;
    ctx->saved_data["rows"] = flat && c <= kSmall;  // zca_forward_flat's small groups: x saved as rows
    ctx->saved_data["c"] = c;
    ctx->saved_data["has_weight"] = weight.has_value() && weight->defined();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({out[1], out[2], out[3], out[4]});
    ctx->set_materialize_grads(false);
    return {out[0], out[1], out[2], out[3], out[4]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list result(8);
    const auto& grad = grads[0];
    if (!grad.defined()) return result;  // only y is differentiable
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "exoticnorm whitening norms are not twice differentiable: double backward (create_graph=True, e.g. a "
                "gradient penalty) is not supported; use the norm in eval mode (an affine map) for that part of the loss");
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto saved = ctx->get_saved_variables();
    size_t edge = 1;  // needs_input_grad counts the tensor inputs only: x, then gamma and beta where given
    const bool want_weight = ctx->saved_data["has_weight"].toBool() && ctx->needs_input_grad(edge++);
    const bool want_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(edge);
    OptTensor weight = saved[3].defined() ? OptTensor(saved[3]) : OptTensor();
    std::vector<torch::Tensor> sparse(saved.begin() + 8, saved.end());
    std::vector<torch::Tensor> back;
    const int64_t C = grad.size(1), c = ctx->saved_data["c"].toInt();
    if (ctx->saved_data["rows"].toBool()) {
      back = zca_backward(to_rows(grad.to(saved[4].scalar_type()), saved[4].size(1)), saved[4], saved[0], saved[1],
                          saved[2], saved[5], saved[6], saved[7], weight, c, want_weight, want_bias, sparse, C);
      back[0] = from_rows(back[0], C);
    } else if (ctx->saved_data["flat"].toBool()) {
      back = zca_backward_flat(grad, saved[4], saved[1], saved[2], saved[5], saved[6], saved[7], weight, want_weight,
                               want_bias, sparse);
    } else {
      back = zca_backward(grad, saved[4], saved[0], saved[1], saved[2], saved[5], saved[6], saved[7], weight, c,
                          want_weight, want_bias, sparse, C);
    }
    result[0] = back[0];
    if (want_weight) result[1] = back[1].flatten().narrow(0, 0, C);
    if (want_bias) result[2] = back[2].flatten().narrow(0, 0, C);
    return result;
  }
};

}  // namespace

namespace {

// r <- r + f (b - r) over n entries (torch's lerp_ but for its rounding), b read as double.
template <typename R, typename B>
void lerp_into(R* r, const B* b, int64_t n, double f, double scale = 1.0) {
  for (int64_t i = 0; i < n; ++i) r[i] = R(double(r[i]) + f * (double(b[i]) * scale - double(r[i])));
}

// The running statistics {mean (C,), cov (G, c, c), shrinkage (G,), whitening (G, c, c),
// num_batches_tracked} move toward the batch's {mean (G, c), cov, rho, W} of zca_step's outputs as the
// norm's update_factor and lerp_ do: f = momentum, or 1 / num_batches_tracked (counted first) for a
// cumulative average (momentum < 0); the covariance toward the unbiased M / (M - 1) Sigma. In place,
// with the buffers' version counters bumped (the eval map is cached on them).
void update_running(const std::vector<torch::Tensor>& running, const std::vector<torch::Tensor>& out, double M,
                    double momentum) {
  TORCH_CHECK(running.size() == 5, "running statistics: mean, cov, shrinkage, whitening, num_batches_tracked");
  const auto& nbt = running[4];
  TORCH_CHECK(nbt.numel() == 1 && nbt.device().is_cpu(), "num_batches_tracked must be a CPU scalar");
  const int64_t C = running[0].numel();
  const torch::Tensor batch[4] = {out[1], out[2], out[4], out[3]};  // mean, cov, rho, W
  for (int k = 0; k < 4; ++k)
    TORCH_CHECK(running[k].device().is_cpu() && batch[k].is_contiguous() &&
                    running[k].numel() == (k == 0 ? std::min(C, batch[k].numel()) : batch[k].numel()),
                "running statistic ", k, " does not match the batch's");
  nbt.add_(1);
  const double f = momentum < 0 ? 1.0 / double(nbt.item<int64_t>()) : momentum;
  for (int k = 0; k < 4; ++k) {
    const auto& r = running[k];
    auto dst = r.is_contiguous() ? r : r.contiguous();  // a strided buffer (e.g. loaded with assign=True)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "update_running", [&] {
      using R = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(batch[k].scalar_type(), "update_running_batch", [&] {
        lerp_into<R, scalar_t>(dst.data_ptr<R>(), batch[k].data_ptr<scalar_t>(), r.numel(), f, k == 1 ? M / (M - 1) : 1.0);
      });
    });
    if (dst.is_same(r))
      torch::autograd::impl::bump_version(r);
    else
      r.copy_(dst);
  }
}

}  // namespace

// y, and without gradient mean (G, c), cov (G, c, c), W, rho (G,): the whitening of x (N, C, *s), or of
// (N, C) input when flat, per group of c channels, W sparsified to `density` (1: not), rho fixed
// (or Ledoit-Wolf's when shrink < 0, flat only); differentiable in x, gamma and beta. `running` (empty,
// or the norm's five running statistics, see update_running) moves toward the batch's by `momentum`.
std::vector<torch::Tensor> zca_step(torch::Tensor x, OptTensor weight, OptTensor bias, int64_t c, double eps,
                                    double shrink, bool flat, double density, std::vector<torch::Tensor> running,
                                    double momentum) {
  TORCH_CHECK(x.dim() >= 2 && c >= 1, "x must be (N, C, ...) and the group size positive");
  for (const auto* p : {&weight, &bias})
    TORCH_CHECK(!p->has_value() || !(*p)->defined() || (*p)->numel() == x.size(1), "gamma and beta must have C = ",
                x.size(1), " entries");
  auto out = ZCAStepFunction::apply(x, weight, bias, c, eps, shrink, flat, density);
  if (!running.empty()) update_running(running, out, double(x.numel() / x.size(1)), momentum);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released as in torch's own bindings: Python threads run meanwhile, and Python hooks
  // reached from inside (saved tensor hooks) take it themselves.
  m.def("moments", &moments, "whitening: shifted sums and scatter per channel group",
        py::call_guard<py::gil_scoped_release>());
  m.def("affine", &affine, "whitening: y = A (x - mean) + b per channel group",
        py::call_guard<py::gil_scoped_release>());
  m.def("grad_moments", &grad_moments, "whitening backward: sums of gy and gy (x - mean)^T per group",
        py::call_guard<py::gil_scoped_release>());
  m.def("grad_input", &grad_input, "whitening backward: gx = P gy + Q (x - mean) + v per group",
        py::call_guard<py::gil_scoped_release>());
  m.def("zca_step", &zca_step, "ZCA's training step, an autograd Function",
        py::call_guard<py::gil_scoped_release>());
}
