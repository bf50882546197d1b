"""The fused CPU whitening passes (exoticnorm/whitening_kernel.py) against WhitenBatch (torch ops)
and float64 finite differences."""

import subprocess
import sys

import pytest
import torch

import exoticnorm as en
from exoticnorm import whitening as W
from exoticnorm import whitening_kernel
from exoticnorm.kernels import whiten_cpu
from exoticnorm.whitening_kernel import FusedWhitenBatch, supported

pytestmark = pytest.mark.skipif(whiten_cpu() is None, reason="no C++ compiler: the kernel is not built")

CASES = [((8, 6, 5, 5), 6, 0.1), ((4, 16, 3, 3), 4, 0.0), ((8, 16, 3, 3), 16, "auto"), ((3, 12, 2, 2, 3), 3, 0.2),
         ((5, 8, 9), 8, "auto"), ((4, 14, 3, 3), 7, 0.1)]  # 7: the general loops


def _both(shape, c, shrinkage, dtype=torch.float64, offset=0.0):
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    mix = torch.eye(shape[1], dtype=f64) + 0.4 * torch.randn(shape[1], shape[1], generator=gen, dtype=f64)
    x = torch.einsum("dc,nc...->nd...", mix, torch.randn(shape, generator=gen, dtype=f64)) + offset
    weight = torch.randn(shape[1], generator=gen, dtype=f64)
    bias = torch.randn(shape[1], generator=gen, dtype=f64)
    g = torch.randn(shape, generator=gen, dtype=f64)
    x, weight, bias, g = (t.to(dtype) for t in (x, weight, bias, g))
    spec = W.WhiteningSpec(shrinkage=shrinkage, method="eigh")
    out = {}
    for name, fn in (("torch", W.WhitenBatch), ("fused", FusedWhitenBatch)):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        y, mean, cov, w, rho, *_ = fn.apply(xs, ws, bs, c, spec)
        (y * g).sum().backward()
        out[name] = dict(y=y, mean=mean, cov=cov, w=w, rho=rho, gx=xs.grad, gw=ws.grad, gb=bs.grad)
    return out


@pytest.mark.parametrize("shape,c,shrinkage", CASES)
def test_fused_equals_torch_ops_in_float64(shape, c, shrinkage):
    out = _both(shape, c, shrinkage)
    assert supported(torch.empty(shape, dtype=torch.float64), c, W.WhiteningSpec(shrinkage=shrinkage))
    for key, ref in out["torch"].items():
        torch.testing.assert_close(out["fused"][key].reshape(ref.shape), ref, rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
def test_fused_float32_loses_no_more_than_torch_ops(offset):
    """float32 input at offset ± 1: against the float64 result, the fused passes (shifted sums,
    values centred before they are multiplied) err at most ~2x as much as WhitenBatch, which
    centres the whole batch first (measured: cov 1.0x, y 0.4-1.2x, gx 0.4-1.1x)."""
    out32 = _both((16, 6, 8, 8), 6, 0.0, dtype=torch.float32, offset=offset)
    ref = _both((16, 6, 8, 8), 6, 0.0, dtype=torch.float64, offset=offset)["torch"]
    for key in ("cov", "y", "gx", "gw"):
        fused, plain = ((out32[k][key].double() - ref[key]).abs().max().item() for k in ("fused", "torch"))
        assert fused <= 2.0 * plain + 1e-6, f"{key}: fused {fused:.3g} vs torch ops {plain:.3g}"


def test_fused_gradcheck():
    spec = W.WhiteningSpec(shrinkage=0.1, method="eigh")
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: FusedWhitenBatch.apply(*t, 2, spec)[0], (x, weight, bias))


