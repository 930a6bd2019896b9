"""Hooks in a compiled model (13_long_runs' `CompileCB`): `Hook` runs its function as plain Python between the compiled
pieces, so `ActivationStatsCB` counts what it counts without compiling: the same statistics as an eager fit, and
dynamo neither recompiles the hook at every batch nor gives up on it (its recompile limit). Here, not in a notebook:
compiling takes seconds and needs a C++ compiler."""
import logging, shutil
import pytest, torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from learnloop.learner import DataLoaders, TrainCB, Learner
from learnloop.hooks import ActivationStatsCB
from learnloop.long_runs import CompileCB

class Recorder(logging.Handler):
    def __init__(self): super().__init__(); self.messages = []
    def emit(self, record): self.messages.append(record.getMessage())

def fit(compiled):
    torch.manual_seed(0)
    x, y = torch.randn(640, 6), torch.randint(0, 3, (640,))
    dls = DataLoaders.from_datasets(TensorDataset(x, y), None, bs=64)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    act = ActivationStatsCB()
    Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[TrainCB(), act] + ([CompileCB()] if compiled else [])).fit(2)
    return act.stats

@pytest.mark.skipif(not (shutil.which('c++') or shutil.which('g++')), reason='torch.compile on a CPU needs a C++ compiler')
def test_compiled_model_keeps_the_hooks_eager():
    torch._dynamo.reset()
    recorder, logger = Recorder(), logging.getLogger('torch._dynamo')
    logger.addHandler(recorder)
    try: compiled = fit(compiled=True)
    finally: logger.removeHandler(recorder)
    assert not [m for m in recorder.messages if 'recompile' in m], recorder.messages
    eager = fit(compiled=False)
    assert compiled.shape == eager.shape == (2, 20, 42)
    torch.testing.assert_close(compiled[..., 2:], eager[..., 2:], rtol=0, atol=0)  # the same counts
    torch.testing.assert_close(compiled[..., :2], eager[..., :2], rtol=1e-5, atol=1e-6)
