"""`DistributedCB` for real: `torchrun` starts two processes that train together on the CPU (gloo).

Two processes with per-process batches of 8 must train exactly like one process whose batches of 16 hold the same
samples: rank 0's batch then rank 1's, in `DistributedSampler`'s order. This file is also the script that `torchrun`
runs (`python tests/test_distributed.py child <mode> <dir>`), so both sides share the data, model and callbacks."""
import os, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from torcheval.metrics import MulticlassAccuracy
from learnloop.callbacks import Callback, CancelStepException
from learnloop.learner import DataLoaders, Learner, TrainCB
from learnloop.metrics import MetricsCB, CSVLoggerCB
from learnloop.progress import ProgressCB
from learnloop.stopping import EarlyStoppingCB, SaveBestModelCB
from learnloop.gradients import GradientAccumulationCB, MixedPrecisionCB
from learnloop.checkpoint import CheckpointCB, ResumeCB

N_TRAIN, N_VALID, BS, WORLD, SEED = 91, 37, 8, 2, 3  # 91 samples: DistributedSampler pads one, the last batch is short

def dataset(n, seed, dtype=torch.float64):
    "`n` points in 6-d, in 3 classes."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    return TensorDataset(x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long())

def make_model(dtype=torch.float64):
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)

def make_learner(cbs, train_dl, dtype=torch.float64):
    valid_dl = DataLoader(dataset(N_VALID, 1, dtype), batch_size=2 * BS)
    return Learner(make_model(dtype), DataLoaders(train_dl, valid_dl), F.cross_entropy, lr=0.5,
                   cbs=[TrainCB(), MetricsCB(accuracy=MulticlassAccuracy()), *cbs])

class AccumulateCB(Callback):
    "Course style: step every `n` batches on the sum of their gradients; say so in `learn.accumulating` (for DDP)."
    def __init__(self, n): self.n = n
    def before_batch(self, learn):
        learn.accumulating = (learn.iter + 1) % self.n != 0 and learn.iter + 1 < len(learn.dl)
    def after_backward(self, learn):
        if learn.accumulating: raise CancelStepException()

class SyncSpyCB(Callback):
    "After each backward, record whether the gradients are the same on every process (i.e. were synced)."
    order = -1  # before AccumulateCB's after_backward, which raises
    def before_fit(self, learn): self.synced = []
    def after_backward(self, learn):
        import torch.distributed as dist
        grads = torch.cat([p.grad.flatten() for p in learn.model.parameters()])
        everyone = [torch.zeros_like(grads) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, grads)
        self.synced.append(all(torch.equal(g, grads) for g in everyone))

def runs(distributed_cb=None, rank=0):
    "The fits we compare, by name: (callbacks, dtype, epochs). `distributed_cb` makes a `DistributedCB` (torchrun)."
    extra = (lambda: [distributed_cb()]) if distributed_cb else (lambda: [])
    return {
        'plain': ([*extra(), ProgressCB(plot=True, plot_path=f'plot_{rank}.png'), CSVLoggerCB(f'history_{rank}.csv')],
                  torch.float64, 2),
        'grad_accumulation': ([*extra(), GradientAccumulationCB(2)], torch.float64, 2),
        'no_sync': ([*extra(), AccumulateCB(2), SyncSpyCB()] if distributed_cb else [AccumulateCB(2)], torch.float64, 2),
        'early_stop': ([*extra(), EarlyStoppingCB(patience=1, threshold=10.), SaveBestModelCB(f'best_{rank}.pt')],
                       torch.float64, 4),
        'bfloat16': ([*extra(), MixedPrecisionCB(torch.bfloat16)], torch.float32, 1),
    }

def fit_all(make_train_dl, distributed_cb=None, rank=0):
    "Run every fit of `runs`; return its final weights, history, and the SyncSpyCB's record."
    results = {}
    for name, (cbs, dtype, epochs) in runs(distributed_cb, rank).items():
        learn = make_learner(cbs, make_train_dl(dtype), dtype)
        learn.fit(epochs)
        spy = [cb for cb in cbs if isinstance(cb, SyncSpyCB)]
        results[name] = {'weights': {k: v.clone() for k, v in learn.model.state_dict().items()},
                         'history': learn.history, 'synced': spy[0].synced if spy else None,
                         'model_type': type(learn.model).__name__}
    return results