def test_fused_channels_last_and_no_affine():
    spec = W.WhiteningSpec(shrinkage=0.0, method="eigh")
    x = torch.randn(6, 8, 4, 4, dtype=torch.float64)
    ref = W.WhitenBatch.apply(x, None, None, 4, spec)[0]
    out = FusedWhitenBatch.apply(x.to(memory_format=torch.channels_last), None, None, 4, spec)[0]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,c,shrinkage,why", [
    ((64, 8), 8, 0.0, "2-D input goes to BLAS"),
    ((4, 10, 3, 3), 4, 0.0, "group size does not divide C"),
    ((2, 16, 2, 2), 16, "auto", "8 samples < 4c: Ledoit-Wolf needs the centred samples"),
    ((4, 8, 3, 3), 8, "lw", "Ledoit-Wolf"),
])
def test_unsupported_cases_fall_back(shape, c, shrinkage, why):
    assert not supported(torch.empty(shape), c, W.WhiteningSpec(shrinkage=shrinkage)), why


# --- zca_step: ZCA's training step in one C++ call each way ------------------------------------

from exoticnorm.whitening_kernel import step_shrinkage, zca_plan, zca_step  # noqa: E402

STEP_CASES = [
    ((8, 6, 5, 5), 6, 0.1, "spatial"),      # small c: the map in double loops
    ((6, 16, 3, 3), 4, 0.0, "spatial"),     # 4 groups
    ((4, 40, 3, 3), 40, 0.2, "spatial"),    # c > 32: the map as ATen ops
    ((64, 8), 8, 0.0, "flat"),
    ((40, 12), 5, "auto", "flat"),          # padded last group
    ((30, 12), 12, "lw", "flat"),           # Ledoit–Wolf's rho (c <= 32: (N, C) as rows through the passes)
    ((12, 10), 4, "auto", "flat"),          # 12 < 4c: Ledoit–Wolf over groups, the last one padded
    ((100, 40), 40, "auto", "flat"),        # c > 32, 100 < 4c: Ledoit–Wolf
]


def _step_vs_torch_ops(shape, c, shrinkage, plan, dtype=torch.float64, affine=(True, True), density=1.0):
    gen = torch.Generator().manual_seed(1)
    f64 = torch.float64
    mix = torch.eye(shape[1], dtype=f64) + 0.4 * torch.randn(shape[1], shape[1], generator=gen, dtype=f64)
    x = torch.einsum("dc,nc...->nd...", mix, torch.randn(shape, generator=gen, dtype=f64)).to(dtype)
    params = [torch.randn(shape[1], generator=gen, dtype=f64).to(dtype) if on else None for on in affine]
    g = torch.randn(shape, generator=gen, dtype=f64).to(dtype)
    spec = W.WhiteningSpec(shrinkage=shrinkage, method="eigh", density=density)
    assert zca_plan(x, c, spec) == plan
    out = {}
    for name in ("torch", "step"):
        xs = x.clone().requires_grad_()
        ps = [None if p is None else p.clone().requires_grad_() for p in params]
        if name == "torch":
            y, mean, cov, w, rho, *_ = W.WhitenBatch.apply(xs, *ps, c, spec)
        else:
            y, mean, cov, w, rho = zca_step(xs, *ps, c, spec.eps, step_shrinkage(x, c, spec), plan == "flat",
                                                 density)
        (y * g).sum().backward()
        out[name] = dict(y=y, mean=mean, cov=cov, w=w, rho=rho, gx=xs.grad,
                         **{f"g{i}": p.grad for i, p in enumerate(ps) if p is not None})
    return out


@pytest.mark.parametrize("shape,c,shrinkage,plan", STEP_CASES)
def test_zca_step_equals_torch_ops_in_float64(shape, c, shrinkage, plan):
    out = _step_vs_torch_ops(shape, c, shrinkage, plan)
    for key, ref in out["torch"].items():
        torch.testing.assert_close(out["step"][key].reshape(ref.shape), ref, rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("shape,c,shrinkage,plan", [STEP_CASES[0], STEP_CASES[2], STEP_CASES[4], STEP_CASES[6],
                                                     ((2, 6, 9), 3, 0.0, "spatial"), ((40, 7), 7, 0.0, "flat")])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5])
