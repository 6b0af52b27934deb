"""`fit` under torch.distributed, without Ray: two gloo processes on this machine.

After one optimizer step, rank 0's weights must equal one step taken with the AVERAGE of the
two ranks' gradients, each computed on that rank's own half of the global batch (with its own
BatchNorm statistics, as DDP computes them). Gradients that are not averaged, or two ranks
reading the same shard, give other weights. Only rank 0 evaluates and writes the run folder.
"""
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from c40.checkpoint import load_checkpoint
from c40.config import TrainConfig
from c40.loaders import epoch_indices
from c40.run import setup_run
from c40.train import fit


def _cfg(data, out) -> TrainConfig:
    # 64 images, global batch 64: exactly one step (2 x 32); fp32 and no low-res epoch, so the
    # reference below computes the same numbers
    return TrainConfig.from_recipe("fast", data=str(data), out=str(out), device="cpu", epochs=1,
                                   subset=64, batch_size=64, width=0.5, test_subset=64, amp="off",
                                   low_res_frac=0.0, tta=False, seed=7)


def _worker(rank: int, port: int, data: str, out: str, results: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    try:
        res = fit(_cfg(data, out), progress=False)
        with open(f"{results}.{rank}", "w") as f:
            json.dump({"accuracy": res.accuracy, "history": res.history}, f)
    finally:
        torch.distributed.destroy_process_group()


def _reference_step(data, out) -> tuple[dict, list[set]]:
    """One SGD step with the mean of the ranks' own gradients, in this process; and the
    dataset indices each rank's loader draws. One thread, as the workers: oneDNN picks other
    conv algorithms for 2 threads (measured: 1e-4 apart after one step; equal at 1 thread)."""
    runs = [setup_run(_cfg(data, out), torch.device("cpu"), r, 2) for r in (0, 1)]
    grads, shards = [], []
    for run in runs:
        x, y = next(iter(run.train_loader))
        shards.append(set(epoch_indices(64, run.train_loader.spec, 0).tolist()))
        loss = torch.nn.functional.cross_entropy(run.model(x), y, label_smoothing=run.cfg.label_smoothing)
        trained = [p for p in run.model.parameters() if p.requires_grad]  # not the whitening
        grads.append(torch.autograd.grad(loss, trained))
    model, opt = runs[0].model, runs[0].opt
    for p, g0, g1 in zip([p for p in model.parameters() if p.requires_grad], *grads):
        p.grad = (g0 + g1) / 2
    opt.step()
    return model.state_dict(), shards


@pytest.mark.slow
def test_ddp_averages_gradients_across_two_processes(tiny_cifar, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, results = tmp_path / "run", str(tmp_path / "result")
    mp.start_processes(_worker, args=(port, str(tiny_cifar), str(out), results), nprocs=2,
                       start_method="spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref, (shard0, shard1) = _reference_step(tiny_cifar, tmp_path / "ref")
    finally:
        torch.set_num_threads(threads)
    assert len(shard0) == len(shard1) == 32 and not shard0 & shard1  # each rank its own half
    ddp = load_checkpoint(out / "checkpoint.pt")["model"]
    for k, v in ddp.items():
        if v.is_floating_point() and "running" not in k:  # BN running stats: rank 0's own batch
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    r0, r1 = (json.load(open(f"{results}.{r}")) for r in (0, 1))
    assert 0 <= r0["accuracy"] <= 1 and "test_acc" in r0["history"][-1]
    assert r1["accuracy"] != r1["accuracy"] and "test_acc" not in r1["history"][-1]  # NaN: rank 1
    assert r0["history"][-1]["train_loss"] != r1["history"][-1]["train_loss"]  # own shard each
