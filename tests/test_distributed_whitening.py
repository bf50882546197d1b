"""The new whitening norms across processes: 2 gloo ranks with unequal batches equal one process
on the concatenated batch (forward, input gradient and running statistics), in one spawn."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import exoticnorm as en
from test_distributed import _data  # the same unequal per-rank batches (5 and 11 samples)

CASES = {
    "zca-cholesky": ("zca", {"transform": "cholesky"}),
    "block-zca-pca": ("block-zca", {"group_size": 4, "transform": "pca"}),
    "monarch-zca": ("monarch-zca", {"block_size": 2}),
    "circulant-zca": ("circulant-zca", {}),
    "switchable-whitening": ("switchable-whitening", {"group_size": 4}),
}


def _norm(case):
    name, kw = CASES[case]
    torch.manual_seed(0)
    m = en.create_norm(name, 6, **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    return m


def _steps(m, xs, gs):
    outs = []
    for _ in range(2):  # the second step shifts by the (synced) running mean
        x = xs.clone().requires_grad_()
        y = m(x)
        (y * gs).sum().backward()
        outs.append((y.detach(), x.grad))
    return outs


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        xs, gs = _data()
        result = {}
        for case in CASES:
            m = _norm(case)
            result[case] = {"outs": _steps(m, xs[rank], gs[rank]), "buffers": dict(m.named_buffers()),
                            "grads": {n: p.grad for n, p in m.named_parameters()}}
        torch.save(result, f"{out_dir}/{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    xs, gs = _data()
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for case in CASES:
        m = _norm(case)
        expected = _steps(m, torch.cat(xs), torch.cat(gs))
        for step in range(2):
            y = torch.cat([r[case]["outs"][step][0] for r in ranks])
            gx = torch.cat([r[case]["outs"][step][1] for r in ranks])
            torch.testing.assert_close(y, expected[step][0], atol=1e-10, rtol=1e-10, msg=f"{case} y")
            torch.testing.assert_close(gx, expected[step][1], atol=1e-9, rtol=1e-9, msg=f"{case} grad x")
        for r in ranks:
            for name, value in m.named_buffers():
                torch.testing.assert_close(r[case]["buffers"][name], value, atol=1e-10, rtol=1e-10,
                                           msg=f"{case} {name}")
        # parameter gradients: each rank holds its part; summed they are the one-process gradient
        for name, p in m.named_parameters():
            total = sum(r[case]["grads"][name] for r in ranks)
            torch.testing.assert_close(total, p.grad, atol=1e-9, rtol=1e-9, msg=f"{case} grad {name}")
