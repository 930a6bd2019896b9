"""A real Ctrl-C (SIGINT) at an arbitrary moment of a fit must leave the learner usable.

The notebook 01_learner tests a KeyboardInterrupt raised by a callback; here the signal comes from outside, as from
a keyboard, at times that do not line up with any event, in a separate process."""
import subprocess, sys, textwrap
import pytest

CHILD = textwrap.dedent('''
    import os, signal, sys, threading, torch
    import torch.nn.functional as F
    from torch import nn
    from learnloop.learner import DataLoaders, Learner, TrainCB
    from learnloop.callbacks import Callback

    class CleanupCB(Callback):
        started = cleaned = False
        def before_fit(self, learn): self.started = True
        def cleanup_fit(self, learn): self.cleaned = True

    torch.manual_seed(0)
    x = torch.randn(20000, 32); y = x @ torch.randn(32, 1)
    dls = DataLoaders.from_datasets(torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x[:4000], y[:4000]), bs=32)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)).eval()
    learn = Learner(model, dls, F.mse_loss, lr=0.01, cbs=[TrainCB()])
    small = DataLoaders(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=32))
    Learner(nn.Linear(32, 1), small, F.mse_loss, cbs=[TrainCB()]).fit(1)  # warm up torch's lazy imports
    cleanup = CleanupCB()
    threading.Timer(float(sys.argv[1]), lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    try:
        learn.fit(100, cbs=[cleanup])
        print("NOT INTERRUPTED")
    except KeyboardInterrupt:
        print("phase", "train" if getattr(learn, "dl", None) is dls.train else "valid")
    assert len(learn.cbs) == 1 and isinstance(learn.cbs[0], TrainCB), learn.cbs
    assert cleanup.started and cleanup.cleaned
    assert not model.training          # the mode it had before the fit
    assert torch.is_grad_enabled()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    learn.dls = small
    learn.fit(1)                         # the learner trains again
    print("OK")
''')

@pytest.mark.parametrize("delay", [0.3, 0.55, 0.8, 1.1, 1.45])
def test_sigint_mid_fit_leaves_a_working_learner(tmp_path, delay):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    res = subprocess.run([sys.executable, str(script), str(delay)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert "NOT" not in lines and lines[-1] == "OK", res.stdout
