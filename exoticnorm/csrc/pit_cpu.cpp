// Fused CPU passes of PITNorm's training transform (see exoticnorm/pit.py for the math).
// x is (N, C, S) contiguous; a value's grid position is t = K/2 (1 + z/(1+|z|)), z = (x-c)/s,
// its bin k = floor(t) clamped to [0, K-1] and its place in the bin t - k.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;

// The bin of position t: floor(t) clamped to [0, K-1]; NaN goes to bin 0 (and stays NaN).
template <typename T>
inline int32_t clamped_bin(T t, T top) {
  return static_cast<int32_t>(std::min(std::max(T(0), t), top));
}

// Grid positions t and bins of len values (a loop the compiler vectorizes), with the values'
// sum and sum of squares.
template <typename T>
inline void positions(const T* v, int64_t len, T center, T inv, T half, T top, T* t, int32_t* bin, T* s1, T* s2) {
  T a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t j = 0; j < len; ++j) {
    const T z = (v[j] - center) * inv;
    t[j] = half * (T(1) + z / (T(1) + std::abs(z)));
    bin[j] = clamped_bin(t[j], top);
    a1 += v[j];
    a2 += v[j] * v[j];
  }
  *s1 = a1;
  *s2 = a2;
}

// Grid positions t, bins and dt/dx of len values (vectorized).
template <typename T>
inline void positions_slopes(const T* v, int64_t len, T center, T inv, T half, T top, T* t, int32_t* bin, T* dt) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const T z = (v[j] - center) * inv;
    const T a = T(1) + std::abs(z);
    t[j] = half * (T(1) + z / a);
    bin[j] = clamped_bin(t[j], top);
    dt[j] = half * inv / (a * a);
  }
}

// grad_x = grad_y w dg/dx over a chunk (vectorized), with sums of grad_y g and grad_y.
template <typename T>
inline void grad_chunk(const T* gy, const T* g, const T* d, T w, int64_t len, T* gx, T* sw, T* sb) {
  T aw = 0, ab = 0;
#pragma omp simd reduction(+ : aw, ab)
  for (int64_t j = 0; j < len; ++j) {
    gx[j] = gy[j] * w * d[j];
    aw += gy[j] * g[j];
    ab += gy[j];
  }
  *sw = aw;
  *sb = ab;
}

void check(const torch::Tensor& x, const torch::Tensor& center, const torch::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), "x must be a contiguous CPU (N, C, S) tensor");
  TORCH_CHECK(center.scalar_type() == x.scalar_type() && scale.scalar_type() == x.scalar_type(), "grid dtype must match x");
  TORCH_CHECK(center.numel() == x.size(1) && scale.numel() == x.size(1), "one grid per channel");
}

}  // namespace

// Bin counts (C, K), each bin's smallest value and how many values equal it (ties at a bin's
// bottom), and each channel's moments (3, C): count, sum, sum of squares.
std::vector<torch::Tensor> histogram(torch::Tensor x, torch::Tensor center, torch::Tensor scale, int64_t K) {
  check(x, center, scale);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2), CK = C * K;
  auto counts = torch::zeros({C, K}, x.options().dtype(torch::kFloat64));
  auto moments = torch::zeros({3, C}, x.options().dtype(torch::kFloat64));
  auto bottom = torch::empty({C, K}, x.options());
  auto ties = torch::zeros({C, K}, x.options().dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_histogram", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = center.data_ptr<scalar_t>();
    const scalar_t* sp = scale.data_ptr<scalar_t>();
    const scalar_t half = scalar_t(K) / 2, top = scalar_t(K - 1);
    const int threads = at::get_num_threads();
    std::vector<std::vector<int32_t>> cnt(threads), tie(threads);
    std::vector<std::vector<double>> mom(threads, std::vector<double>(2 * C, 0.0));
    std::vector<std::vector<scalar_t>> bot(threads);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      if (cnt[tid].empty()) {
        cnt[tid].assign(CK, 0);
        tie[tid].assign(CK, 0);
        bot[tid].assign(CK, std::numeric_limits<scalar_t>::infinity());
      }
      int32_t* ct = cnt[tid].data();
      int32_t* tt = tie[tid].data();
      scalar_t* bt = bot[tid].data();
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t cc = cp[c], inv = scalar_t(1) / sp[c];
          const scalar_t* row = xp + (n * C + c) * S;
          const int64_t base = c * K;
          double s1 = 0.0, s2 = 0.0;
          scalar_t tb[kChunk];
          int32_t ib[kChunk];
          for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
            const int64_t len = std::min(kChunk, S - s0);
            const scalar_t* v = row + s0;
            scalar_t f1 = 0, f2 = 0;
            positions(v, len, cc, inv, half, top, tb, ib, &f1, &f2);
            s1 += double(f1);
            s2 += double(f2);
            for (int64_t j = 0; j < len; ++j) {
              const int64_t i = base + ib[j];
              ct[i] += 1;
              if (v[j] <= bt[i]) {  // rare after the first values: one compare on the hot path
                tt[i] = v[j] == bt[i] ? tt[i] + 1 : 1;
                bt[i] = v[j];
              }
            }
          }
          mom[tid][c] += s1;
          mom[tid][C + c] += s2;
        }
      }
    });
    double* mo = moments.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) mo[c] = double(N * S);
    for (int t = 0; t < threads; ++t)
      for (int64_t c = 0; c < C; ++c) {
        mo[C + c] += mom[t][c];
        mo[2 * C + c] += mom[t][C + c];
      }
    double* co = counts.data_ptr<double>();
    double* to = ties.data_ptr<double>();
    scalar_t* bo = bottom.data_ptr<scalar_t>();
    for (int64_t i = 0; i < CK; ++i) bo[i] = std::numeric_limits<scalar_t>::infinity();
    for (int t = 0; t < threads; ++t) {
      if (cnt[t].empty()) continue;
      for (int64_t i = 0; i < CK; ++i) {
        co[i] += double(cnt[t][i]);
        if (bot[t][i] < bo[i]) {
          bo[i] = bot[t][i];
          to[i] = double(tie[t][i]);
        } else if (bot[t][i] == bo[i]) {
          to[i] += double(tie[t][i]);
        }
      }
    }
  });
  return {counts, bottom, ties, moments};
}

