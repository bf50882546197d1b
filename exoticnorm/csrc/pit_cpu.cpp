// Fused CPU passes of PITNorm's training transform (see exoticnorm/pit.py for the math).
// x is (N, C, S) contiguous; a value's grid position is t = K/2 (1 + z/(1+|z|)), z = (x-c)/s,
// its bin k = floor(t) clamped to [0, K-1] and its place in the bin t - k.
//
// The work is per channel: count the channel's values on its grid, build its tables (observing
// the batch into the sketch, and letting its grid follow), transform its values. `forward` does
// all of it for one channel in one task, so the values are still in cache when transformed;
// with fewer channels than threads a channel's rows are counted and transformed in blocks.
// `histogram`, `tables`, `follow` and `apply` are the same steps one at a time (the distributed
// path sums the counts of all ranks in between).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>

#include "transpose.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;

// The bin of position t: floor(t) clamped to [0, K-1]; NaN goes to bin 0 (and stays NaN).
template <typename T>
inline int32_t clamped_bin(T t, T top) {
  return static_cast<int32_t>(std::min(std::max(T(0), t), top));
}

// Grid positions t and bins of len values (a loop the compiler vectorizes), with the sum and
// sum of squares of the finite values' offsets from the grid's centre (shifted sums: no
// overflow or cancellation for values far from zero) and how many are finite. A non-finite
// value has a NaN position (its bin is 0, and it is not counted).
template <typename T>
inline void positions(const T* v, int64_t len, T center, T inv, T half, T top, T* t, int32_t* bin, T* s1, T* s2,
                      int64_t* finite) {
  T a1 = 0, a2 = 0;
  int64_t nf = 0;
#pragma omp simd reduction(+ : a1, a2, nf)
  for (int64_t j = 0; j < len; ++j) {
    const T z = (v[j] - center) * inv;
    t[j] = half * (T(1) + z / (T(1) + std::abs(z)));
    bin[j] = clamped_bin(t[j], top);
    const bool ok = t[j] == t[j];
    const T d = ok ? v[j] - center : T(0);
    a1 += d;
    a2 += d * d;
    nf += ok;
  }
  *s1 = a1;
  *s2 = a2;
  *finite = nf;
}

void check(const torch::Tensor& x, const torch::Tensor& center, const torch::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), "x must be a contiguous CPU (N, C, S) tensor");
  TORCH_CHECK(center.scalar_type() == x.scalar_type() && scale.scalar_type() == x.scalar_type(), "grid dtype must match x");
  TORCH_CHECK(center.numel() == x.size(1) && scale.numel() == x.size(1), "one grid per channel");
}

// Blocks of rows per channel: 1 when every thread can take whole channels.
int64_t row_blocks(int64_t N, int64_t C) {
  const int64_t threads = at::get_num_threads();
  return C >= threads ? 1 : std::max<int64_t>(1, std::min<int64_t>(N, (threads + C - 1) / C));
}

// Rows [begin, end) of block b out of B.
inline std::pair<int64_t, int64_t> block_rows(int64_t N, int64_t b, int64_t B) {
  return {N * b / B, N * (b + 1) / B};
}

// --- counting ---------------------------------------------------------------------------------

// One channel's counts over some rows, finite values only: values per bin, each bin's smallest
// value and how many values equal it (ties at the bin's bottom), how many values, and the sums
// of their offsets from the grid's centre and of the offsets' squares.
template <typename T>
struct Counts {
  std::vector<int32_t> n, ties;
  std::vector<T> bottom;
  double s1 = 0.0, s2 = 0.0, finite = 0.0, center = 0.0;

  void reset(int64_t K) {
    n.assign(K, 0);
    ties.assign(K, 0);
    bottom.assign(K, std::numeric_limits<T>::infinity());
    s1 = s2 = finite = 0.0;
  }

  // The finite values' sum and sum of squares (unshifted).
  double sum() const { return s1 + finite * center; }
  double sumsq() const { return s2 + 2.0 * center * s1 + finite * center * center; }

  // Rows [n0, n1) of channel c of x (N, C, S), on the grid (center, 1/scale).
  void add(const T* x, int64_t C, int64_t S, int64_t c, int64_t n0, int64_t n1, T center, T inv) {
    this->center = double(center);
    const int64_t K = static_cast<int64_t>(n.size());
    const T half = T(K) / 2, top = T(K - 1);
    int32_t* ct = n.data();
    int32_t* tt = ties.data();
    T* bt = bottom.data();
    T tb[kChunk];
    int32_t ib[kChunk], low[kChunk];
    for (int64_t r = n0; r < n1; ++r) {
      const T* row = x + (r * C + c) * S;
      for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
        const int64_t len = std::min(kChunk, S - s0);
        const T* v = row + s0;
        T f1 = 0, f2 = 0;
        int64_t nf = 0;
        positions(v, len, center, inv, half, top, tb, ib, &f1, &f2, &nf);
        s1 += double(f1);  // float sums over a chunk, double across
        s2 += double(f2);
        finite += double(nf);
        // counts, and a list of the values at or below their bin's bottom so far: a branch on
        // that test mispredicts too often (each new minimum), a list costs nothing. Non-finite
        // values (NaN position, bin 0) are counted too, then taken back from bin 0, and skipped
        // in the list.
        int64_t nl = 0;
        for (int64_t j = 0; j < len; ++j) {
          const int32_t k = ib[j];
          ct[k] += 1;
          low[nl] = static_cast<int32_t>(j);
          nl += v[j] <= bt[k];
        }
        ct[0] -= static_cast<int32_t>(len - nf);
        for (int64_t q = 0; q < nl; ++q) {  // bottoms only fall: no value left out can lower one
          const int64_t j = low[q], k = ib[j];
          if (!(tb[j] == tb[j])) continue;
          if (v[j] < bt[k]) {
            bt[k] = v[j];
            tt[k] = 1;
          } else if (v[j] == bt[k]) {
            tt[k] += 1;
          }
        }
      }
    }
  }

  // Fold in the counts of other rows of the same channel.
  void merge(const Counts& o) {
    for (size_t k = 0; k < n.size(); ++k) {
      n[k] += o.n[k];
      if (o.bottom[k] < bottom[k]) {
        bottom[k] = o.bottom[k];
        ties[k] = o.ties[k];
      } else if (o.bottom[k] == bottom[k]) {
        ties[k] += o.ties[k];
      }
    }
    s1 += o.s1;
    s2 += o.s2;
    finite += o.finite;
  }
};

