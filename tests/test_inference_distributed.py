"""Inference under `DistributedCB`: `torchrun` starts two processes (gloo, CPU) that each predict their share of the
data; `get_preds` and `evaluate` must return, on every process, the results for the whole dataset, in dataset order,
with no item counted twice: equal to what one process computes alone.

This file is also the script that `torchrun` runs (`python tests/test_inference_distributed.py child <dir>`)."""
import os, subprocess, sys
from pathlib import Path
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torcheval.metrics import MulticlassAccuracy
from learnloop.learner import DataLoaders, Learner, TrainCB
from learnloop.metrics import MetricsCB
from learnloop.distributed import DistributedCB
import learnloop.inference  # adds evaluate, get_preds, infer to Learner

N, BS, WORLD = 203, 16, 2  # 203 items: the shares differ in size (102 and 101), the last batches are short

def make_learner(cbs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    ds = TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long())
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.float64)
    dls = DataLoaders(DataLoader(ds, batch_size=BS, shuffle=True), DataLoader(ds, batch_size=BS))
    return Learner(model, dls, F.cross_entropy, cbs=[TrainCB(), MetricsCB(accuracy=MulticlassAccuracy()), *cbs])

def results(learn):
    "What every process must agree on: get_preds with inputs and losses, evaluate, and infer on two items."
    x, preds, targs, losses = learn.get_preds(with_input=True, with_loss=True)
    return {'x': x, 'preds': preds, 'targs': targs, 'losses': losses, 'evaluate': learn.evaluate(),
            'infer': learn.infer(x[:2])}

def child(folder):
    learn = make_learner([DistributedCB()])
    import torch.distributed as dist
    torch.save(results(learn), Path(folder) / f'rank{dist.get_rank()}.pt')
    dist.destroy_process_group()

if __name__ == '__main__' and sys.argv[1:2] == ['child']:
    child(sys.argv[2])
    sys.exit()

def test_get_preds_and_evaluate_on_two_processes_equal_one_process(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(WORLD), __file__,
           'child', str(tmp_path)]
    res = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    alone = results(make_learner([]))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        assert torch.equal(got['x'], alone['x'])  # every item once, in dataset order
        assert torch.equal(got['targs'], alone['targs'])
        assert torch.allclose(got['preds'], alone['preds'], rtol=0, atol=1e-12)
        assert torch.allclose(got['losses'], alone['losses'], rtol=0, atol=1e-12)
        assert got['evaluate'].keys() == alone['evaluate'].keys() == {'loss', 'accuracy'}
        # the mean loss is summed in float32, as MetricsCB sums it, over batches that differ from one process's
        assert abs(got['evaluate']['loss'] - alone['evaluate']['loss']) < 1e-6
        assert got['evaluate']['accuracy'] == alone['evaluate']['accuracy']
        assert torch.equal(got['infer'][0], alone['infer'][0])  # infer: each process its own items, not split
