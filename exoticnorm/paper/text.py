"""The paper's hand-written prose: introduction, methods, relation to the literature."""

INTRO = r"""Batch normalization standardizes every channel with the mean and variance of the batch. The
exercises of d2l's chapter on batch normalization [d2l] end with research ideas, four of which
this library implements as layers and its studies measure:

- **Can the probability integral transform serve as a norm?** (exercise 7, idea 1) Push every
  channel through its own CDF, so that the output is uniform, or normal after $\Phi^{-1}$.
- **Can one use a full-rank covariance estimate?** (idea 2) d2l asks this together with why one
  "should probably not" do it, and leaves the why to the reader. The reasons we found
  (research notes, with their sources): with fewer samples than channels the batch covariance
  has rank at most $n - 1$, so exact whitening is impossible and every implementation adds a
  ridge; gradients through an eigendecomposition divide by differences of eigenvalues and are
  NaN where eigenvalues repeat (torch issues 47599 and 76531); and the $C \times C$
  decomposition costs more than per-channel standardization: DBN [dbn] whitens groups of 16
  channels, IterNorm [iternorm] groups of 64, and IterNorm's README notes that BN runs as one
  fused cuDNN kernel and IterNorm does not.
- **Can one use compact matrix variants** (block-diagonal, low displacement rank, Monarch)?
  (idea 3)
- **Does a sparsification compression act as a regularizer?** (idea 4)

The same exercises ask whether the bias before a norm is needed, how large the learning rate
can get, whether every layer needs a norm, whether BN replaces dropout and whether the learned
scale and shift are needed; fastai's lessons ask how the per-sample norms hold up at small
batches. Each question is one study: a grid of runs over seeds whose report (`exoticnorm
report`) is the source of every number below."""