// Count every channel of x, then done(c, counts) for each channel, in parallel over channels
// (with B > 1 blocks of rows per channel, the blocks are counted in parallel and merged first).
template <typename T, typename F>
void count_channels(const T* x, int64_t N, int64_t C, int64_t S, int64_t K, const T* center, const T* scale,
                    int64_t B, F&& done) {
  if (B == 1) {
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      Counts<T> counts;
      for (int64_t c = begin; c < end; ++c) {
        counts.reset(K);
        counts.add(x, C, S, c, 0, N, center[c], T(1) / scale[c]);
        done(c, counts);
      }
    });
    return;
  }
  std::vector<Counts<T>> parts(C * B);
  at::parallel_for(0, C * B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / B;
      const auto [n0, n1] = block_rows(N, task % B, B);
      parts[task].reset(K);
      parts[task].add(x, C, S, c, n0, n1, center[c], T(1) / scale[c]);
    }
  });
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t b = 1; b < B; ++b) parts[c * B].merge(parts[c * B + b]);
      done(c, parts[c * B]);
    }
  });
}

// --- tables -------------------------------------------------------------------------------------

// The output of a CDF value u: Phi^-1(clamp(u, tail, 1 - tail)) when normal, else u; with the
// outputs at j / n, j = 0..n, for a count n of at most kCachedCount values: every edge of a channel of
// n values takes one of them, so its tables read them instead of evaluating Phi^-1 per edge (8.5 ns
// each, K per channel and step). They are computed once per (n, normal, tail) and kept for the
// kCachedSizes triples used last (a layer's batches have one n, a short last batch another); only
// where computing them costs at most a few steps' worth of per-edge evaluations (n <= 4 C K).
constexpr int64_t kCachedCount = 1 << 16;
constexpr size_t kCachedSizes = 8;

struct Output {
  bool normal;
  double tail;
  double smoothing;  // values per bin the training grid keeps on average (see coarsening)
  int64_t count_n = -1;
  std::shared_ptr<const std::vector<double>> at_count;

  double operator()(double u) const {
    return normal ? calc_ndtri(std::min(std::max(u, tail), 1.0 - tail)) : u;
  }

  // The outputs at j / n for channels of n values, C channels of K bins.
  void cache_counts(double n, int64_t C, int64_t K) {
    if (!(n > 0 && n <= double(std::min(kCachedCount, 4 * C * K)) && n == std::floor(n))) return;
    struct Entry {
      int64_t n;
      bool normal;
      double tail;
      std::shared_ptr<const std::vector<double>> values;
    };
    static std::mutex mutex;
    static std::deque<Entry> kept;  // the most recently used last
    count_n = static_cast<int64_t>(n);
    std::lock_guard<std::mutex> lock(mutex);
    for (auto e = kept.begin(); e != kept.end(); ++e)
      if (e->n == count_n && e->normal == normal && e->tail == tail) {
        at_count = e->values;
        Entry used = *e;
        kept.erase(e);
        kept.push_back(used);
        return;
      }
    auto values = std::make_shared<std::vector<double>>(count_n + 1);
    for (int64_t j = 0; j <= count_n; ++j) (*values)[j] = (*this)(double(j) / n);
    if (kept.size() == kCachedSizes) kept.pop_front();
    kept.push_back({count_n, normal, tail, values});
    at_count = std::move(values);
  }

  const double* by_count(double n) const { return n == double(count_n) ? at_count->data() : nullptr; }

  // r = ceil(smoothing K / n) in [1, K]: the tables are linear over r bins at a time, so a
  // channel of n values keeps about `smoothing` values per linear piece (see PITNorm).
  int64_t coarsening(double n, int64_t K) const {
    if (!(smoothing > 0.0) || !(n > 0.0)) return 1;
    return std::min<int64_t>(K, std::max<int64_t>(1, static_cast<int64_t>(std::ceil(smoothing * double(K) / n))));
  }
};

// The largest of K counts (a max reduction, which the compiler vectorizes for integers; a loop
// that ors comparisons or tracks the position as well does not vectorize).
template <typename Count>
inline Count largest(const Count* v, int64_t K) {
  Count m = 0;
  for (int64_t k = 0; k < K; ++k) m = std::max(m, v[k]);
  return m;
}

// One channel's tables (K values each) from its bin counts, the ties at each bin's bottom, the
// bottoms and the count the ties are a share of (all of the whole batch, over ranks): lo (output
// at the bin's bottom), span (increase across the bin), tie (the bottom where several values
// tie there, NaN elsewhere), atom (output of the ties' mid-rank) and slope (the backward's rise across the bin). The
// output is the batch CDF G through g at every bin edge (just after the ties, for a bin with
// ties), linear in t in between. The slope is that of the same construction with knots only at
// every r-th edge (r = out.coarsening(n, K)) and at tied bins: a histogram density over pieces
// of about `smoothing` values, bounded however few values the channel has (r = 1: the exact
// derivative). Returns the channel's count n (the sum of cnt), whether it has ties and whether its
// slope may differ from its span (r > 1). Without `all`, a channel without ties gets only lo and span
// (and slope where r > 1): the transform's loops for such channels read no other table.
struct ChannelKind {
  double n;
  bool ties, own_slope;
};

