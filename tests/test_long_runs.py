"""A job with the callbacks of 13_long_runs, killed with SIGKILL and resumed in a new process, ends as the job that
was never killed: the same weights bit for bit, the same history, the same TensorBoard curves (no gap, no point
twice); with `LoaderStateCB` and a `StatefulDataLoader` the resumed process reads only the batches it trains on,
without it `ResumeCB` replays the epoch, with the same result.

13_long_runs tests the same in one process with exceptions; here nothing runs after the kill (no `cleanup_*`, no
`finally`, the TensorBoard writer is not closed) and the resumed process starts cold."""
import random, subprocess, sys, textwrap
import pytest, torch

CHILD = textwrap.dedent('''
    import json, os, signal, sys, torch
    from functools import partial
    import torch.nn.functional as F
    from torch import nn, optim
    from torch.utils.data import TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torcheval.metrics import MulticlassAccuracy
    from learnloop.callbacks import Callback
    from learnloop.learner import DataLoaders, TrainCB, Learner
    from learnloop.metrics import MetricsCB
    from learnloop.schedulers import RecorderCB
    from learnloop.gradients import GradientAccumulationCB
    from learnloop.checkpoint import CheckpointCB, ResumeCB
    from learnloop.long_runs import LimitBatchesCB, LoaderStateCB, ReduceLROnPlateauCB, TensorBoardCB

    class CountingDataset(TensorDataset):
        reads = 0
        def __getitem__(self, i):
            CountingDataset.reads += 1
            return super().__getitem__(i)

    class KillCB(Callback):
        "SIGKILL this process before training batch `it` of `epoch`."
        order = 95
        def __init__(self, epoch, it): self.at = (epoch, it)
        def before_batch(self, learn):
            if learn.training and (learn.epoch, learn.iter) == self.at: os.kill(os.getpid(), signal.SIGKILL)

    class QuietMetricsCB(MetricsCB):
        def _log(self, d): pass

    folder, out, loader_state, kill = sys.argv[1], sys.argv[2], sys.argv[3] == '1', sys.argv[4]
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(400, 10, generator=g), torch.randn(64, 10, generator=g)
    train = StatefulDataLoader(CountingDataset(x, x[:, :4].argmax(1)), batch_size=16, shuffle=True,
                               generator=torch.Generator().manual_seed(1))
    dls = DataLoaders(train, StatefulDataLoader(TensorDataset(xv, xv[:, :4].argmax(1)), batch_size=32))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))
    cbs = [TrainCB(), QuietMetricsCB(accuracy=MulticlassAccuracy()), RecorderCB(), GradientAccumulationCB(2),
           LimitBatchesCB(train=20), ReduceLROnPlateauCB(patience=0, factor=0.5, threshold=0.05),
           TensorBoardCB(f'{folder}/runs', every_n_steps=3), ResumeCB(f'{folder}/ckpts'),
           CheckpointCB(f'{folder}/ckpts', every_n_batches=4)]
    if loader_state: cbs.append(LoaderStateCB())
    if kill != '-': cbs.append(KillCB(*map(int, kill.split(','))))
    learn = Learner(model, dls, F.cross_entropy, lr=0.2, cbs=cbs, opt_func=partial(optim.SGD, momentum=0.9))
    learn.fit(4)
    torch.save({'model': learn.model.state_dict(), 'history': learn.history, 'reads': CountingDataset.reads}, out)
''')

def run(tmp_path, folder, loader_state, kill='-'):
    "Run the child job in `folder` (under tmp_path); its exit code and its result file."
    (tmp_path / 'child.py').write_text(CHILD)
    out = tmp_path / f'{folder}.pt'
    done = subprocess.run([sys.executable, 'child.py', folder, str(out), '1' if loader_state else '0', kill],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return done, out

def scalars(log_dir):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}

# seeded kill points (epoch, training batch) after at least one checkpoint: mid-epoch, right after a checkpoint
KILLS = [f'{e},{b}' for e, b in random.Random(15).sample([(e, b) for e in range(4) for b in range(20) if (e, b) >= (0, 5)], 1)] + ['2,8']

@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('straight')
    done, out = run(tmp, 'straight', True)
    assert done.returncode == 0, done.stderr
    return torch.load(out), scalars(tmp / 'straight' / 'runs')

@pytest.mark.parametrize('loader_state', [True, False], ids=['restore', 'replay'])
@pytest.mark.parametrize('kill', KILLS)
def test_killed_job_resumes_exactly(tmp_path, straight, kill, loader_state):
    reference, reference_scalars = straight
    killed, _ = run(tmp_path, 'job', loader_state, kill)
    assert killed.returncode == -9, killed.stderr
    resumed, out = run(tmp_path, 'job', loader_state)
    assert resumed.returncode == 0, resumed.stderr
    result = torch.load(out)
    assert all(torch.equal(result['model'][k], v) for k, v in reference['model'].items())
    assert result['history'] == reference['history']
    assert scalars(tmp_path / 'job' / 'runs') == reference_scalars
    epoch, batch = map(int, kill.split(','))
    saved = batch // 4 * 4  # the checkpoint the resume started from: every 4 batches, and at each epoch's end
    left = 4 * 20 - (20 * epoch + saved)  # training batches still to do (20 per epoch with LimitBatchesCB)
    assert result['reads'] == (left if loader_state else left + saved) * 16, (result['reads'], left, saved)
