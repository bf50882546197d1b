"""Synced statistics across processes (whitening, PIT, the batch norms): 2 gloo ranks with unequal
batches equal one process on the concatenated batch."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import exoticnorm as en

SIZES = (5, 11)  # unequal per-rank batches


def _data():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 6, 3, 3, generator=gen, dtype=torch.float64) for n in SIZES]
    mix = torch.eye(6, dtype=torch.float64) + 0.5 * torch.ones(6, 6, dtype=torch.float64)
    xs = [torch.einsum("dc,nchw->ndhw", mix, x) + 2.0 for x in xs]
    gs = [torch.randn(n, 6, 3, 3, generator=gen, dtype=torch.float64) for n in SIZES]
    return xs, gs


def _norm(name):
    kw = {"group_size": 4} if name == "block-zca" else {}
    return en.create_norm(name, 6, method="eigh", **kw).double()


def _worker(rank, world, init_file, out_dir, name):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        xs, gs = _data()
        m = _norm(name)
        outs = []
        for _ in range(2):  # the second step shifts by the (synced) running mean
            x = xs[rank].clone().requires_grad_()
            y = m(x)
            (y * gs[rank]).sum().backward()
            outs.append((y.detach(), x.grad))
        torch.save({"outs": outs, "mean": m.running_mean, "cov": m.running_cov}, f"{out_dir}/{rank}.pt")
    finally:
        dist.barrier()  # neither rank tears down while the other still talks
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["zca", "block-zca"])
def test_two_gloo_ranks_equal_one_process(tmp_path, name):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), name), nprocs=2,
                       join=True, start_method="spawn")
    xs, gs = _data()
    m = _norm(name)
    expected = []
    for step in range(2):
        x = torch.cat(xs).requires_grad_()
        y = m(x)
        (y * torch.cat(gs)).sum().backward()
        expected.append((y.detach(), x.grad))
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for step in range(2):
        y = torch.cat([r["outs"][step][0] for r in ranks])
        gx = torch.cat([r["outs"][step][1] for r in ranks])
        torch.testing.assert_close(y, expected[step][0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(gx, expected[step][1], atol=1e-10, rtol=1e-10)
    for r in ranks:
        torch.testing.assert_close(r["mean"], m.running_mean, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(r["cov"], m.running_cov, atol=1e-10, rtol=1e-10)


def _pit_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        xs, _ = _data()
        m = en.PITNorm(6, momentum=None).double()
        ys = [m(xs[rank] + step).detach() for step in range(2)]
        torch.save({"ys": ys, "sketch": m.sketch.state_dict()}, f"{out_dir}/pit{rank}.pt")
    finally:
        dist.barrier()  # neither rank tears down while the other still talks
        dist.destroy_process_group()


def test_pit_sketch_merges_across_gloo_ranks(tmp_path):
    mp.start_processes(_pit_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    xs, _ = _data()
    m = en.PITNorm(6, momentum=None).double()
    expected = [m(torch.cat(xs) + step).detach() for step in range(2)]
    ranks = [torch.load(tmp_path / f"pit{r}.pt") for r in range(2)]
    for step in range(2):
        torch.testing.assert_close(torch.cat([r["ys"][step] for r in ranks]), expected[step])
    for r in ranks:
        for key, value in m.sketch.state_dict().items():
            torch.testing.assert_close(r["sketch"][key], value, msg=key, equal_nan=True)


BATCH_NORMS = ("bn", "bn-mean", "bn-var", "bn-frozen", "running-bn")


def _bn_steps(name, xs, gs):
    """Two training steps (the second shifted by the running mean) and one eval step of norm
    ``name``: per step the output, the input's gradient and the parameters' gradients; then
    the buffers."""
    torch.manual_seed(0)
    m = en.create_norm(name, 6).double()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    steps = []
    for step, training in enumerate((True, True, False)):
        m.train(training)
        m.zero_grad()
        x = (xs + step).requires_grad_()
        y = m(x)
        (y * gs).sum().backward()
        steps.append((y.detach(), x.grad, [p.grad.clone() for p in m.parameters()]))
    return steps, {k: v.clone() for k, v in m.state_dict().items()}


def _bn_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        xs, gs = _data()
        torch.save({n: _bn_steps(n, xs[rank], gs[rank]) for n in BATCH_NORMS}, f"{out_dir}/bn{rank}.pt")
    finally:
        dist.barrier()  # neither rank tears down while the other still talks
        dist.destroy_process_group()


def test_batch_norms_sync_like_sync_batchnorm_across_gloo_ranks(tmp_path):
    """bn and its variants, running-bn: 2 ranks with unequal batches train as one process on the
    concatenated batch (torch.nn.SyncBatchNorm's semantics, which itself needs a GPU): outputs,
    input gradients, parameter gradients summed over ranks, running statistics; eval is local."""
    mp.start_processes(_bn_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    xs, gs = _data()
    ranks = [torch.load(tmp_path / f"bn{r}.pt") for r in range(2)]
    for name in BATCH_NORMS:
        steps, state = _bn_steps(name, torch.cat(xs), torch.cat(gs))
        for step, (y, gx, gp) in enumerate(steps):
            parts = [r[name][0][step] for r in ranks]
            msg = lambda m: f"{name} step {step}: {m}"  # noqa: E731
            torch.testing.assert_close(torch.cat([p[0] for p in parts]), y, atol=1e-10, rtol=1e-10, msg=msg)
            torch.testing.assert_close(torch.cat([p[1] for p in parts]), gx, atol=1e-10, rtol=1e-10, msg=msg)
            for i, g in enumerate(gp):
                torch.testing.assert_close(parts[0][2][i] + parts[1][2][i], g, atol=1e-10, rtol=1e-10, msg=msg)
        for r in ranks:
            for key, value in state.items():
                torch.testing.assert_close(r[name][1][key], value, atol=1e-10, rtol=1e-10, msg=f"{name} {key}")