def resume_mid_epoch(train_dl, distributed_cb):
    "Fit 2 epochs saving checkpoints (on rank 0), then again from the one after batch 4 of epoch 1: both final states."
    learn = make_learner([distributed_cb(), CheckpointCB('ckpt', every_n_batches=4, keep=10)], train_dl)
    learn.fit(2)
    resumed = make_learner([distributed_cb(), ResumeCB('ckpt/ckpt-e0001-b000004.pt')], train_dl)
    with torch.no_grad():
        for p in resumed.model.parameters(): p.add_(1.)  # other weights: only a real resume can end like `learn`
    resumed.fit(2)
    return final_states(uninterrupted=learn, resumed=resumed)

def final_states(**learners): return {k: {'weights': l.model.state_dict(), 'history': l.history} for k, l in learners.items()}

class CrashCB(Callback):
    "Raise an error before training batch `at[1]` of epoch `at[0]`, in every process: the machine dies."
    def __init__(self, at): self.at = at
    def before_batch(self, learn):
        if learn.training and (learn.epoch, learn.iter) == self.at: raise RuntimeError("the machine died")

def crash_and_restart(train_dl, distributed_cb):
    "Fit 2 epochs saving every 4 batches, dying before batch 5 of epoch 1; then again, restarted from the folder."
    crashed = make_learner([distributed_cb(), CheckpointCB('crash', every_n_batches=4)], train_dl)
    with pytest.raises(RuntimeError, match='the machine died'): crashed.fit(2, cbs=CrashCB(at=(1, 5)))
    restarted = make_learner([distributed_cb(), CheckpointCB('crash', every_n_batches=4), ResumeCB('crash')], train_dl)
    restarted.fit(2)
    return final_states(restarted=restarted)

def resume_mid_accumulation(train_dl, distributed_cb):
    "Fit 2 epochs accumulating 2 batches, saving after 3 batches (inside a group); again from epoch 1's: both final states."
    cbs = lambda *more: [distributed_cb(), GradientAccumulationCB(2), *more]
    learn = make_learner(cbs(CheckpointCB('acc', every_n_batches=3, keep=10)), train_dl)
    learn.fit(2)
    resumed = make_learner(cbs(ResumeCB('acc/ckpt-e0001-b000003.pt')), train_dl)
    resumed.fit(2)
    return final_states(uninterrupted=learn, resumed=resumed)

# ---- the torchrun side
def child(mode, out):
    from learnloop.distributed import DistributedCB, init_distributed
    import torch.distributed as dist
    timeout = 3 if mode == 'stuck' else 60
    init_distributed(timeout=timeout)
    rank = dist.get_rank()
    if mode == 'train':
        train_dl = lambda dtype: DataLoader(dataset(N_TRAIN, 0, dtype), batch_size=BS, shuffle=True)
        results = fit_all(train_dl, lambda: DistributedCB(seed=SEED), rank)
        results['resumed'] = resume_mid_epoch(train_dl(torch.float64), lambda: DistributedCB(seed=SEED))
        (Path(out) / 'more').mkdir(exist_ok=True)
        os.chdir(Path(out) / 'more')  # the folders of these fits stay out of the work folder, whose files a test lists
        results['restarted'] = crash_and_restart(train_dl(torch.float64), lambda: DistributedCB(seed=SEED))
        results['resumed_accumulating'] = resume_mid_accumulation(train_dl(torch.float64), lambda: DistributedCB(seed=SEED))
        torch.save(results, Path(out) / f'results_{rank}.pt')
    elif mode == 'uneven':  # rank 1 has fewer training samples: 4 batches instead of 6
        train_dl = DataLoader(dataset(N_TRAIN - 40 * rank, 0), batch_size=BS, shuffle=True)
        make_learner([DistributedCB()], train_dl).fit(1)
    elif mode == 'stuck':  # rank 1 never starts the fit
        if rank == 1: time.sleep(60)
        train_dl = DataLoader(dataset(N_TRAIN, 0), batch_size=BS, shuffle=True)
        make_learner([DistributedCB(timeout=timeout)], train_dl).fit(1)
    dist.destroy_process_group()

if __name__ == '__main__' and sys.argv[1:2] == ['child']:
    child(*sys.argv[2:])
    sys.exit()

# ---- the pytest side
def torchrun(mode, tmp_path):
    "Run this file's `child(mode)` in 2 processes; return the result, the work folder and each rank's stdout, stderr."
    work, logs = tmp_path / 'work', tmp_path / 'logs'
    work.mkdir()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(WORLD),
           '--log-dir', str(logs), '--redirects', '3', __file__, 'child', mode, str(tmp_path)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=240)
    out = {r: {s: next(logs.glob(f'**/attempt_0/{r}/{s}.log')).read_text() for s in ('stdout', 'stderr')}
           for r in range(WORLD)}
    return res, work, out