template <typename T, typename Count>
ChannelKind channel_tables(const Count* cnt, const Count* ties, const T* bottom, double local_n, int64_t K,
                           const Output& out, std::vector<double>& edge_out, bool all, T* lo, T* span, T* tie, T* atom,
                           T* slope) {
  // Counts are whole numbers (integers, or float64 sums of them over ranks): integer sums are exact
  // and, unlike a chain of double additions, do not wait 4 cycles per bin.
  int64_t total = 0;
  for (int64_t k = 0; k < K; ++k) total += static_cast<int64_t>(cnt[k]);
  const double n = double(total);
  edge_out.resize(K + 1);
  double* O = edge_out.data();
  const double* by_count = out.by_count(n);
  O[0] = out(0.0);
  if (by_count) {
    int64_t upto = 0;
    for (int64_t k = 0; k < K; ++k) {
      upto += static_cast<int64_t>(cnt[k]);
      O[k + 1] = by_count[upto];
    }
  } else {
    int64_t upto = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t before = upto;
      upto += static_cast<int64_t>(cnt[k]);
      O[k + 1] = upto == before ? O[k] : out(double(upto) / n);  // empty bins repeat their edge
    }
  }
  const int64_t coarse = out.coarsening(n, K);
  if (!(double(largest(ties, K)) > 1.0)) {  // no ties: every bin a knot, then pieces of r bins for the slope
    for (int64_t k = 0; k < K; ++k) {
      lo[k] = T(O[k]);
      span[k] = T(O[k + 1] - O[k]);
    }
    if (all)
      for (int64_t k = 0; k < K; ++k) {
        tie[k] = std::numeric_limits<T>::quiet_NaN();
        atom[k] = lo[k];
        slope[k] = span[k];
      }
    if (coarse > 1)
      for (int64_t p = 0; p < K; p += coarse) {
        const int64_t q = std::min(K, p + coarse);
        const T rise = T((O[q] - O[p]) / double(q - p));
        for (int64_t k = p; k < q; ++k) slope[k] = rise;
      }
    return {n, false, coarse > 1};
  }
  for (const int64_t r : {int64_t(1), coarse}) {  // the forward's tables, then the backward's slope
    if (r != 1 && coarse == 1) break;  // the slope is the exact one, written in the first pass
    double run = 0.0;
    int64_t p = 0, multiple = 0;  // multiple: the largest multiple of r <= k (no division per bin)
    double start = O[0], rise = 0.0;  // the piece from knot p: start + (t - p) rise
    for (int64_t k = 0; k < K; ++k) {
      const double below = run / n;  // G at the bin's bottom edge
      run += double(cnt[k]);
      const bool tied = double(ties[k]) > 1.0;
      if (k == multiple + r) multiple = k;
      if (k == multiple || tied) {  // a knot: the next one is the next multiple of r, K or a tied bin
        p = k;
        const double share = tied ? double(ties[k]) / local_n : 0.0;  // the tied values' part
        start = tied ? out(below + share) : O[k];
        int64_t q = std::min(K, multiple + r);
        for (int64_t j = k + 1; j < q; ++j)
          if (double(ties[j]) > 1.0) {
            q = j;
            break;
          }
        rise = (O[q] - start) / double(q - p);
        if (tied && r == 1) {
          tie[k] = bottom[k];
          atom[k] = T(out(below + share / 2));
        }
      }
      if (r == 1) {
        lo[k] = T(start + double(k - p) * rise);
        span[k] = T(rise);
        if (!tied) {
          tie[k] = std::numeric_limits<T>::quiet_NaN();
          atom[k] = lo[k];
        }
      }
      slope[k] = T(rise);
    }
  }
  return {n, true, coarse > 1};
}

// --- the sketch ---------------------------------------------------------------------------------

// The sketch's buffers (QuantileSketch: cdf (C, K-1), weight, mean, var, center, scale, ready).
struct Sketch {
  torch::Tensor cdf, weight, mean, var, center, scale, ready;
  double momentum, shift;  // momentum < 0: cumulative
};

// Channel c's edge CDF and weight take a batch of n values with bin counts cnt:
// cdf += f (batch - cdf), f = n / (weight + n) (cumulative) or momentum (the first batch: 1).
template <typename S, typename Count>
void observe_channel(const Sketch& sk, int64_t c, const Count* cnt, int64_t K, double n) {
  if (!(n > 0.0)) return;  // no finite value: nothing to learn
  S* cdf = sk.cdf.data_ptr<S>() + c * (K - 1);
  S& weight = sk.weight.data_ptr<S>()[c];
  const double w = weight;
  const S f = sk.momentum < 0.0 ? n / std::max(w + n, 1.0) : (w == 0.0 ? 1.0 : sk.momentum);
  const double per_value = 1.0 / std::max(n, 1.0);  // a product per bin, not a division (within an ulp)
  // the running counts first (whole counts: an exact integer sum, no chain of double additions),
  // then the update as a loop the compiler vectorizes
  thread_local std::vector<double> below;
  below.resize(K - 1);
  int64_t cum = 0;
  for (int64_t k = 0; k < K - 1; ++k) {
    cum += static_cast<int64_t>(cnt[k]);
    below[k] = double(cum);
  }
  const double* run = below.data();
  for (int64_t k = 0; k < K - 1; ++k) cdf[k] = cdf[k] + f * (static_cast<S>(run[k] * per_value) - cdf[k]);
  weight = static_cast<S>(w + n);
}

// QuantileSketch._follow for channel c, from the batch's count, sum and sum of squares: the
// running mean and var are set by the first batch, then lerp with momentum (kept in the
// cumulative mode); returns whether the grid must move, and to which std.
template <typename S>
bool follow_channel(const Sketch& sk, int64_t c, double count, double sum, double sumsq, S* stdev) {
  S& mu = sk.mean.data_ptr<S>()[c];
  S& va = sk.var.data_ptr<S>()[c];
  const S center = sk.center.data_ptr<S>()[c], scale = sk.scale.data_ptr<S>()[c];
  const bool ready = sk.ready.data_ptr<bool>()[c];
  *stdev = scale;
  if (!(count > 0.0)) return false;  // no finite value: the grid stays
  const double md = sum / count;
  const S m = S(md), v = S(std::max(sumsq / count - md * md, 0.0));
  if (!ready) {
    mu = m;
    va = v;
  } else if (sk.momentum >= 0.0) {
    mu = mu + S(sk.momentum) * (m - mu);
    va = va + S(sk.momentum) * (v - va);
  } else {  // pooled over the values seen (the sketch's weight, this batch already counted)
    const double w = double(sk.weight.data_ptr<S>()[c]);
    const double f = w > 0.0 ? std::min(1.0, count / w) : 1.0, d = md - double(mu);
    mu = S(double(mu) + f * d);
    va = S(double(va) + f * (double(v) - double(va)) + f * (1.0 - f) * d * d);
  }
  const S sd = std::max(std::sqrt(va), std::numeric_limits<S>::epsilon() * std::max(std::abs(mu), S(1)));
  *stdev = sd;
  if (!ready) return true;
  if (sk.momentum < 0.0)  // cumulative: the grid moves only when the data leave it
    return std::abs(mu - center) > S(2) * scale || sd > S(4) * scale || sd < scale / S(4);
  return std::abs(mu - center) > S(sk.shift) * scale || std::abs(sd / scale - 1) > S(sk.shift);
}

