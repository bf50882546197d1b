// Fused CPU passes of PITNorm's training transform (see exoticnorm/pit.py for the math).
// x is (N, C, S) contiguous; a value's grid position is t = K/2 (1 + z/(1+|z|)), z = (x-c)/s,
// its bin k = floor(t) clamped to [0, K-1] and its place in the bin t - k.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>

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
      std::vector<double> m(2 * C, 0.0);  // local: threads writing to shared lines would stall each other
      int32_t* ct = cnt[tid].data();
      int32_t* tt = tie[tid].data();
      scalar_t* bt = bot[tid].data();
      for (int64_t c = 0; c < C; ++c) {  // channel-major: one channel's bins stay in L1
        for (int64_t n = begin; n < end; ++n) {
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
            // counts, and a list of the values at or below their bin's bottom so far: a branch on
            // that test mispredicts too often (each new minimum), a list costs nothing
            int32_t low[kChunk];
            int64_t nl = 0;
            for (int64_t j = 0; j < len; ++j) {
              const int64_t i = base + ib[j];
              ct[i] += 1;
              low[nl] = static_cast<int32_t>(j);
              nl += v[j] <= bt[i];
            }
            for (int64_t q = 0; q < nl; ++q) {  // bottoms only fall: no value left out can lower one
              const int64_t j = low[q], i = base + ib[j];
              if (v[j] < bt[i]) {
                bt[i] = v[j];
                tt[i] = 1;
              } else if (v[j] == bt[i]) {
                tt[i] += 1;
              }
            }
          }
          m[c] += s1;
          m[C + c] += s2;
        }
      }
      for (int64_t i = 0; i < 2 * C; ++i) mom[tid][i] += m[i];
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

// One channel's transform: a value v at grid position t in bin k maps to
// g = lo_k + span_k (t - k), or to atom_k when v equals tie_k (the bin's bottom when ties there
// get a mid-rank, NaN otherwise); d = dg/dx (0 for a tie).
template <typename T>
struct Channel {
  T center, inv, half, top;
  const T *lo, *span, *tie, *atom;

  inline void at(T v, T& g, T& d) const {
    const T z = (v - center) * inv;
    const T a = T(1) + std::abs(z);
    const T t = half * (T(1) + z / a);
    const int32_t k = clamped_bin(t, top);
    // arithmetic, not branches, so that the loops over values vectorize (gathers for the tables)
    const T span_k = span[k], m = T(v == tie[k]);  // m = 1 for a tie, else 0 (exact blends below)
    g = m * atom[k] + (T(1) - m) * (lo[k] + span_k * (t - T(k)));
    d = (T(1) - m) * span_k * half * inv / (a * a);
  }
};

template <typename T>
struct Tables {
  const T *center, *scale, *lo, *span, *tie, *atom;
  int64_t K;

  Channel<T> channel(int64_t c) const {
    return {center[c], T(1) / scale[c], T(K) / 2, T(K - 1), lo + c * K, span + c * K, tie + c * K, atom + c * K};
  }
};

template <typename T>
Tables<T> tables_of(const torch::Tensor& center, const torch::Tensor& scale, const torch::Tensor& lo,
                    const torch::Tensor& span, const torch::Tensor& tie, const torch::Tensor& atom) {
  TORCH_CHECK(lo.is_contiguous() && span.is_contiguous() && tie.is_contiguous() && atom.is_contiguous() &&
              lo.scalar_type() == center.scalar_type() && span.scalar_type() == lo.scalar_type() &&
              tie.scalar_type() == lo.scalar_type() && atom.scalar_type() == lo.scalar_type(),
              "tables must be contiguous, of x's dtype");
  return {center.data_ptr<T>(), scale.data_ptr<T>(), lo.data_ptr<T>(), span.data_ptr<T>(),
          tie.data_ptr<T>(), atom.data_ptr<T>(), lo.size(1)};
}

// y = w_c g + b_c over a row of len values (vectorized: the table reads become gathers).
// y = w_c g + b_c over a row of len values (vectorized: the table reads become gathers).
template <typename T>
void apply_row(const Channel<T>& ch, const T* __restrict x, int64_t len, T w, T b, T* __restrict y) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    T g, d;
    ch.at(x[j], g, d);
    y[j] = w * g + b;
  }
}

// grad_x = grad_y w dg/dx over len <= kChunk values, with sums of grad_y g and grad_y. Two
// loops, as GCC vectorizes neither half when the tables' reads and the sums share one.
template <typename T>
void grad_row(const Channel<T>& ch, const T* __restrict x, const T* __restrict gy, int64_t len, T w,
              T* __restrict gx, T* sw, T* sb) {
  T gb[kChunk], db[kChunk];
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) ch.at(x[j], gb[j], db[j]);
  T aw = 0, ab = 0;