// The transform of one value: g = lo + span * place in its bin, or atom for a tie at the bin's
// bottom; d = dg/dx (0 for a tie).
template <typename T>
struct Tables {
  const T *center, *scale, *lo, *span, *bottom, *atom;
  const bool* has_atom;
  int64_t K;

  // g and dg/dx of value v at position t (slope dt) in channel c
  inline void at(T v, T t, int32_t k, T dt, int64_t c, T& g, T& d) const {
    const int64_t i = c * K + k;
    if (has_atom[i] && v == bottom[i]) {
      g = atom[i];
      d = T(0);
    } else {
      g = lo[i] + span[i] * (t - T(k));
      d = span[i] * dt;
    }
  }

  // g and dg/dx of row r (S values of channel c starting at x + r S), a chunk at a time:
  // f(offset, len, g, d) for each chunk.
  template <typename F>
  inline void row(const T* x, int64_t r, int64_t S, int64_t c, F&& f) const {
    const T cc = center[c], inv = T(1) / scale[c], half = T(K) / 2, top = T(K - 1);
    T tb[kChunk], db[kChunk];
    int32_t ib[kChunk];
    for (int64_t s0 = r * S; s0 < (r + 1) * S; s0 += kChunk) {
      const int64_t len = std::min(kChunk, (r + 1) * S - s0);
      positions_slopes(x + s0, len, cc, inv, half, top, tb, ib, db);
      for (int64_t j = 0; j < len; ++j) at(x[s0 + j], tb[j], ib[j], db[j], c, tb[j], db[j]);
      f(s0, len, tb, db);
    }
  }
};

template <typename T>
Tables<T> tables_of(const torch::Tensor& center, const torch::Tensor& scale, const torch::Tensor& lo,
                    const torch::Tensor& span, const torch::Tensor& bottom, const torch::Tensor& atom,
                    const torch::Tensor& has_atom) {
  TORCH_CHECK(lo.is_contiguous() && span.is_contiguous() && bottom.is_contiguous() && atom.is_contiguous() &&
              has_atom.is_contiguous() && has_atom.scalar_type() == torch::kBool, "tables must be contiguous");
  return {center.data_ptr<T>(), scale.data_ptr<T>(), lo.data_ptr<T>(), span.data_ptr<T>(),
          bottom.data_ptr<T>(), atom.data_ptr<T>(), has_atom.data_ptr<bool>(), lo.size(1)};
}

// y = w_c g + b_c.
torch::Tensor apply(torch::Tensor x, torch::Tensor center, torch::Tensor scale, torch::Tensor lo, torch::Tensor span,
                    torch::Tensor bottom, torch::Tensor atom, torch::Tensor has_atom, torch::Tensor weight,
                    torch::Tensor bias) {
  check(x, center, scale);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_apply", [&] {
    const auto tab = tables_of<scalar_t>(center, scale, lo, span, bottom, atom, has_atom);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t *wp = weight.data_ptr<scalar_t>(), *bp = bias.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % C;
        const scalar_t w = wp[c], b = bp[c];
        tab.row(xp, r, S, c, [&](int64_t s0, int64_t len, const scalar_t* g, const scalar_t*) {
          for (int64_t j = 0; j < len; ++j) yp[s0 + j] = w * g[j] + b;
        });
      }
    });
  });
  return y;
}