// QuantileSketch._regrid for channel c: its edge CDF re-interpolated at the new grid's K - 1 inner
// edges x_j = center' + scale' v / (1 - |v|), v = 2 j / K - 1, placed on the old grid (position t,
// linear in t within a bin, F = 0 at t = 0 and 1 at t = K); then the grid is (center', scale').
template <typename S>
void regrid_channel(const Sketch& sk, int64_t c, int64_t K, S new_center, S new_scale) {
  S* cdf = sk.cdf.data_ptr<S>() + c * (K - 1);
  S& center = sk.center.data_ptr<S>()[c];
  S& scale = sk.scale.data_ptr<S>()[c];
  thread_local std::vector<S> moved;
  moved.resize(K - 1);
  const S half = S(0.5) * S(K);
  for (int64_t j = 1; j < K; ++j) {
    const S v = S(2) * (S(j) / S(K)) - S(1);
    const S x = new_center + new_scale * v / (S(1) - std::abs(v));
    const S z = (x - center) / scale;
    const S t = (z / (S(1) + std::abs(z)) + S(1)) * half;
    const int64_t k = t == t ? std::min<int64_t>(std::max<int64_t>(int64_t(std::floor(t)), 0), K - 1) : 0;
    const S lo = k == 0 ? S(0) : cdf[k - 1], hi = k == K - 1 ? S(1) : cdf[k];  // F at edges k, k + 1
    moved[j - 1] = lo + (t - S(k)) * (hi - lo);
  }
  std::copy(moved.begin(), moved.end(), cdf);
  center = new_center;
  scale = new_scale;
}

// follow_channel, then the grid moved to (running mean, std) where it must.
template <typename S>
void follow_and_regrid(const Sketch& sk, int64_t c, int64_t K, double count, double sum, double sumsq) {
  S sd;
  if (follow_channel<S>(sk, c, count, sum, sumsq, &sd)) regrid_channel<S>(sk, c, K, sk.mean.data_ptr<S>()[c], sd);
}

// --- the transform ------------------------------------------------------------------------------

// One channel's transform: a value v at grid position t in bin k maps to
// g = lo_k + span_k (t - k), or to atom_k when v equals tie_k (the bin's bottom when ties there
// get a mid-rank, NaN otherwise); d = slope_k dt/dx, the backward's derivative (dg/dx where the
// slope is the span; 0 for a tie).
// (Ties: whether the channel has any; without, its loops read two tables instead of four.
// Slope: whether its slope table differs from its span, as it does only where the channel has
// fewer values than `smoothing` per bin; else d reads the span already read for g.)
template <typename T>
struct Channel {
  T center, inv, half, top;
  const T *lo, *span, *tie, *atom, *slope;
  bool ties, own_slope;

  // Channel of grid (center, scale) and K-entry tables.
  static Channel on(T center, T scale, int64_t K, const T* lo, const T* span, const T* tie, const T* atom,
                    const T* slope, bool ties, bool own_slope) {
    return {center, T(1) / scale, T(K) / 2, T(K - 1), lo, span, tie, atom, slope, ties, own_slope};
  }

  template <bool Ties, bool Slope = true>
  inline void at(T v, T& g, T& d) const {
    const T z = (v - center) * inv;
    const T a = T(1) + std::abs(z);
    const T t = half * (T(1) + z / a);
    const int32_t k = clamped_bin(t, top);
    const T span_k = span[k];
    const T slope_k = Slope ? slope[k] : span_k;
    if constexpr (Ties) {
      // arithmetic, not branches, so that the loops over values vectorize (gathers for the tables)
      const T m = T(v == tie[k]);  // m = 1 for a tie, else 0 (exact blends below)
      g = m * atom[k] + (T(1) - m) * (lo[k] + span_k * (t - T(k)));
      d = (T(1) - m) * slope_k * half * inv / (a * a);
    } else {
      g = lo[k] + span_k * (t - T(k));
      d = slope_k * half * inv / (a * a);
    }
    d += t - t;  // NaN for a non-finite x (NaN position), as on the torch path; else + 0
  }
};

template <typename T>
struct Tables {
  const T *center, *scale, *lo, *span, *tie, *atom, *slope;
  int64_t K;
  std::vector<char> ties;       // per channel: any tie (a non-NaN tie value)
  std::vector<char> own_slope;  // per channel: a slope table that differs from the span

  Channel<T> channel(int64_t c) const {
    return Channel<T>::on(center[c], scale[c], K, lo + c * K, span + c * K, tie + c * K, atom + c * K, slope + c * K,
                          ties.empty() || ties[c] != 0, own_slope.empty() || own_slope[c] != 0);
  }

  // Which channels have ties and their own slope, from their tables.
  void classify_all() {
    for (int64_t c = 0; c < static_cast<int64_t>(ties.size()); ++c) {
      const int64_t o = c * K;
      ties[c] = std::any_of(tie + o, tie + o + K, [](T v) { return v == v; });
      own_slope[c] = !std::equal(slope + o, slope + o + K, span + o);
    }
  }
};

// The tables (call classify_all before use).
template <typename T>
Tables<T> tables_of(const torch::Tensor& center, const torch::Tensor& scale, const torch::Tensor& lo,
                    const torch::Tensor& span, const torch::Tensor& tie, const torch::Tensor& atom,
                    const torch::Tensor& slope) {
  TORCH_CHECK(lo.is_contiguous() && span.is_contiguous() && tie.is_contiguous() && atom.is_contiguous() &&
              slope.is_contiguous() && slope.scalar_type() == lo.scalar_type() &&
              lo.scalar_type() == center.scalar_type() && span.scalar_type() == lo.scalar_type() &&
              tie.scalar_type() == lo.scalar_type() && atom.scalar_type() == lo.scalar_type(),
              "tables must be contiguous, of x's dtype");
  const int64_t C = lo.size(0);
  return {center.data_ptr<T>(), scale.data_ptr<T>(), lo.data_ptr<T>(), span.data_ptr<T>(), tie.data_ptr<T>(),
          atom.data_ptr<T>(), slope.data_ptr<T>(), lo.size(1), std::vector<char>(C, 1), std::vector<char>(C, 1)};
}

// y = w g + b over a row of len values (vectorized: the table reads become gathers); with Keep,
// also g and d = dg/dx, the backward's (saved instead of x: the backward then reads no tables).
template <bool Ties, bool Slope, bool Keep, typename T>
void apply_row(const Channel<T>& ch, const T* __restrict x, int64_t len, T w, T b, T* __restrict y,
               T* __restrict gs, T* __restrict ds) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    T g, d;
    ch.template at<Ties, Slope>(x[j], g, d);
    y[j] = w * g + b;
    if constexpr (Keep) {
      gs[j] = g;
      ds[j] = d;
    }
  }
}

