"""Whitening statistics across processes: 2 gloo ranks with unequal batches equal one process."""


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