// grad_x = grad_y w_c dg/dx, grad_w_c = sum grad_y g, grad_b_c = sum grad_y (g recomputed from x).
std::vector<torch::Tensor> backward(torch::Tensor gy, torch::Tensor x, torch::Tensor center, torch::Tensor scale,
                                    torch::Tensor lo, torch::Tensor span, torch::Tensor bottom, torch::Tensor atom,
                                    torch::Tensor has_atom, torch::Tensor weight) {
  check(x, center, scale);
  TORCH_CHECK(gy.is_contiguous() && gy.sizes() == x.sizes(), "grad must be contiguous and shaped like x");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  auto gx = torch::empty_like(x);
  auto gw = torch::zeros({C}, x.options().dtype(torch::kFloat64));
  auto gb = torch::zeros({C}, x.options().dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_backward", [&] {
    const auto tab = tables_of<scalar_t>(center, scale, lo, span, bottom, atom, has_atom);
    const scalar_t *gyp = gy.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const int threads = at::get_num_threads();
    std::vector<std::vector<double>> sw(threads, std::vector<double>(C, 0.0)), sb(threads, std::vector<double>(C, 0.0));
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % C;
        const scalar_t w = wp[c];
        double aw = 0.0, ab = 0.0;
        tab.row(xp, r, S, c, [&](int64_t s0, int64_t len, const scalar_t* g, const scalar_t* d) {
          scalar_t fw = 0, fb = 0;
          grad_chunk(gyp + s0, g, d, w, len, gxp + s0, &fw, &fb);
          aw += double(fw);
          ab += double(fb);
        });
        sw[tid][c] += aw;
        sb[tid][c] += ab;
      }
    });
    double *gwp = gw.data_ptr<double>(), *gbp = gb.data_ptr<double>();
    for (int t = 0; t < threads; ++t)
      for (int64_t c = 0; c < C; ++c) {
        gwp[c] += sw[t][c];
        gbp[c] += sb[t][c];
      }
  });
  return {gx, gw.to(gy.scalar_type()), gb.to(gy.scalar_type())};
}

// The per-bin tables from the batch's bin counts (C, K, summed over ranks), the ties at each bin's
// bottom and the local count per channel: lo (output at the bin's bottom), span (increase across
// the bin), atom (output of a tie's mid-rank), has_atom; outputs through clamp + ndtri when
// normal. With observe, the sketch's edge CDF (C, K-1) and weight (C) take the batch in place:
// cdf += f (batch - cdf), f = n / (weight + n) (cumulative, momentum < 0) or momentum.
std::vector<torch::Tensor> tables(torch::Tensor counts, torch::Tensor ties, torch::Tensor local_n, bool normal,
                                  double tail, torch::Tensor cdf, torch::Tensor weight, double momentum,
                                  bool observe, torch::ScalarType dtype) {
  TORCH_CHECK(counts.scalar_type() == torch::kFloat64 && ties.scalar_type() == torch::kFloat64 &&
              local_n.scalar_type() == torch::kFloat64, "counts, ties and local_n must be float64");
  TORCH_CHECK(cdf.scalar_type() == weight.scalar_type() && cdf.is_contiguous() && weight.is_contiguous(),
              "the sketch's cdf and weight must be contiguous, of one dtype");
  const int64_t C = counts.size(0), K = counts.size(1);
  auto edges = torch::empty({C, K + 1}, counts.options());
  const double *cp = counts.data_ptr<double>(), *tp = ties.data_ptr<double>(), *lp = local_n.data_ptr<double>();
  double* ep = edges.data_ptr<double>();
  std::vector<int64_t> atoms;
  for (int64_t c = 0; c < C; ++c) {
    double n = 0.0;
    for (int64_t k = 0; k < K; ++k) n += cp[c * K + k];
    const double inv = 1.0 / n;
    double run = 0.0;
    ep[c * (K + 1)] = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      run += cp[c * K + k];
      ep[c * (K + 1) + k + 1] = run * inv;
      if (tp[c * K + k] > 1.0) atoms.push_back(c * K + k);
    }
    if (observe) {
      AT_DISPATCH_FLOATING_TYPES(cdf.scalar_type(), "pit_observe", [&] {
        scalar_t *fp = cdf.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
        const double w = wp[c];
        const scalar_t f = momentum < 0.0 ? n / std::max(w + n, 1.0) : (w == 0.0 ? 1.0 : momentum);
        const double total = std::max(n, 1.0);
        double cum = 0.0;
        for (int64_t k = 0; k < K - 1; ++k) {
          cum += cp[c * K + k];
          scalar_t& v = fp[c * (K - 1) + k];
          v = v + f * (static_cast<scalar_t>(cum / total) - v);
        }
        wp[c] = static_cast<scalar_t>(w + n);
      });
    }
  }
  // the tied values' share of the batch, and the u values a tie-carrying bin needs
  const int64_t A = static_cast<int64_t>(atoms.size());
  auto atom_u = torch::empty({2, A}, counts.options());
  double* au = atom_u.data_ptr<double>();
  for (int64_t j = 0; j < A; ++j) {
    const int64_t i = atoms[j], c = i / K, k = i % K;
    const double share = tp[i] / lp[c], base = ep[c * (K + 1) + k];
    au[j] = base + share;
    au[A + j] = base + share / 2;
  }
  torch::Tensor out_edges = edges, out_atoms = atom_u;
  if (normal) {
    out_edges = at::special_ndtri(edges.clamp(tail, 1.0 - tail));
    if (A) out_atoms = at::special_ndtri(atom_u.clamp(tail, 1.0 - tail));
  }
  auto out = counts.options().dtype(dtype);
  auto lo = torch::empty({C, K}, out), span = torch::empty({C, K}, out), atom = torch::empty({C, K}, out);
  auto has_atom = torch::zeros({C, K}, counts.options().dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES(dtype, "pit_tables", [&] {
    const double *oe = out_edges.data_ptr<double>(), *oa = out_atoms.data_ptr<double>();
    scalar_t *lop = lo.data_ptr<scalar_t>(), *spp = span.data_ptr<scalar_t>(), *ap = atom.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < K; ++k) {
        const double e0 = oe[c * (K + 1) + k], e1 = oe[c * (K + 1) + k + 1];
        lop[c * K + k] = scalar_t(e0);
        ap[c * K + k] = scalar_t(e0);
        spp[c * K + k] = scalar_t(e1 - e0);
      }
    bool* hp = has_atom.data_ptr<bool>();
    for (int64_t j = 0; j < A; ++j) {
      const int64_t i = atoms[j], c = i / K, k = i % K;
      hp[i] = true;
      lop[i] = scalar_t(oa[j]);
      spp[i] = scalar_t(oe[c * (K + 1) + k + 1] - oa[j]);
      ap[i] = scalar_t(oa[A + j]);
    }
  });
  return {lo, span, atom, has_atom};
}