// y = w_c g + b_c for rows [n0, n1) of channel c; with gs and ds (not null) also g and dg/dx.
template <typename T>
void apply_rows(const Channel<T>& ch, const T* x, int64_t C, int64_t S, int64_t c, int64_t n0, int64_t n1, T w, T b,
                T* y, T* gs, T* ds) {
  const auto rows = [&](auto ties, auto slope, auto keep) {
    for (int64_t r = n0; r < n1; ++r) {
      const int64_t o = (r * C + c) * S;
      apply_row<decltype(ties)::value, decltype(slope)::value, decltype(keep)::value>(
          ch, x + o, S, w, b, y + o, keep ? gs + o : nullptr, keep ? ds + o : nullptr);
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (gs == nullptr) {
    ch.ties ? rows(yes{}, no{}, no{}) : rows(no{}, no{}, no{});
  } else if (ch.own_slope) {
    ch.ties ? rows(yes{}, yes{}, yes{}) : rows(no{}, yes{}, yes{});
  } else {
    ch.ties ? rows(yes{}, no{}, yes{}) : rows(no{}, no{}, yes{});
  }
}

// grad_x = grad_y w d, with the sums of grad_y g and grad_y, from g and d = dg/dx over len values
// (the forward's, kept: no table reads).
template <typename T>
void grad_row_kept(const T* __restrict g, const T* __restrict d, const T* __restrict gy, int64_t len, T w,
                   T* __restrict gx, T* sw, T* sb) {
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

// grad_x = grad_y w dg/dx over len <= kChunk values, with sums of grad_y g and grad_y. Two
// loops, as GCC vectorizes neither half when the tables' reads and the sums share one.
template <typename T>
void grad_row(const Channel<T>& ch, const T* __restrict x, const T* __restrict gy, int64_t len, T w,
              T* __restrict gx, T* sw, T* sb) {
  T gb[kChunk], db[kChunk];
  if (ch.ties) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) ch.template at<true>(x[j], gb[j], db[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) ch.template at<false>(x[j], gb[j], db[j]);
  }
  grad_row_kept(gb, db, gy, len, w, gx, sw, sb);
}

}  // namespace

// Bin counts (C, K), each bin's smallest value and how many values equal it (ties at a bin's
// bottom), and each channel's moments (3, C): count, sum, sum of squares.
std::vector<torch::Tensor> histogram(torch::Tensor x, torch::Tensor center, torch::Tensor scale, int64_t K) {
  check(x, center, scale);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  auto counts = torch::empty({C, K}, x.options().dtype(torch::kFloat64));
  auto ties = torch::empty({C, K}, x.options().dtype(torch::kFloat64));
  auto moments = torch::empty({3, C}, x.options().dtype(torch::kFloat64));
  auto bottom = torch::empty({C, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_histogram", [&] {
    double *co = counts.data_ptr<double>(), *to = ties.data_ptr<double>(), *mo = moments.data_ptr<double>();
    scalar_t* bo = bottom.data_ptr<scalar_t>();
    count_channels(x.data_ptr<scalar_t>(), N, C, S, K, center.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                   row_blocks(N, C), [&](int64_t c, const Counts<scalar_t>& cn) {
                     std::copy(cn.n.begin(), cn.n.end(), co + c * K);
                     std::copy(cn.ties.begin(), cn.ties.end(), to + c * K);
                     std::copy(cn.bottom.begin(), cn.bottom.end(), bo + c * K);
                     mo[c] = cn.finite;
                     mo[C + c] = cn.sum();
                     mo[2 * C + c] = cn.sumsq();
                   });
  });
  return {counts, bottom, ties, moments};
}

// The per-bin tables (C, K) from bin counts (summed over ranks), ties, bottoms and each
// channel's count (see channel_tables), with outputs G or Phi^-1(clamp(G, tail, 1 - tail))
// when normal. With observe, the sketch's cdf and weight take the batch (momentum < 0:
// cumulative).
std::vector<torch::Tensor> tables(torch::Tensor counts, torch::Tensor ties, torch::Tensor bottom, torch::Tensor local_n,
                                  bool normal, double tail, double smoothing, torch::Tensor cdf, torch::Tensor weight, double momentum,
                                  bool observe) {
  TORCH_CHECK(counts.scalar_type() == torch::kFloat64 && ties.scalar_type() == torch::kFloat64 &&
              local_n.scalar_type() == torch::kFloat64 && counts.is_contiguous() && ties.is_contiguous() &&
              bottom.is_contiguous() && local_n.is_contiguous(), "counts, ties and local_n must be contiguous float64");
  TORCH_CHECK(cdf.scalar_type() == weight.scalar_type() && cdf.is_contiguous() && weight.is_contiguous(),
              "the sketch's cdf and weight must be contiguous, of one dtype");
  const int64_t C = counts.size(0), K = counts.size(1);
  auto lo = torch::empty({C, K}, bottom.options()), span = torch::empty_like(lo), tie = torch::empty_like(lo),
       atom = torch::empty_like(lo), slope = torch::empty_like(lo);
  const Sketch sk{cdf, weight, {}, {}, {}, {}, {}, momentum, 0.0};
  const double *cp = counts.data_ptr<double>(), *tp = ties.data_ptr<double>(), *lp = local_n.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(bottom.scalar_type(), "pit_tables", [&] {
    using T = scalar_t;
    const T* bp = bottom.data_ptr<T>();
    T *lop = lo.data_ptr<T>(), *spp = span.data_ptr<T>(), *tip = tie.data_ptr<T>(), *ap = atom.data_ptr<T>(),
      *slp = slope.data_ptr<T>();
    Output out{normal, tail, smoothing};
    if (C > 0) out.cache_counts(std::accumulate(cp, cp + K, 0.0), C, K);  // channels are counted alike
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> edge_out;
      for (int64_t c = begin; c < end; ++c) {
        const int64_t o = c * K;
        const double n = channel_tables(cp + o, tp + o, bp + o, lp[c], K, out, edge_out, true, lop + o, spp + o,
                                        tip + o, ap + o, slp + o).n;
        if (observe) {
          AT_DISPATCH_FLOATING_TYPES(cdf.scalar_type(), "pit_observe", [&] {
            observe_channel<scalar_t>(sk, c, cp + o, K, n);
          });
        }
      }
    });
  });
  return {lo, span, tie, atom, slope};
}