class GlobalBatches:
    "The global batches of `WORLD` processes: rank 0's batch of `DistributedSampler`'s order, then rank 1's..."
    def __init__(self, n): self.n, self.epoch = n, 0
    def shards(self):
        samplers = [DistributedSampler(range(self.n), WORLD, r, shuffle=True, seed=SEED) for r in range(WORLD)]
        for s in samplers: s.set_epoch(self.epoch)
        return [list(s) for s in samplers]
    def __len__(self): return -(-len(self.shards()[0]) // BS)
    def __iter__(self):
        shards = self.shards()
        self.epoch += 1
        for i in range(0, len(shards[0]), BS): yield [j for shard in shards for j in shard[i:i + BS]]

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "Train with torchrun (2 processes) and in this process (the reference); both ranks' results, the reference's."
    tmp_path = tmp_path_factory.mktemp('ddp')
    res, work, out = torchrun('train', tmp_path)
    assert res.returncode == 0, f"{res.stderr[-3000:]}\n{out[0]['stderr'][-3000:]}\n{out[1]['stderr'][-3000:]}"
    ranks = [torch.load(tmp_path / f'results_{r}.pt', weights_only=True) for r in range(WORLD)]
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp('reference'))
    try: reference = fit_all(lambda dtype: DataLoader(dataset(N_TRAIN, 0, dtype), batch_sampler=GlobalBatches(N_TRAIN)))
    finally: os.chdir(cwd)
    return ranks, reference, work, out

def assert_same_weights(a, b, eps):
    assert a.keys() == b.keys()
    for k in a: assert (a[k] - b[k]).abs().max() < eps, (k, (a[k] - b[k]).abs().max())

@pytest.mark.parametrize('name', ['plain', 'grad_accumulation', 'no_sync', 'early_stop'])
def test_two_processes_train_like_one_with_the_same_global_batches(trained, name):
    ranks, reference, _, _ = trained
    for r in (0,) if name == 'early_stop' else range(WORLD):  # rank 0 loads the best weights back, not the others
        assert_same_weights(ranks[r][name]['weights'], reference[name]['weights'], 1e-6)
    assert max((reference[name]['weights'][k] - v).abs().max() for k, v in make_model().state_dict().items()) > 1e-2

@pytest.mark.parametrize('name', ['plain', 'grad_accumulation', 'no_sync', 'early_stop', 'bfloat16'])
def test_every_rank_reports_the_same_global_metrics(trained, name):
    ranks, reference, _, _ = trained
    assert ranks[0][name]['history'] == ranks[1][name]['history']  # exactly: the same bits
    history, ref = ranks[0][name]['history'], reference[name]['history']
    assert [row['epoch'] for row in history] == [row['epoch'] for row in ref]
    for row, ref_row in zip(history, ref):
        tol = 1e-2 if name == 'bfloat16' else 1e-6
        if name != 'bfloat16': assert row['valid_accuracy'] == ref_row['valid_accuracy']  # 37 samples, each once
        for k in ('valid_loss', 'train_loss'): assert abs(row[k] - ref_row[k]) < tol, (k, row[k], ref_row[k])

def test_the_model_comes_back_unwrapped_and_ranks_end_equal(trained):
    ranks, _, _, _ = trained
    for name in ['plain', 'grad_accumulation', 'no_sync', 'bfloat16']:
        assert ranks[0][name]['model_type'] == 'Sequential'
        assert_same_weights(ranks[0][name]['weights'], ranks[1][name]['weights'], 1e-12)

def test_early_stopping_stops_every_rank_at_the_same_epoch(trained):
    ranks, _, _, _ = trained
    assert [len(ranks[r]['early_stop']['history']) for r in range(WORLD)] == [2, 2]  # fit(4) stopped after epoch 1