// QuantileSketch._follow on the CPU: from a batch's moments (3, C: count, sum, sum of squares)
// update the running mean and var in place (set by the first batch; lerp with momentum, or kept
// after the first batch when momentum < 0, the cumulative mode) and return (regrid, std): the
// channels whose grid must move, and the std to move it to.
std::vector<torch::Tensor> follow(torch::Tensor moments, torch::Tensor mean, torch::Tensor var, torch::Tensor center,
                                  torch::Tensor scale, torch::Tensor ready, double momentum, double shift) {
  TORCH_CHECK(moments.scalar_type() == torch::kFloat64 && ready.scalar_type() == torch::kBool, "bad follow arguments");
  const int64_t C = mean.numel();
  auto regrid = torch::zeros({C}, ready.options());
  auto stdev = torch::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "pit_follow", [&] {
    const double* mp = moments.data_ptr<double>();
    scalar_t *mu = mean.data_ptr<scalar_t>(), *va = var.data_ptr<scalar_t>(), *sd = stdev.data_ptr<scalar_t>();
    const scalar_t *ce = center.data_ptr<scalar_t>(), *sc = scale.data_ptr<scalar_t>();
    const bool* rd = ready.data_ptr<bool>();
    bool* rg = regrid.data_ptr<bool>();
    const scalar_t eps = std::numeric_limits<scalar_t>::epsilon();
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t n = scalar_t(mp[c]), m = scalar_t(mp[C + c]) / n;
      const scalar_t v = std::max(scalar_t(mp[2 * C + c]) / n - m * m, scalar_t(0));
      if (!rd[c]) {
        mu[c] = m;
        va[c] = v;
      } else if (momentum >= 0.0) {
        mu[c] = mu[c] + scalar_t(momentum) * (m - mu[c]);
        va[c] = va[c] + scalar_t(momentum) * (v - va[c]);
      }
      sd[c] = std::max(std::sqrt(va[c]), eps * std::max(std::abs(mu[c]), scalar_t(1)));
      const bool moved = std::abs(mu[c] - ce[c]) > scalar_t(shift) * sc[c] || std::abs(sd[c] / sc[c] - 1) > scalar_t(shift);
      rg[c] = !rd[c] || (moved && momentum >= 0.0);
    }
  });
  return {regrid, stdev};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("histogram", &histogram, "PIT: bin counts, bin bottoms, ties at the bottom, moments");
  m.def("apply", &apply, "PIT: the piecewise-linear transform and the affine");
  m.def("tables", &tables, "PIT: per-bin tables from counts and ties, observing the batch into the sketch");
  m.def("follow", &follow, "QuantileSketch: running moments and which grids move");
  m.def("backward", &backward, "PIT: gradients of x, weight and bias");
}