// QuantileSketch._follow on the CPU: from a batch's moments (3, C: count, sum, sum of squares)
// update the running mean and var in place, and move the grids (and re-interpolate the edge CDFs,
// cdf (C, K - 1)) of the channels that have drifted; every grid is then marked ready.
void follow(torch::Tensor moments, torch::Tensor cdf, torch::Tensor mean, torch::Tensor var, torch::Tensor center,
            torch::Tensor scale, torch::Tensor ready, torch::Tensor weight, double momentum, double shift) {
  TORCH_CHECK(moments.scalar_type() == torch::kFloat64 && ready.scalar_type() == torch::kBool &&
              cdf.scalar_type() == mean.scalar_type() && cdf.is_contiguous(), "bad follow arguments");
  const int64_t C = mean.numel(), K = cdf.size(1) + 1;
  const Sketch sk{cdf, weight, mean, var, center, scale, ready, momentum, shift};
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "pit_follow", [&] {
    const double* mp = moments.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) follow_and_regrid<scalar_t>(sk, c, K, mp[c], mp[C + c], mp[2 * C + c]);
  });
  ready.fill_(true);
}

// y = w_c g + b_c.
torch::Tensor apply(torch::Tensor x, torch::Tensor center, torch::Tensor scale, torch::Tensor lo, torch::Tensor span,
                    torch::Tensor tie, torch::Tensor atom, torch::Tensor slope, torch::Tensor weight, torch::Tensor bias) {
  check(x, center, scale);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_apply", [&] {
    auto tab = tables_of<scalar_t>(center, scale, lo, span, tie, atom, slope);
    tab.classify_all();
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>(), *bp = bias.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        apply_rows<scalar_t>(tab.channel(r % C), xp, C, S, r % C, r / C, r / C + 1, wp[r % C], bp[r % C], yp, nullptr,
                             nullptr);
    });
  });
  return y;
}

// The whole training forward of one process in one call, channel by channel: the counts on a
// copy of the grid, the tables (observing the batch into the sketch when observe), with
// do_follow the grid follow (the running moments, and the grids that must move moved), and y.
// Returns y, per channel (3, C) the count of finite values and the value and size of its largest tie
// (NaN, 0 without ties), and with keep g and dg/dx for the backward (undefined without).
std::vector<torch::Tensor> forward(torch::Tensor x, torch::Tensor center, torch::Tensor scale, int64_t K, bool normal,
                                   double tail, double smoothing, torch::Tensor cdf, torch::Tensor sketch_weight, torch::Tensor mean,
                                   torch::Tensor var, torch::Tensor ready, double momentum, double shift, bool observe,
                                   bool do_follow, torch::Tensor weight, torch::Tensor bias, bool keep) {
  auto c0 = center.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  auto s0 = scale.to(x.scalar_type(), false, true);
  check(x, c0, s0);
  TORCH_CHECK(cdf.scalar_type() == sketch_weight.scalar_type() && cdf.scalar_type() == mean.scalar_type() &&
              cdf.is_contiguous() && ready.scalar_type() == torch::kBool, "the sketch's buffers must be of one dtype");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2), B = row_blocks(N, C);
  auto y = torch::empty_like(x);
  torch::Tensor gs, ds;
  if (keep) {
    gs = torch::empty_like(x);
    ds = torch::empty_like(x);
  }
  auto extras = torch::empty({3, C}, x.options().dtype(torch::kFloat64));
  double* ep = extras.data_ptr<double>();
  const Sketch sk{cdf, sketch_weight, mean, var, center, scale, ready, momentum, shift};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_forward", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *wp = weight.data_ptr<T>(), *bp = bias.data_ptr<T>();
    const T *cp = c0.data_ptr<T>(), *sp = s0.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    T *gsp = keep ? gs.data_ptr<T>() : nullptr, *dsp = keep ? ds.data_ptr<T>() : nullptr;
    // The five tables of a channel (lo, span, tie, atom, slope; K each) are scratch: with one block of
    // rows per channel (B = 1) one set per thread, used while the channel's values are still in cache
    // (and the tables in L1); with B > 1 one set per channel, kept for the second pass.
    std::vector<T> kept(B > 1 ? 5 * C * K : 0);
    std::vector<ChannelKind> kinds(B > 1 ? C : 0);
    const auto channel = [&](int64_t c, const T* t, const ChannelKind& kind) {
      return Channel<T>::on(cp[c], sp[c], K, t, t + K, t + 2 * K, t + 3 * K, t + 4 * K, kind.ties, kind.own_slope);
    };
    const double n = double(N * S);
    Output out{normal, tail, smoothing};
    out.cache_counts(n, C, K);
    count_channels(xp, N, C, S, K, cp, sp, B, [&](int64_t c, const Counts<T>& cn) {
      thread_local std::vector<double> edge_out;
      thread_local std::vector<T> scratch;
      if (B == 1) scratch.resize(5 * K);
      T* t = B == 1 ? scratch.data() : kept.data() + 5 * c * K;
      const auto kind = channel_tables(cn.n.data(), cn.ties.data(), cn.bottom.data(), cn.finite, K, out, edge_out,
                                       false, t, t + K, t + 2 * K, t + 3 * K, t + 4 * K);
      ep[c] = cn.finite;  // the finite values, and the largest tie (the first of its size): its value and size
      const int32_t size = largest(cn.ties.data(), K);
      const auto most = size > 1 ? std::find(cn.ties.begin(), cn.ties.end(), size) - cn.ties.begin() : 0;
      ep[C + c] = size > 1 ? double(cn.bottom[most]) : std::numeric_limits<double>::quiet_NaN();
      ep[2 * C + c] = size > 1 ? double(size) : 0.0;
      AT_DISPATCH_FLOATING_TYPES(cdf.scalar_type(), "pit_sketch", [&] {
        if (observe) observe_channel<scalar_t>(sk, c, cn.n.data(), K, cn.finite);
        if (do_follow) follow_and_regrid<scalar_t>(sk, c, K, cn.finite, cn.sum(), cn.sumsq());
      });
      if (B == 1)
        apply_rows(channel(c, t, kind), xp, C, S, c, 0, N, wp[c], bp[c], yp, gsp, dsp);  // its values still in cache
      else
        kinds[c] = kind;
    });
    if (B > 1) {
      at::parallel_for(0, C * B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t c = task / B;
          const auto [n0, n1] = block_rows(N, task % B, B);
          apply_rows(channel(c, kept.data() + 5 * c * K, kinds[c]), xp, C, S, c, n0, n1, wp[c], bp[c], yp, gsp, dsp);
        }
      });
    }
  });
  return {y, extras, gs, ds};
}