def test_sparse_zca_step_equals_torch_ops_in_float64(shape, c, shrinkage, plan, density):
    """SparseZCANorm's W (sparsify="whitening"): the kept entries, the row rescaling and the
    backward through both, against autograd through whitening.sparsify."""
    out = _step_vs_torch_ops(shape, c, shrinkage, plan, density=density)
    for key, ref in out["torch"].items():
        torch.testing.assert_close(out["step"][key].reshape(ref.shape), ref, rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{key}: {m}")
    kept = out["step"]["w"] != 0  # W is symmetric: an odd k keeps the tied mirror entry too, on both paths
    assert torch.equal(kept, kept.mT)


def _degenerate(kind, n, channels, gen):
    x = torch.randn(n, channels, dtype=torch.float64, generator=gen)
    if kind == "duplicates":  # pairs of equal channels: repeated eigenvalues of the shrunk covariance
        x[:, 1::2] = x[:, 0::2]
    elif kind == "constant":  # channels without variance
        x[:, :3] = 2.5
    elif kind == "scaled":  # eigenvalues over 12 decades
        x = x * torch.logspace(-6, 6, channels, dtype=torch.float64)
    elif kind == "huge":  # covariance entries ~1e154: their squares overflow unless the solver scales
        x = x * 1e77
    elif kind == "tiny":  # covariance entries ~1e-152 (eps = 0 below): their squares are subnormal
        x = x * 1e-76
    return x


@pytest.mark.parametrize("kind", ["duplicates", "constant", "scaled", "huge", "tiny", "random"])
@pytest.mark.parametrize("c", [1, 2, 5, 16, 32])
def test_zca_step_small_eigh_matches_lapack_on_hard_covariances(kind, c):
    """The c x c maps up to 32 channels use csrc/small_eigh.h (Householder + implicit QR steps)
    instead of LAPACK: W, y and the gradients match the torch ops (torch.linalg.eigh) in float64
    on repeated, zero and widely spread eigenvalues, and at any scale of the data."""
    gen = torch.Generator().manual_seed(c)
    channels = 2 * c if c > 1 else 4
    x = _degenerate(kind, 64, channels, gen)
    weight, bias, g = (torch.randn(s, dtype=torch.float64, generator=gen) for s in (channels, channels, x.shape))
    spec = W.WhiteningSpec(shrinkage=0.1, method="eigh", eps=0.0 if kind == "tiny" else 1e-5)
    out = {}
    for name in ("torch", "step"):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        if name == "torch":
            y, _, _, w, *_ = W.WhitenBatch.apply(xs, ws, bs, c, spec)
        else:
            y, _, _, w, _ = zca_step(xs, ws, bs, c, spec.eps, 0.1, True)
        (y * g).sum().backward()
        out[name] = dict(y=y, w=w, gx=xs.grad, gw=ws.grad, gb=bs.grad)
    for key, ref in out["torch"].items():  # tolerances relative to each tensor's largest entry
        scale = ref.abs().max().item()
        torch.testing.assert_close(out["step"][key].reshape(ref.shape), ref, rtol=1e-9, atol=1e-10 * scale,
                                   msg=lambda m: f"{key}: {m}")


def test_zca_step_non_finite_input_raises_as_lapack():
    """NaN in a batch: the small solver declines and LAPACK's error reaches the norm (which then
    retries with the torch ops, see test_whitening.test_eigh_failure_falls_back_with_warning)."""
    x = torch.randn(32, 8, dtype=torch.float64)
    x[3, 2] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        zca_step(x, None, None, 4, 1e-5, 0.1, True)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_zca_step_without_affine_parts(affine):
    for shape, c, plan in (((8, 6, 4, 4), 3, "spatial"), ((50, 7), 7, "flat")):
        out = _step_vs_torch_ops(shape, c, 0.1, plan, affine=affine)
        for key, ref in out["torch"].items():
            torch.testing.assert_close(out["step"][key].reshape(ref.shape), ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("flat", [False, True])
def test_zca_step_gradcheck(flat):
    shape = (30, 7) if flat else (3, 4, 2, 3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    for density in (1.0, 0.5):
        assert torch.autograd.gradcheck(lambda *t: zca_step(*t, 3 if flat else 2, 1e-5, 0.1, flat, density)[0],
                                        (x, weight, bias))


def test_zca_step_float32_whitens_as_well_as_torch_ops():
    """float32: max|Cov(y) − I| of the one-call step within 2x of the torch ops' (the small map
    runs in double here, so it is usually smaller)."""
    for shape, c, plan in (((64, 16, 6, 6), 16, "spatial"), ((256, 120), 120, "flat"), ((512, 24), 24, "flat")):
        gen = torch.Generator().manual_seed(2)
        mix = torch.eye(shape[1]) + 0.5 * torch.randn(shape[1], shape[1], generator=gen)
        x = torch.einsum("dc,nc...->nd...", mix, torch.randn(shape, generator=gen))
        spec = W.WhiteningSpec(shrinkage=0.0, eps=0.0, method="eigh")
        assert zca_plan(x, c, spec) == plan
        errs = []
        for y in (W.WhitenBatch.apply(x, None, None, c, spec)[0], zca_step(x, None, None, c, 0.0, 0.0, plan == "flat")[0]):
            yv = W.group_view(y.double(), c)
            yc = yv - yv.mean((0, 3), keepdim=True)
            cov = torch.matmul(yc, yc.mT).sum(0) / W.sample_count(yv)
            errs.append((cov - torch.eye(c, dtype=torch.float64)).abs().max().item())
        assert errs[1] <= 2 * errs[0] + 1e-6, f"{shape}: step {errs[1]:.3g} vs torch ops {errs[0]:.3g}"


def test_zca_step_output_may_be_modified_in_place():
    for x in (torch.randn(8, 6, 4, 4, requires_grad=True), torch.randn(32, 6, requires_grad=True)):
        y = zca_step(x, None, None, 6, 1e-5, 0.0, x.ndim == 2)[0]
        assert not y._is_view()
        torch.relu_(y).sum().backward()
        assert torch.isfinite(x.grad).all()


def test_zca_step_plan():
    spec = W.WhiteningSpec()
    assert zca_plan(torch.empty(8, 6, 4, 4), 6, spec) == "spatial"
    assert zca_plan(torch.empty(8, 6), 6, spec) == "flat"
    assert zca_plan(torch.empty(8, 6, 4, 4), 6, W.WhiteningSpec(transform="cholesky")) is None
    assert zca_plan(torch.empty(8, 6, 4, 4), 6, W.WhiteningSpec(method="newton")) is None
    assert zca_plan(torch.empty(8, 6, 4, 4), 6, W.WhiteningSpec(density=0.5)) == "spatial"
    assert zca_plan(torch.empty(8, 6, 4, 4), 6, W.WhiteningSpec(density=0.5, sparsify="covariance")) is None
    assert zca_plan(torch.empty(8, 6, 4, 4, dtype=torch.float16), 6, spec) is None
    assert step_shrinkage(torch.empty(8, 6), 6, spec) == -1.0     # 8 < 4·6: Ledoit–Wolf
    assert step_shrinkage(torch.empty(30, 6), 6, spec) == 0.0
    assert step_shrinkage(torch.empty(30, 6), 6, W.WhiteningSpec(shrinkage=0.3)) == 0.3


MODULE_CASES = [  # norm, input shape: spatial, flat with a padded last group and Ledoit–Wolf, sparsified
    (lambda m: en.ZCANorm(6, momentum=m), (8, 6, 5, 5)),
    (lambda m: en.BlockZCANorm(10, group_size=4, momentum=m), (12, 10)),
    (lambda m: en.SparseZCANorm(8, density=0.5, momentum=m), (6, 8, 4, 4)),
]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", range(len(MODULE_CASES)))
def test_module_step_moves_running_statistics_as_the_torch_path(monkeypatch, case, momentum):
    """The module's fused step moves its running statistics in C++ (``zca_step(running=...)``): the
    same buffers as the Python update over the torch-ops path, to rounding, and their version
    counters bumped, so that the cached eval map follows every training step."""
    make, shape = MODULE_CASES[case]
    gen = torch.Generator().manual_seed(case)
    batches = [torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    probe = torch.randn(shape, generator=gen, dtype=torch.float64)
    norms, evals = {}, {}
    for path in ("step", "torch"):
        if path == "torch":  # the plan says no: the module takes the torch-ops map and the Python update
            monkeypatch.setattr(whitening_kernel, "zca_plan", lambda *a: None)
        norm = make(momentum).double()
        norm._lean = path == "step"  # the lean step calls the C++ step without asking zca_plan
        evals[path] = []
        for x in batches:
            norm.train()
            norm(x)
            norm.eval()
            evals[path].append(norm(probe))  # after every step: a stale cache would repeat the last
        norms[path] = norm
    state = {k: norms["torch"].state_dict()[k] for k in norms["step"].state_dict()}
    for name, value in norms["step"].state_dict().items():
        if name.startswith("running_") or name == "num_batches_tracked":
            torch.testing.assert_close(value, state[name], rtol=1e-10, atol=1e-12, msg=name)
    assert int(norms["step"].num_batches_tracked) == len(batches)
    for a, b in zip(evals["step"], evals["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("layout", ["float16", "strided"])
def test_module_step_updates_buffers_of_another_dtype_or_layout(layout):
    """Buffers kept in another dtype than the input (float16), or strided (as load_state_dict(assign=True)
    can leave them), move in the C++ step as the Python update would."""
    x = torch.randn(16, 6, 4, 4, generator=torch.Generator().manual_seed(3))
    ours, ref = en.ZCANorm(6), en.ZCANorm(6)
    for norm in (ours, ref):
        for name in ("running_mean", "running_cov", "running_shrinkage", "running_whitening"):
            value = getattr(norm, name)
            if layout == "float16":
                setattr(norm, name, value.half())
            elif value.ndim == 3:  # the same values, transposed in memory
                setattr(norm, name, value.mT.contiguous().mT)
    assert layout == "float16" or not ours.running_cov.is_contiguous()
    ours(x)
    _, mean, cov, w, rho, count = ref._stage(x, 6, ref.weight, ref.bias, None)
    tol = dict(rtol=2e-3, atol=1e-3) if layout == "float16" else dict(rtol=1e-6, atol=1e-7)
    for name, value in (("running_mean", mean.flatten()), ("running_cov", cov * count / (count - 1)),
                        ("running_shrinkage", rho), ("running_whitening", w)):
        expected = getattr(ref, name).float().lerp(value.float(), 0.1)
        assert getattr(ours, name).dtype == getattr(ref, name).dtype
        torch.testing.assert_close(getattr(ours, name).float(), expected, **tol, msg=name)
    assert int(ours.num_batches_tracked) == 1


CHECKPOINTED = """
import torch, exoticnorm as en
from torch.utils.checkpoint import checkpoint
torch.set_num_threads(2)  # the deadlock needs a second thread: per-group eigh workers
for norm in (en.BlockZCANorm(16, group_size=4), en.ZCANorm(16), en.SparseZCANorm(16), en.PITNorm(16)):
    norm = norm.double()
    x = torch.randn(8, 16, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for wrap in (lambda f, t: f(t), lambda f, t: checkpoint(f, t, use_reentrant=False)):
        xs = x.clone().requires_grad_()
        wrap(norm, xs).square().sum().backward()
        grads.append(xs.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
print("ok")
"""


def test_steps_under_checkpoint_finish_and_match(tmp_path):
    """Regression: with torch.utils.checkpoint (Python saved-tensor hooks) the per-group eigh workers
    copied the caller's thread-local state, whose Python objects need the GIL the waiting caller held:
    densenet121 (memory_efficient) with block-zca hung. Run in a child with a deadline so a deadlock
    fails here instead of hanging the suite; the checkpointed gradient equals the plain one."""
    out = subprocess.run([sys.executable, "-c", CHECKPOINTED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
