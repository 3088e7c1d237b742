"""Helpers for the tests of the PyTorch adapter, and for the worker processes they spawn, which import them by name
(DDP training)."""
import datetime
import pathlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cynorm
from cynorm.adapters.torch import GroupNorm, _eager_verdicts, use_torch_for_small_inputs


def small_conv_net():
    """A conv net normalized by our GroupNorm; build it after seeding torch's RNG to get known weights."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), GroupNorm(2, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def training_batch(batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch_size, 3, 8, 8, generator=generator),
            torch.randn(batch_size, 4, generator=generator))


def train(model, inputs, targets, steps, lr=0.1):
    """Plain SGD on the mean squared error; the mean makes DDP's gradient average equal the full batch's."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    return model


def ddp_train_worker(rank, world_size, init_method, batch_size, steps, result_path):
    """One DDP rank: train on its shard of the batch; rank 0 saves the final state_dict to ``result_path``."""
    # Two processes share two cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    use_torch_for_small_inputs(False)   # (the batch is small: the kernels, as in the test's own process)
    cynorm.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(small_conv_net())
        inputs, targets = training_batch(batch_size)
        shard = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        train(model, inputs[shard], targets[shard], steps)
        if rank == 0:
            torch.save(model.module.state_dict(), result_path)
        # Both ranks tear down together: a rank closing its connections while rank 0 was still saving once
        # aborted the other in gloo ("terminate called without an active exception", SIGABRT in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    finished_marker(result_path, rank).touch()


def finished_marker(result_path, rank):
    """The file a rank creates once its work and its process group are done (see the DDP test)."""
    return pathlib.Path(result_path).with_name(f"rank{rank}.finished")


@pytest.fixture(autouse=True)
def kernels_for_small_inputs():
    """Autouse where imported: the tests' inputs are small, so they run on the kernels, not on the torch functions
    the adapter calls for small inputs by default (tested with the setting on where it matters).  Each test also
    starts without the verdicts that calls of earlier tests kept (which tests of the routes look for)."""
    previous = use_torch_for_small_inputs(False)
    _eager_verdicts.clear()
    yield
    use_torch_for_small_inputs(previous)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The calls of the cynorm kernels, "forward" and "backward", with their arguments.

    Every path to the kernels (the NumPy API, and the adapter's calls on arguments it has checked) ends in
    cynorm._api._run_forward or _run_backward: ``_run_forward(x_address, y_address, size, weight_address,
    bias_address, mean_address, rstd_address, float64, geometry, ...)``.
    """
    calls = {}

    def spy(name, kernel):
        def counted(*args, **kwargs):
            calls.setdefault(name, []).append(args)
            return kernel(*args, **kwargs)
        return counted

    for name in ("forward", "backward"):
        monkeypatch.setattr(cynorm._api, f"_run_{name}", spy(name, getattr(cynorm._api, f"_run_{name}")))
    return calls