METHODS = r"""Every norm maps an input $x$ of shape $(N, C, \ldots)$ to $y$ of the same shape, with
statistics over every axis but the channel axis ($M$ values per channel), a learned per-channel
scale $\gamma$ and shift $\beta$, and a ridge $\epsilon$. Norms with batch statistics keep running
averages, $r \leftarrow (1 - m) r + m s$ with momentum $m$, for evaluation.

### Batch normalization and the lite variants

BN [bn]: $y = \gamma \odot (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon} + \beta$ with the batch mean
$\mu_B$ and biased variance $\sigma_B^2$. d2l's lite variants drop one half: mean-only
(`bn-mean`) $y = \gamma \odot (x - \mu_B) + \beta$, variance-only (`bn-var`)
$y = \gamma \odot x / \sqrt{\sigma_B^2 + \epsilon} + \beta$; `bn-frozen` fixes $\gamma = 1$,
$\beta = 0$ and keeps the statistics. `gn`, `ln` and `in` standardize per sample over channel
groups, all channels, or each channel; `running-bn` is fastai's small-batch norm.

### Whitening: ZCA, Cholesky and PCA

Per group of $c$ channels, the batch covariance $\Sigma = \frac{1}{M} \sum_k (x_k - \mu)(x_k - \mu)^\top$
is shrunk toward its mean variance, $\Sigma_\rho = (1 - \rho) \Sigma + \rho \, m I$ with
$m = \operatorname{tr}(\Sigma) / c$ and Ledoit–Wolf's $\rho$ [lw] when a group sees fewer than
$4 c$ samples (else $\rho = 0$). With $\Sigma_\rho = U \operatorname{diag}(\lambda) U^\top$, ZCA whitening
[dbn] is

$$
W = U \operatorname{diag}((\lambda + \epsilon)^{-1/2}) U^\top, \quad y = \gamma \odot W (x - \mu) + \beta .
$$

Any $W$ with $W \Sigma W^\top = I$ whitens; ZCA's is the symmetric one, closest to the identity
[kessy]. The library also offers Cholesky whitening [wmse], $W = L^{-1}$ with
$\Sigma_\rho + \epsilon I = L L^\top$, and PCA whitening, $W = \operatorname{diag}((\lambda + \epsilon)^{-1/2}) U^\top$
with descending eigenvalues and each eigenvector's largest entry made positive.

The backward is the library's own (`exoticnorm/whitening.py`). The large tensors get
hand-written passes, and the small map $(\Sigma, \gamma, \beta) \to (W, b)$ is differentiated
separately; the derivative of $\Sigma^{-1/2}$ is the Daleckii–Krein form written in closed form,
$\bar\Sigma = U (K \odot U^\top \bar G U) U^\top$ with $\bar G$ the symmetric part of
$\partial L / \partial W$ and $K_{ij} = -1 / (s_i s_j (s_i + s_j))$, $s_i = \sqrt{\lambda_i}$: there is
no division by $\lambda_i - \lambda_j$, so repeated or nearly equal eigenvalues give finite, exact
gradients. It is not twice differentiable, and says so instead of returning a wrong second
derivative.

### Compact whitening: block-diagonal, sparse, Monarch, circulant

`block-zca` whitens groups of $c$ consecutive channels on their own ($c = 1$ is BN, $c = C$ is
ZCA). `sparse-zca` keeps the largest fraction $d$ of the off-diagonal entries of $W$ and rescales
each row to unit output variance, $W_s \leftarrow \operatorname{diag}(W_s \Sigma W_s^\top)^{-1/2} W_s$
($d = 0$ is per-channel standardization, $d = 1$ is ZCA), or thresholds the correlations
(Bickel–Levina [bl]) and whitens those. `monarch-zca` is a Monarch-style product [monarch]
$W = P^\top B_2 P B_1$ of two block-whitening stages with a stride permutation $P$ between them,
$O(C^{3/2})$ per sample at blocks of $\sqrt{C}$; it whitens fully only within each second-stage
block. `circulant-zca` assumes a circulant covariance, diagonalized by the DFT over channels:
$W = F^{-1} \operatorname{diag}((\lambda + \epsilon)^{-1/2}) F$ with $\lambda$ the mean power spectrum over
channels, $O(C \log C)$ per sample and no eigendecomposition.

### Group and switchable whitening

Group whitening [gw] is per sample: the sample's values form a $g \times m$ matrix $X$ of channel
groups, each row is centred and the rows are decorrelated, $\hat X = \Sigma_n^{-1/2} (X - \mu 1^\top)$;
nothing depends on the batch. Switchable whitening [sw] whitens with learned softmax mixtures
$\hat\mu = \sum_k \omega_k \mu_k$ and $\hat\Sigma = \sum_k \omega'_k \Sigma_k$ of batch and instance
whitening and BN, IN and LN statistics.

### PIT norm and the running quantile sketch

The PIT norm maps every channel through its CDF: $y = \gamma \odot g(F(x)) + \beta$ with $g$ the
identity (uniform output) or $\Phi^{-1}$ on $F$ clipped to $[t, 1 - t]$ (normal output). In
training $F$ is the batch's CDF on the grid of a running sketch, piecewise linear over pieces of
about $s$ values each, so its slope, the gradient, stays bounded in channels with few values;
ties (the zeros after a ReLU) take their mid-rank. The sketch keeps per channel a CDF on $K$ bins
in the squashed coordinate $u = (1 + z / (1 + |z|)) / 2$, $z = (x - c) / h$, updated by averaging
batch CDFs at shared knots (with a momentum, or cumulatively, then exactly the pooled CDF), and
re-gridded when the centre or scale moves. Sketches on one grid merge exactly by adding counts,
so processes sum theirs. In eval, $F$ comes from the sketch with graded tails."""

LITERATURE_TEXT = r"""Ness et al. [ness] Gaussianized hidden activations through estimated CDFs and report that
it "proves to be ineffective"; this library's PIT norm exists to test that claim on d2l's
setting. The whitening family reports gains on large ImageNet ResNets: DBN [dbn] (ZCA via
SVD, groups of 16 channels), IterNorm [iternorm] (Newton–Schulz iterations
instead of an eigendecomposition), Switchable Whitening [sw] and Group Whitening [gw]; the
research notes add that the reported gains mostly come from whitening one or two layers (the
stem, the layer before the classifier)."""