#pragma omp simd reduction(+ : aw, ab)
  for (int64_t j = 0; j < len; ++j) {
    gx[j] = gy[j] * w * db[j];
    aw += gy[j] * gb[j];
    ab += gy[j];
  }
  *sw = aw;
  *sb = ab;
}

// y = w_c g + b_c.
torch::Tensor apply(torch::Tensor x, torch::Tensor center, torch::Tensor scale, torch::Tensor lo, torch::Tensor span,
                    torch::Tensor tie, torch::Tensor atom, torch::Tensor weight, torch::Tensor bias) {
  check(x, center, scale);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_apply", [&] {
    const auto tab = tables_of<scalar_t>(center, scale, lo, span, tie, atom);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t *wp = weight.data_ptr<scalar_t>(), *bp = bias.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % C;
        apply_row(tab.channel(c), xp + r * S, S, wp[c], bp[c], yp + r * S);
      }
    });
  });
  return y;
}

// grad_x = grad_y w_c dg/dx, grad_w_c = sum grad_y g, grad_b_c = sum grad_y (g recomputed from x).
std::vector<torch::Tensor> backward(torch::Tensor gy, torch::Tensor x, torch::Tensor center, torch::Tensor scale,
                                    torch::Tensor lo, torch::Tensor span, torch::Tensor tie, torch::Tensor atom,
                                    torch::Tensor weight) {
  check(x, center, scale);
  TORCH_CHECK(gy.is_contiguous() && gy.sizes() == x.sizes(), "grad must be contiguous and shaped like x");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  auto gx = torch::empty_like(x);
  auto gw = torch::zeros({C}, x.options().dtype(torch::kFloat64));
  auto gb = torch::zeros({C}, x.options().dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_backward", [&] {
    const auto tab = tables_of<scalar_t>(center, scale, lo, span, tie, atom);
    const scalar_t *gyp = gy.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const int threads = at::get_num_threads();
    std::vector<std::vector<double>> sw(threads, std::vector<double>(C, 0.0)), sb(threads, std::vector<double>(C, 0.0));
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      std::vector<double> lw(C, 0.0), lb(C, 0.0);  // local, as in histogram
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % C;
        const auto ch = tab.channel(c);
        for (int64_t s0 = r * S; s0 < (r + 1) * S; s0 += kChunk) {  // float sums over a chunk, double across
          const int64_t len = std::min(kChunk, (r + 1) * S - s0);
          scalar_t fw = 0, fb = 0;
          grad_row(ch, xp + s0, gyp + s0, len, wp[c], gxp + s0, &fw, &fb);
          lw[c] += double(fw);
          lb[c] += double(fb);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        sw[tid][c] += lw[c];
        sb[tid][c] += lb[c];
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

// The sketch's edge CDF (K-1 values of one channel) and weight take a batch of n values with bin
// counts cp: cdf += f (batch - cdf), f = n / (weight + n) (cumulative, momentum < 0) or momentum.
template <typename S>
void observe_channel(S* cdf, S* weight, const double* cp, int64_t K, double n, double momentum) {
  const double w = *weight;
  const S f = momentum < 0.0 ? n / std::max(w + n, 1.0) : (w == 0.0 ? 1.0 : momentum);
  const double total = std::max(n, 1.0);
  double cum = 0.0;
  for (int64_t k = 0; k < K - 1; ++k) {
    cum += cp[k];
    cdf[k] = cdf[k] + f * (static_cast<S>(cum / total) - cdf[k]);
  }
  *weight = static_cast<S>(w + n);
}

// The per-bin tables (C, K) from the batch's bin counts (summed over ranks), each bin's bottom
// value and ties there, and the local count per channel: lo (output at the bin's bottom), span
// (increase across the bin), tie (the bottom where several values tie there, NaN elsewhere) and
// atom (output of the ties' mid-rank). Outputs are the batch CDF G, or Phi^-1(clamp(G, tail,
// 1 - tail)) when normal. With observe, the sketch's cdf (C, K-1) and weight (C) take the batch.
std::vector<torch::Tensor> tables(torch::Tensor counts, torch::Tensor ties, torch::Tensor bottom, torch::Tensor local_n,
                                  bool normal, double tail, torch::Tensor cdf, torch::Tensor weight, double momentum,
                                  bool observe) {
  TORCH_CHECK(counts.scalar_type() == torch::kFloat64 && ties.scalar_type() == torch::kFloat64 &&
              local_n.scalar_type() == torch::kFloat64 && counts.is_contiguous() && ties.is_contiguous() &&
              bottom.is_contiguous(), "counts, ties and local_n must be contiguous float64");
  TORCH_CHECK(cdf.scalar_type() == weight.scalar_type() && cdf.is_contiguous() && weight.is_contiguous(),
              "the sketch's cdf and weight must be contiguous, of one dtype");
  const int64_t C = counts.size(0), K = counts.size(1);
  auto lo = torch::empty({C, K}, bottom.options()), span = torch::empty_like(lo), tie = torch::empty_like(lo),
       atom = torch::empty_like(lo);
  const double *cp = counts.data_ptr<double>(), *tp = ties.data_ptr<double>(), *lp = local_n.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(bottom.scalar_type(), "pit_tables", [&] {
    using T = scalar_t;
    const T* bp = bottom.data_ptr<T>();
    T *lop = lo.data_ptr<T>(), *spp = span.data_ptr<T>(), *tip = tie.data_ptr<T>(), *ap = atom.data_ptr<T>();
    auto out = [&](double u) { return normal ? calc_ndtri(std::min(std::max(u, tail), 1.0 - tail)) : u; };
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> G(K + 1), O(K + 1);  // the batch CDF at the edges, and its output
      for (int64_t c = begin; c < end; ++c) {
        const double* cc = cp + c * K;
        double n = 0.0, run = 0.0;
        for (int64_t k = 0; k < K; ++k) n += cc[k];
        G[0] = 0.0;
        O[0] = out(0.0);
        for (int64_t k = 0; k < K; ++k) {
          run += cc[k];
          G[k + 1] = run / n;
          O[k + 1] = cc[k] == 0.0 ? O[k] : out(G[k + 1]);  // empty bins repeat their edge
        }
        if (observe) {
          AT_DISPATCH_FLOATING_TYPES(cdf.scalar_type(), "pit_observe", [&] {
            observe_channel(cdf.data_ptr<scalar_t>() + c * (K - 1), weight.data_ptr<scalar_t>() + c, cc, K, n,
                            momentum);
          });
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = c * K + k;
          if (tp[i] > 1.0) {  // the tied values' share of the batch
            const double share = tp[i] / lp[c], bottom_out = out(G[k] + share);
            lop[i] = T(bottom_out);
            spp[i] = T(O[k + 1] - bottom_out);
            tip[i] = bp[i];
            ap[i] = T(out(G[k] + share / 2));
          } else {
            lop[i] = T(O[k]);
            spp[i] = T(O[k + 1] - O[k]);
            tip[i] = std::numeric_limits<T>::quiet_NaN();
            ap[i] = T(O[k]);
          }
        }
      }
    });
  });
  return {lo, span, tie, atom};
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

// The whole training forward of one process in one call: the histogram on a copy of the grid,
// the tables (observing the batch into the sketch), with do_follow the grid follow, and y.
// Returns y, the grid copy and tables the backward needs, and follow's (regrid, std) for the
// caller to move the grids (regrid all false without do_follow).
std::vector<torch::Tensor> forward(torch::Tensor x, torch::Tensor center, torch::Tensor scale, int64_t K, bool normal,
                                   double tail, torch::Tensor cdf, torch::Tensor sketch_weight, torch::Tensor mean,
                                   torch::Tensor var, torch::Tensor ready, double momentum, double shift, bool observe,
                                   bool do_follow, torch::Tensor weight, torch::Tensor bias) {
  auto c0 = center.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  auto s0 = scale.to(x.scalar_type(), false, true);
  auto hist = histogram(x, c0, s0, K);  // counts, bottom, ties, moments
  auto moments = hist[3];
  auto tab = tables(hist[0], hist[2], hist[1], moments[0], normal, tail, cdf, sketch_weight, momentum,
                    observe);  // lo, span, tie, atom
  std::vector<torch::Tensor> moved = {torch::zeros({x.size(1)}, ready.options()), torch::Tensor()};
  if (do_follow) moved = follow(moments, mean, var, center, scale, ready, momentum, shift);
  auto y = apply(x, c0, s0, tab[0], tab[1], tab[2], tab[3], weight, bias);
  return {y, c0, s0, tab[0], tab[1], tab[2], tab[3], moved[0], moved[1]};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "PIT: histogram, tables, follow and transform in one call");
  m.def("histogram", &histogram, "PIT: bin counts, bin bottoms, ties at the bottom, moments");
  m.def("apply", &apply, "PIT: the piecewise-linear transform and the affine");
  m.def("tables", &tables, "PIT: per-bin tables from counts and ties, observing the batch into the sketch");
  m.def("follow", &follow, "QuantileSketch: running moments and which grids move");
  m.def("backward", &backward, "PIT: gradients of x, weight and bias");
}