def test_resume_from_a_checkpoint_mid_epoch_on_every_rank(trained):
    ranks, _, _, out = trained
    for r in range(WORLD):
        uninterrupted = ranks[r]['resumed']['uninterrupted']
        # from a chosen checkpoint, and after a crash from the folder's newest (fits of the same data and model)
        for resumed in (ranks[r]['resumed']['resumed'], ranks[r]['restarted']['restarted']):
            for k, v in uninterrupted['weights'].items(): assert torch.equal(v, resumed['weights'][k]), (r, k)
            # the same history to the bit, the resumed epoch's training metrics included: every rank got its part back
            assert resumed['history'] == uninterrupted['history'], (r, resumed['history'], uninterrupted['history'])
    assert 'ResumeCB: resuming from ckpt/ckpt-e0001-b000004.pt' in out[0]['stdout']
    assert 'ResumeCB: resuming from crash/ckpt-e0001-b000004.pt' in out[0]['stdout']

def test_resume_in_the_middle_of_a_gradient_accumulation(trained):
    ranks, _, work, _ = trained
    for r in range(WORLD):  # each rank's own unsynced gradients came back: the same weights and history, to the bit
        fits = ranks[r]['resumed_accumulating']
        for k, v in fits['uninterrupted']['weights'].items(): assert torch.equal(v, fits['resumed']['weights'][k]), (r, k)
        assert fits['resumed']['history'] == fits['uninterrupted']['history'], r
    folder = work.parent / 'more' / 'acc'
    grads = torch.load(folder / 'ckpt-e0001-b000003.pt', weights_only=True)['cbs']['DistributedCB']['rank_grads']
    assert len(grads) == WORLD and not torch.equal(grads[0]['0.weight'], grads[1]['0.weight'])
    state = torch.load(folder / 'ckpt-e0001-b000006.pt', weights_only=True)['cbs']['DistributedCB']
    assert state == {'train_epochs': 1}  # after a step: no gradients to keep

def test_a_checkpoint_mid_epoch_holds_every_ranks_part_of_the_phase(trained):
    _, _, work, _ = trained
    state = torch.load(work / 'ckpt' / 'ckpt-e0001-b000004.pt', weights_only=True)['cbs']['MetricsCB']
    assert 'phase' not in state and len(state['rank_phases']) == WORLD
    parts = state['rank_phases']
    assert [(part['epoch'], part['name'], sum(part['sizes'])) for part in parts] == [(1, 'train', 4 * BS)] * WORLD
    assert not torch.equal(torch.cat(parts[0]['targs']), torch.cat(parts[1]['targs']))  # each rank's own samples

def test_no_gradient_sync_on_accumulation_steps(trained):
    ranks, _, _, _ = trained
    # 6 batches per epoch, a step every 2: the 1st, 3rd and 5th backward are not synced, the others are
    assert ranks[0]['no_sync']['synced'] == [False, True] * 6
    assert ranks[1]['no_sync']['synced'] == ranks[0]['no_sync']['synced']

def test_only_rank_0_writes_files_and_prints(trained):
    ranks, _, work, out = trained
    assert sorted(p.name for p in work.iterdir()) == ['best_0.pt', 'ckpt', 'history_0.csv', 'plot_0.png']
    from learnloop.utils import load_checked  # SaveBestModelCB's file: {'model': weights} and a checksum
    assert load_checked(work / 'best_0.pt')['model'].keys() == ranks[0]['early_stop']['weights'].keys()  # no 'module.' prefix
    assert 'train_accuracy' in out[0]['stdout'] and 'EarlyStoppingCB: stopping' in out[0]['stdout']
    assert out[1]['stdout'] == ''
    lines = (work / 'history_0.csv').read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith('epoch,train_loss')

def test_different_batch_counts_fail_clearly_on_every_rank(tmp_path):
    res, _, out = torchrun('uneven', tmp_path)
    assert res.returncode != 0
    for r in range(WORLD):
        assert 'the processes would not run the same fit' in out[r]['stderr'], out[r]['stderr'][-2000:]
        assert "'training batches per epoch': 6" in out[r]['stderr'] and "'training batches per epoch': 4" in out[r]['stderr']

def test_a_stuck_rank_gives_a_timeout_error_not_a_hang(tmp_path):
    res, _, out = torchrun('stuck', tmp_path)
    assert res.returncode != 0
    assert 'Timed out' in out[0]['stderr'] and 'DistributedCB.before_fit' in out[0]['stderr'], out[0]['stderr'][-2000:]

def test_the_example_script_runs_on_two_processes(tmp_path):
    script = Path(__file__).resolve().parent.parent / 'examples' / 'train_ddp.py'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(WORLD), str(script),
           '--epochs', '1']
    res = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith('2 processes, global batch 64:') and float(last.split()[-1]) > 0.5, res.stdout
    assert res.stdout.count('train_loss') == 1  # one table: rank 0's