namespace {

// The backward's pass over the rows of (N, C, S): row(c, offset, len, &sum_w, &sum_b) writes
// grad_x for len <= kChunk values of channel c and returns their float sums of grad_y g and
// grad_y, added up per channel in float64 (per thread first: threads writing to shared lines
// stall each other). Returns (grad_w, grad_b) as float64 (C).
template <typename T, typename Row>
std::pair<torch::Tensor, torch::Tensor> grad_pass(int64_t N, int64_t C, int64_t S, Row&& row) {
  auto gw = torch::zeros({C}, torch::kFloat64), gb = torch::zeros({C}, torch::kFloat64);
  const int threads = at::get_num_threads();
  std::vector<std::vector<double>> sw(threads, std::vector<double>(C, 0.0)), sb(threads, std::vector<double>(C, 0.0));
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    std::vector<double> lw(C, 0.0), lb(C, 0.0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r % C;
      for (int64_t s0 = r * S; s0 < (r + 1) * S; s0 += kChunk) {  // float sums over a chunk, double across
        T fw = 0, fb = 0;
        row(c, s0, std::min(kChunk, (r + 1) * S - s0), &fw, &fb);
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
  return {gw, gb};
}

}  // namespace

// grad_x = grad_y w_c dg/dx, grad_w_c = sum grad_y g, grad_b_c = sum grad_y (g recomputed from x).
std::vector<torch::Tensor> backward(torch::Tensor gy, torch::Tensor x, torch::Tensor center, torch::Tensor scale,
                                    torch::Tensor lo, torch::Tensor span, torch::Tensor tie, torch::Tensor atom,
                                    torch::Tensor slope, torch::Tensor weight) {
  check(x, center, scale);
  TORCH_CHECK(gy.is_contiguous() && gy.sizes() == x.sizes(), "grad must be contiguous and shaped like x");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  auto gx = torch::empty_like(x);
  std::pair<torch::Tensor, torch::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_backward", [&] {
    using T = scalar_t;
    auto tab = tables_of<T>(center, scale, lo, span, tie, atom, slope);
    tab.classify_all();
    const T *gyp = gy.data_ptr<T>(), *xp = x.data_ptr<T>(), *wp = weight.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    sums = grad_pass<T>(N, C, S, [&](int64_t c, int64_t o, int64_t len, T* fw, T* fb) {
      grad_row(tab.channel(c), xp + o, gyp + o, len, wp[c], gxp + o, fw, fb);
    });
  });
  return {gx, sums.first.to(gy.scalar_type()), sums.second.to(gy.scalar_type())};
}

// The same from the forward's g and d = dg/dx (forward with keep): grad_x = grad_y w_c d,
// grad_w_c = sum grad_y g, grad_b_c = sum grad_y; one pass with no table reads.
std::vector<torch::Tensor> backward_kept(torch::Tensor gy, torch::Tensor g, torch::Tensor d, torch::Tensor weight) {
  TORCH_CHECK(gy.is_contiguous() && g.is_contiguous() && d.is_contiguous() && gy.sizes() == g.sizes() &&
              d.sizes() == g.sizes() && g.dim() == 3, "grad, g and dg/dx must be contiguous (N, C, S) tensors");
  const int64_t N = g.size(0), C = g.size(1), S = g.size(2);
  auto gx = torch::empty_like(g);
  std::pair<torch::Tensor, torch::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pit_backward_kept", [&] {
    using T = scalar_t;
    const T *gyp = gy.data_ptr<T>(), *gp = g.data_ptr<T>(), *dp = d.data_ptr<T>(), *wp = weight.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    sums = grad_pass<T>(N, C, S, [&](int64_t c, int64_t o, int64_t len, T* fw, T* fb) {
      grad_row_kept(gp + o, dp + o, gyp + o, len, wp[c], gxp + o, fw, fb);
    });
  });
  return {gx, sums.first.to(gy.scalar_type()), sums.second.to(gy.scalar_type())};
}

// ---- the single-process training step as an autograd Function ----------------------------------

namespace {

// QuantileSketch.observe_atoms for every channel, from forward's extras (3, C: finite count, the
// value and size of the largest tie), after observe_channel updated the weights: the batch's largest
// tie is averaged into (atom, atom_mass) with the weight observe used; a tie elsewhere replaces it.
template <typename S>
void observe_atoms(const torch::Tensor& extras, const torch::Tensor& seen, const torch::Tensor& atom,
                   const torch::Tensor& atom_mass, double momentum) {
  const int64_t C = extras.size(1);
  const double* e = extras.data_ptr<double>();
  const S* w = seen.data_ptr<S>();
  S* at = atom.data_ptr<S>();
  S* am = atom_mass.data_ptr<S>();
  for (int64_t c = 0; c < C; ++c) {
    const double n = e[c];
    const S share = S(e[2 * C + c] / std::max(n, 1.0)), value = S(e[C + c]), ns = S(n);
    S factor = momentum < 0.0 ? ns / std::max(w[c], S(1)) : (w[c] - ns <= S(0) ? S(1) : S(momentum));
    if (!(n > 0.0)) factor = 0;
    const bool same = value == at[c] && am[c] > S(0);
    const bool fresh = value == value && !same && factor > S(0);
    const S end = same ? share : S(0), start = am[c];  // torch.lerp's two-sided formula
    const S mass = factor < S(0.5) ? start + factor * (end - start) : end - (end - start) * (S(1) - factor);
    am[c] = fresh ? share * factor : mass;
    if (fresh) at[c] = value;
  }
}

// (R, K, 1) values as K rows (1, K, R), and back (rows = false), so that each channel of (N, C) input
// is one contiguous row for the passes, without a transpose (and its autograd) in Python.
torch::Tensor transposed(const torch::Tensor& x, bool rows) {
  const int64_t R = rows ? x.size(0) : x.size(2), K = x.size(1);
  auto out = rows ? torch::empty({1, K, R}, x.options()) : torch::empty({R, K, 1}, x.options());
  auto src = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pit_transpose", [&] {
    rows ? exoticnorm::transpose_into(src.data_ptr<scalar_t>(), R, K, out.data_ptr<scalar_t>())
         : exoticnorm::transpose_into(src.data_ptr<scalar_t>(), K, R, out.data_ptr<scalar_t>());
  });
  return out;
}

