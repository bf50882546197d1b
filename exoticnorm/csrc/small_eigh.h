// Eigendecomposition of a small symmetric matrix (n <= 32) in plain loops, for the c x c maps of
// whiten_cpu.cpp: LAPACK's syevd through torch costs ~17 us at n = 16 (workspace queries, blocked
// code built for large n); this ~8 us, with no ATen call, so it can run inside a thread pool's worker.
//
//   1. Householder tridiagonalisation A = Q T Q^T: for column k, H = I - beta v v^T maps A[k+1:, k] to
//      -sign(x_0) |x| e_1; the trailing block B <- H B H = B - v w^T - w v^T with p = beta B v,
//      w = p - (beta/2)(p.v) v; Q <- Q H.
//   2. Implicit QR steps on T (Golub & Van Loan 8.3.2) with Wilkinson's shift mu (the eigenvalue of the
//      trailing 2 x 2 nearer its last entry): rotations R = [[c, s], [-s, c]] chase the bulge down,
//      T <- R T R^T, the eigenvector rows Z^T <- R Z^T; e_i is dropped once |e_i| <= eps (|d_i| + |d_i+1|).
//
// exoticnorm/kernels.py hashes this header into the kernels' build names.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace exoticnorm {

constexpr int64_t kSmallEigh = 32;

// a (n x n, row-major, symmetric; overwritten): w ascending, u (n x n, row-major) with column k the unit
// eigenvector of w[k]. False (w, u unset) for non-finite input, n > kSmallEigh, or QR steps that do not
// converge in 30 n; the caller then uses LAPACK. Any finite scale (1e-300 to 1e300) is taken: A is
// scaled by a power of two first, and sums of squares that could underflow go through hypot.
template <typename S>
bool small_eigh(S* a, int64_t n, S* w, S* u) {
  if (n < 1 || n > kSmallEigh) return false;
  S amax = 0;
  for (int64_t i = 0; i < n * n; ++i) {
    if (!std::isfinite(a[i])) return false;
    amax = std::max(amax, std::abs(a[i]));
  }
  // A 2^-scale A with its largest entry in [1, 2) (exact): no square below over- or underflows
  // for the matrix's own scale; w is scaled back at the end.
  const int scale = amax > S(0) ? std::ilogb(amax) : 0;
  if (scale != 0)
    for (int64_t i = 0; i < n * n; ++i) a[i] = std::ldexp(a[i], -scale);
  const S eps = std::numeric_limits<S>::epsilon(), tiny = std::numeric_limits<S>::min();
  const S small = std::sqrt(tiny) / eps;  // below it, a sum of two squares may lose bits to underflow
  const auto norm2 = [small](S f, S g) {  // sqrt(f^2 + g^2)
    const S r = std::sqrt(f * f + g * g);
    return r < small ? std::hypot(f, g) : r;
  };
  S d[kSmallEigh], e[kSmallEigh], v[kSmallEigh], p[kSmallEigh];
  S q[kSmallEigh * kSmallEigh], zt[kSmallEigh * kSmallEigh];
  std::fill(q, q + n * n, S(0));
  for (int64_t i = 0; i < n; ++i) q[i * n + i] = S(1);
  for (int64_t k = 0; k + 2 < n; ++k) {
    const int64_t m = n - k - 1;         // the trailing block's size
    const S* x = a + k * n + k + 1;      // column k below the diagonal (= row k right of it)
    d[k] = a[k * n + k];
    S tail = 0;
    for (int64_t i = 1; i < m; ++i) tail += x[i] * x[i];
    if (tail == S(0) || tail + x[0] * x[0] < small * small) {  // tridiagonal here, or |column| < ~1e-138
      e[k] = x[0];
      continue;
    }
    const S norm = std::sqrt(tail + x[0] * x[0]), sign = x[0] >= S(0) ? S(1) : S(-1);
    std::copy(x, x + m, v);
    v[0] += sign * norm;
    const S beta = S(2) / (tail + v[0] * v[0]);
    e[k] = -sign * norm;
    S* b = a + (k + 1) * n + (k + 1);  // rows n apart
    S pv = 0;
    for (int64_t i = 0; i < m; ++i) {
      S acc = 0;
      for (int64_t j = 0; j < m; ++j) acc += b[i * n + j] * v[j];
      p[i] = beta * acc;
      pv += p[i] * v[i];
    }
    const S half = beta * pv / S(2);
    for (int64_t i = 0; i < m; ++i) p[i] -= half * v[i];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < m; ++j) b[i * n + j] -= v[i] * p[j] + p[i] * v[j];
    for (int64_t r = 0; r < n; ++r) {
      S* qr = q + r * n + k + 1;
      S acc = 0;
      for (int64_t j = 0; j < m; ++j) acc += qr[j] * v[j];
      acc *= beta;
      for (int64_t j = 0; j < m; ++j) qr[j] -= acc * v[j];
    }
  }
  if (n >= 2) {
    d[n - 2] = a[(n - 2) * n + n - 2];
    e[n - 2] = a[(n - 2) * n + n - 1];
  }
  d[n - 1] = a[n * n - 1];
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) zt[i * n + j] = q[j * n + i];

  int64_t steps = 0, hi = n - 1;
  while (hi > 0) {
    for (int64_t i = 0; i < hi; ++i)
      if (std::abs(e[i]) <= eps * (std::abs(d[i]) + std::abs(d[i + 1])) || std::abs(e[i]) < tiny) e[i] = S(0);
    while (hi > 0 && e[hi - 1] == S(0)) --hi;
    if (hi == 0) break;
    if (++steps > 30 * n) return false;
    int64_t lo = hi - 1;  // the unreduced block [lo, hi]
    while (lo > 0 && e[lo - 1] != S(0)) --lo;
    const S delta = (d[hi - 1] - d[hi]) / S(2), off = e[hi - 1];
    const S root = norm2(delta, off), denom = delta + (delta >= S(0) ? root : -root);
    const S mu = denom != S(0) ? d[hi] - off / denom * off : d[hi];
    S x = d[lo] - mu, z = e[lo];
    for (int64_t k = lo; k < hi; ++k) {
      const S r = norm2(x, z);
      const S inv = r > S(0) ? S(1) / r : S(0);
      const S c = r > S(0) ? x * inv : S(1), s = z * inv;
      if (k > lo) e[k - 1] = r;
      const S dk = d[k], dk1 = d[k + 1], ek = e[k];
      d[k] = c * c * dk + S(2) * c * s * ek + s * s * dk1;
      d[k + 1] = s * s * dk - S(2) * c * s * ek + c * c * dk1;
      e[k] = c * s * (dk1 - dk) + (c * c - s * s) * ek;
      if (k + 1 < hi) {  // the bulge at (k, k + 2)
        z = s * e[k + 1];
        e[k + 1] *= c;
      }
      x = e[k];
      S* r0 = zt + k * n;
      S* r1 = zt + (k + 1) * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const S a0 = r0[j], a1 = r1[j];
        r0[j] = c * a0 + s * a1;
        r1[j] = c * a1 - s * a0;
      }
    }
  }
  int64_t order[kSmallEigh];
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::sort(order, order + n, [&](int64_t i, int64_t j) { return d[i] < d[j]; });
  for (int64_t k = 0; k < n; ++k) {
    w[k] = std::ldexp(d[order[k]], scale);
    const S* row = zt + order[k] * n;
    for (int64_t i = 0; i < n; ++i) u[i * n + k] = row[i];
  }
  return true;
}

}  // namespace exoticnorm