// Inputs: x (N, C, *), gamma, beta, the sketch's center, scale, cdf, weight, mean, var, ready, nonfinite,
// atom, atom_mass, then K, normal, tail, smoothing, momentum (< 0: cumulative), shift, observe, follow.
// x runs as (N, C, S) (a view inside: no reshape nodes in the caller's graph), and (N, C) input as
// channel rows (1, C, N).
class PITStepFunction : public torch::autograd::Function<PITStepFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
      torch::Tensor center, torch::Tensor scale, torch::Tensor cdf, torch::Tensor seen, torch::Tensor mean,
      torch::Tensor var, torch::Tensor ready, torch::Tensor nonfinite, torch::Tensor atom, torch::Tensor atom_mass,
      int64_t K, bool normal, double tail, double smoothing, double momentum, double shift, bool observe,
      bool do_follow, bool keep) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto x3 = x.reshape({x.size(0), x.size(1), -1}).contiguous();
    const bool columns = x3.size(2) == 1 && x3.size(0) > 1;
    auto out = ::forward(columns ? transposed(x3, true) : x3, center, scale, K, normal, tail, smoothing, cdf, seen, mean,
                         var, ready, momentum, shift, observe, do_follow, weight, bias, keep);
    // y in x's shape, not a view (the caller may modify it in place)
    out[0] = at::_unsafe_view(columns ? transposed(out[0], false) : out[0], x.sizes());
    ctx->saved_data["columns"] = columns;
    // out: y, extras, g, dg/dx
    if (observe) {
      TORCH_CHECK(nonfinite.is_contiguous() && atom.is_contiguous() && atom_mass.is_contiguous() &&
                  nonfinite.scalar_type() == cdf.scalar_type() && atom.scalar_type() == cdf.scalar_type() &&
                  atom_mass.scalar_type() == cdf.scalar_type(), "the sketch's buffers must be of one dtype");
      const double values = double(x3.size(0) * x3.size(2));
      AT_DISPATCH_FLOATING_TYPES(cdf.scalar_type(), "pit_atoms", [&] {
        const double* e = out[1].data_ptr<double>();
        scalar_t* nf = nonfinite.data_ptr<scalar_t>();
        for (int64_t c = 0; c < x.size(1); ++c) nf[c] += scalar_t(values - e[c]);
        observe_atoms<scalar_t>(out[1], seen, atom, atom_mass, momentum);
      });
    }
    if (keep) ctx->save_for_backward({out[2], out[3], weight});  // not x: the backward reads no tables
    ready.fill_(true);  // every grid is set now (a fresh one by the caller, before this step)
    ctx->set_materialize_grads(false);
    return {out[0]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list result(22);
    if (!grads[0].defined()) return result;
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "the PIT norm's CPU kernel is not twice differentiable: double backward (create_graph=True, e.g. a "
                "gradient penalty) is not supported; set EXOTICNORM_NO_KERNELS=1 to use the torch-ops path, which is");
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto v = ctx->get_saved_variables();
    TORCH_CHECK(!v.empty(), "the PIT step kept nothing for a backward: it ran without gradient");
    const bool columns = ctx->saved_data["columns"].toBool();
    const auto& gy = grads[0];
    auto gy3 = gy.reshape({gy.size(0), gy.size(1), -1}).contiguous();
    auto g = ::backward_kept(columns ? transposed(gy3, true) : gy3, v[0], v[1], v[2]);
    result[0] = (columns ? transposed(g[0], false) : g[0]).view(gy.sizes());
    if (ctx->needs_input_grad(1)) result[1] = g[1];
    if (ctx->needs_input_grad(2)) result[2] = g[2];
    return result;
  }
};

}  // namespace

// The single-process training step: y; the sketch (cdf, weight, mean, var, and the grids that must move
// moved, as in forward; ready all set; nonfinite, atom, atom_mass when observe) updated in place, and
// `counter` (the module's num_batches_tracked, when given) counted up when observe.
// Differentiable in x, gamma and beta (the tables are constants). With `if_ready`, a sketch with any
// grid not yet set is left untouched and None returned: the caller sets the grids from this batch
// (QuantileSketch.follow) and calls again (the module's check, here, costs no Python op per step).
c10::optional<torch::Tensor> step(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, torch::Tensor center,
                                  torch::Tensor scale, torch::Tensor cdf, torch::Tensor seen, torch::Tensor mean,
                                  torch::Tensor var, torch::Tensor ready, torch::Tensor nonfinite, torch::Tensor atom,
                                  torch::Tensor atom_mass, c10::optional<torch::Tensor> counter, int64_t K, bool normal,
                                  double tail, double smoothing, double momentum, double shift, bool observe,
                                  bool do_follow, bool if_ready) {
  if (if_ready) {  // anything but a contiguous bool tensor with every grid set goes back to the caller
    if (ready.scalar_type() != torch::kBool || !ready.is_contiguous() || !ready.device().is_cpu()) return c10::nullopt;
    const bool* r = ready.data_ptr<bool>();
    if (!std::all_of(r, r + ready.numel(), [](bool v) { return v; })) return c10::nullopt;
  }
  if (observe && counter.has_value()) counter->add_(1);  // counted first, as update_factor does
  // g and dg/dx are kept for a backward only where one can follow
  const bool keep = at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || bias.requires_grad());
  return PITStepFunction::apply(x, weight, bias, center, scale, cdf, seen, mean, var, ready, nonfinite, atom,
                                atom_mass, K, normal, tail, smoothing, momentum, shift, observe, do_follow, keep)[0];
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released as in torch's own bindings: Python threads run meanwhile, and Python hooks
  // reached from inside (saved tensor hooks) take it themselves.
  m.def("step", &step, "PIT: the single-process training step, an autograd Function",
        py::call_guard<py::gil_scoped_release>());
  m.def("histogram", &histogram, "PIT: bin counts, bin bottoms, ties at the bottom, moments",
        py::call_guard<py::gil_scoped_release>());
  m.def("tables", &tables, "PIT: per-bin tables from counts and ties, observing the batch into the sketch",
        py::call_guard<py::gil_scoped_release>());
  m.def("follow", &follow, "QuantileSketch: running moments, and the grids that drifted moved",
        py::call_guard<py::gil_scoped_release>());
  m.def("apply", &apply, "PIT: the piecewise-linear transform and the affine",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "PIT: gradients of x, weight and bias",
        py::call_guard<py::gil_scoped_release>());
}
