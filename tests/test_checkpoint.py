"""Exact resume after a real crash: a training process killed with SIGKILL, at moments chosen by a seed, then resumed
in a new process from its last checkpoint, must end with the same weights, bit for bit, and the same history (every
loss and metric of every epoch, the interrupted one included, `==` on the floats), as a process never killed.

The notebook 09_checkpoint tests the same in one process with exceptions; here nothing runs after the kill (no
`cleanup_*`, no `finally`), as after a preemption or the out-of-memory killer, and the resumed process starts cold."""
import itertools, json, os, random, select, subprocess, sys, textwrap
import pytest, torch
from learnloop.checkpoint import list_checkpoints, load_checkpoint

CHILD = textwrap.dedent('''
    import io, json, os, signal, sys, traceback, torch
    from functools import partial
    import torch.nn.functional as F
    from torch import nn, optim
    from torch.utils.data import TensorDataset
    from torcheval.metrics import MulticlassAccuracy
    from learnloop.callbacks import Callback
    from learnloop.learner import DataLoaders, TrainLearner
    from learnloop.metrics import MetricsCB
    from learnloop.schedulers import fit_one_cycle
    from learnloop.gradients import GradientAccumulationCB
    from learnloop.stopping import EarlyStoppingCB
    from learnloop.checkpoint import CheckpointCB, ResumeCB

    def die(): os.kill(os.getpid(), signal.SIGKILL)

    class KillCB(Callback):
        "SIGKILL this process at `event` of batch `it` of `phase` in `epoch`."
        order = 95  # after CheckpointCB (40): the checkpoint of this batch, if there is one, is on disk
        def __init__(self, event, epoch, phase, it): self.event, self.at = event, (int(epoch), phase, int(it))
        def _maybe_die(self, learn, event):
            if event == self.event and (learn.epoch, learn.phase, learn.iter) == self.at: die()
        def before_batch(self, learn): self._maybe_die(learn, 'before_batch')
        def after_loss(self, learn): self._maybe_die(learn, 'after_loss')
        def after_batch(self, learn): self._maybe_die(learn, 'after_batch')

    def die_at_call(real, n, before=None):
        "`real`, except that its `n`-th call runs `before(*args)` (if given) and SIGKILLs the process."
        calls = [0]
        def patched(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                if before: before(*args)
                die()
            return real(*args, **kwargs)
        return patched

    real_save = torch.save
    def write_half(obj, f, *args):
        buffer = io.BytesIO(); real_save(obj, buffer)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2]); f.flush()

    class CountCB(Callback):
        "Count the training batches actually computed."
        n = 0
        def after_loss(self, learn): self.n += learn.training

    class QuietMetricsCB(MetricsCB):
        def _log(self, d): pass

    def train(folder, out, n_epochs, kill=None):
        "Fit 3 epochs with checkpoints in `folder` ('-': no checkpoint callbacks), save the result to `out`; `kill` says when to die."
        cbs, kill = [], kill.split(':') if kill else None
        if kill and kill[0] == 'replace': os.replace = die_at_call(os.replace, int(kill[1]))  # between write and rename
        elif kill and kill[0] == 'write': torch.save = die_at_call(torch.save, int(kill[1]), write_half)  # mid-write
        elif kill: cbs.append(KillCB(*kill))
        g = torch.Generator().manual_seed(0)
        x, x_valid = torch.randn(200, 10, generator=g), torch.randn(64, 10, generator=g)
        dls = DataLoaders.from_datasets(TensorDataset(x, x[:, :4].argmax(1)), TensorDataset(x_valid, x_valid[:, :4].argmax(1)), bs=16)
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))
        count = CountCB()
        learn = TrainLearner(model, dls, F.cross_entropy, opt_func=partial(optim.SGD, momentum=0.9),
                             cbs=[QuietMetricsCB(accuracy=MulticlassAccuracy(), buffer_size=200),  # 3 batches a flush
                                  GradientAccumulationCB(3), EarlyStoppingCB(patience=10), count])
        if folder != '-': cbs += [ResumeCB(folder), CheckpointCB(folder, every_n_batches=4)]
        learn.fit_one_cycle(int(n_epochs), lr_max=0.05, cbs=cbs)
        real_save({'model': learn.model.state_dict(), 'history': learn.history, 'computed': count.n}, out)

    def serve():
        "For each line of stdin (JSON: argv, stdout, stderr), fork a process that runs `train`; answer with its exit code."
        optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)  # import what a first optimizer imports (torch._dynamo) once
        for line in sys.stdin:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:  # the training process: it shares no training state with anything
                sys.stdout, sys.stderr = open(request['stdout'], 'w'), open(request['stderr'], 'w')
                code = 0
                try: train(*request['argv'])
                except BaseException: traceback.print_exc(); code = 1
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(code)
            print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)

    if __name__ == '__main__':
        if len(sys.argv) > 1: train(*sys.argv[1:])  # a fresh interpreter
        else: serve()
''')
N_EPOCHS, TRAIN_BATCHES, VALID_BATCHES = 3, 13, 2  # 200 samples in batches of 16; 64 in batches of 32

def kill_points(seed):
    "Five moments to kill the training process, drawn with `seed`: right after a checkpoint, between checkpoints, in the middle of a batch, during validation, and anywhere."
    rng = random.Random(seed)
    train = [(e, 'train', i) for e in range(N_EPOCHS) for i in range(TRAIN_BATCHES)]
    valid = [(e, 'valid', i) for e in range(N_EPOCHS) for i in range(VALID_BATCHES)]
    after_save = [p for p in train if (p[2] + 1) % 4 == 0]  # CheckpointCB(every_n_batches=4) saved this batch
    points = [('after_batch', *rng.choice(after_save)), ('before_batch', *rng.choice(train)),
              ('after_loss', *rng.choice(train)), ('after_batch', *rng.choice(valid)),
              (rng.choice(['before_batch', 'after_loss', 'after_batch']), *rng.choice(train + valid))]
    return [':'.join(map(str, p)) for p in points]

@pytest.fixture(scope='module')
def child(tmp_path_factory):
    """Run the training script: `child(folder, out, n_epochs=3, kill=None, fresh=False)` -> a CompletedProcess.

    Starting Python and importing torch takes seconds, so by default each run is a process forked from a server that
    has imported the modules and done nothing else: the run starts with no training state, like a new process, and
    a SIGKILL ends it as it would end a new process. `fresh=True` runs a new interpreter instead."""
    folder = tmp_path_factory.mktemp('child')
    script = folder / 'train.py'
    script.write_text(CHILD)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    server = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    runs = itertools.count()
    def run(ckpt_folder, out, n_epochs=N_EPOCHS, kill=None, fresh=False):
        argv = [str(ckpt_folder), str(out), str(n_epochs)] + ([kill] if kill else [])
        if fresh: return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300, env=env)
        i = next(runs)
        stdout, stderr = folder / f'{i}.out', folder / f'{i}.err'
        server.stdin.write(json.dumps({'argv': argv, 'stdout': str(stdout), 'stderr': str(stderr)}) + '\n')
        server.stdin.flush()
        ready, _, _ = select.select([server.stdout], [], [], 300)
        line = server.stdout.readline() if ready else ''
        assert line, f"the training server died or hung (exit code {server.poll()})"
        return subprocess.CompletedProcess(argv, int(line), stdout.read_text(), stderr.read_text())
    yield run
    server.stdin.close()
    server.wait(timeout=60)

@pytest.fixture(scope='module')
def reference(child, tmp_path_factory):
    "The result of the same fit never interrupted, without any checkpoint callback."
    out = tmp_path_factory.mktemp('reference') / 'result.pt'
    res = child('-', out)
    assert res.returncode == 0, res.stderr
    return torch.load(out, weights_only=True)

def check_same_result(out, reference):
    result = torch.load(out, weights_only=True)
    assert result['model'].keys() == reference['model'].keys()
    for k, v in reference['model'].items(): assert torch.equal(result['model'][k], v), k
    assert result['history'] == reference['history']  # exactly, train_loss and train_accuracy of every epoch included
    return result

@pytest.mark.parametrize('kill', kill_points(seed=2024))
def test_sigkill_then_resume_is_bitwise_equal(child, reference, tmp_path, kill):
    folder, out = tmp_path / 'ckpts', tmp_path / 'result.pt'
    killed = child(folder, out, kill=kill)
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    assert not out.exists()
    saved = list_checkpoints(folder)
    resumed = child(folder, out)
    assert resumed.returncode == 0, resumed.stderr
    result = check_same_result(out, reference)
    if saved:
        assert f"ResumeCB: resuming from {saved[-1]}" in resumed.stdout, resumed.stdout
        assert result['computed'] < reference['computed']  # the batches before the checkpoint were not computed again
    else: assert "starting from scratch" in resumed.stdout, resumed.stdout

def test_kill_between_write_and_rename(child, reference, tmp_path):
    "Killed in `os.replace` of the third save: the complete new file is still under its temporary name."
    folder, out = tmp_path / 'ckpts', tmp_path / 'result.pt'
    assert child(folder, out, kill='replace:3').returncode == -9
    names = sorted(f.name for f in folder.iterdir())
    assert names[2:] == ['ckpt-e0000-b000004.pt', 'ckpt-e0000-b000008.pt'], names
    assert names[0].startswith('.ckpt-e0000-b000012.pt.') and names[0].endswith('.tmp') and len(names) == 4
    assert names[1] == '.lock'  # left by the killed process: the next fit takes it over
    assert load_checkpoint(folder)['batch'] == 8  # the newest complete checkpoint reads fine

    wrong = child(folder, out, n_epochs=N_EPOCHS + 1)  # the most likely mistake when resuming
    assert wrong.returncode != 0
    assert "was saved by a fit of 3 epochs, but this fit has 4: resume with the same number" in wrong.stderr, wrong.stderr
    assert sorted(f.name for f in folder.iterdir()) == names  # and it changed nothing

    resumed = child(folder, out)
    assert resumed.returncode == 0, resumed.stderr
    check_same_result(out, reference)
    assert not any(f.name.endswith('.tmp') for f in folder.iterdir())  # the next fit deleted the leftover
    assert 'which is no longer running: taking over' in resumed.stderr, resumed.stderr  # the killed process's lock
    assert not (folder / '.lock').exists()

    again = child(folder, out)  # a finished fit resumes to nothing, and ends as it ended
    assert again.returncode == 0, again.stderr
    assert "is the end of a finished fit of 3 epochs: nothing to do" in again.stdout
    assert check_same_result(out, reference)['computed'] == 0

def test_kill_in_the_middle_of_a_write(child, reference, tmp_path):
    "Killed after writing half of the fifth checkpoint: the half-written file never gets a checkpoint's name."
    folder, out = tmp_path / 'ckpts', tmp_path / 'result.pt'
    assert child(folder, out, kill='write:5', fresh=True).returncode == -9  # this time, new interpreters
    assert [f.name for f in list_checkpoints(folder)] == ['ckpt-e0000-b000012.pt', 'ckpt-e0001-b000000.pt']
    temp = [f for f in folder.iterdir() if f.name.endswith('.tmp')]
    assert len(temp) == 1 and temp[0].name.startswith('.ckpt-e0001-b000004.pt.') and temp[0].stat().st_size > 0
    resumed = child(folder, out, fresh=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 1 (epochs 0 to 2), at its start" in resumed.stdout, resumed.stdout
    check_same_result(out, reference)

HOLDER = textwrap.dedent('''
    import sys, torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset
    from learnloop.callbacks import Callback
    from learnloop.learner import DataLoaders, TrainLearner
    from learnloop.checkpoint import CheckpointCB

    class PauseCB(Callback):
        "After the first training batch (its checkpoint is saved), say so and wait for a line on stdin."
        order = 50
        def after_batch(self, learn):
            if learn.training and learn.epoch == 0 and learn.iter == 0:
                print('holding', flush=True)
                sys.stdin.readline()

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    dls = DataLoaders.from_datasets(TensorDataset(x, x.sum(1, keepdim=True)), bs=16)
    TrainLearner(nn.Linear(4, 1), dls, F.mse_loss).fit(2, cbs=[CheckpointCB(sys.argv[1], every_n_batches=1, keep=100), PauseCB()])
''')

def test_a_second_process_on_the_same_folder_refuses_to_start(tmp_path):
    "A process fits with CheckpointCB; while it runs, a fit in this process on the same folder refuses to start, and"
    "changes nothing; the first one ends normally, with all its checkpoints, and unlocks the folder."
    from torch import nn
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset
    from learnloop.learner import DataLoaders, TrainLearner
    from learnloop.checkpoint import CheckpointCB
    script, folder = tmp_path / 'holder.py', tmp_path / 'ckpts'
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 300)
        assert ready and holder.stdout.readline().strip() == 'holding', holder.stderr.read()
        saved = sorted(f.name for f in folder.iterdir())
        assert saved == ['.lock', 'ckpt-e0000-b000001.pt'], saved
        x = torch.randn(32, 4)
        second = TrainLearner(nn.Linear(4, 1), DataLoaders.from_datasets(TensorDataset(x, x), bs=16), F.mse_loss)
        with pytest.raises(RuntimeError, match=f"CheckpointCB: .* is in use by another fit \\(process {holder.pid} holds"):
            second.fit(1, cbs=CheckpointCB(folder))
        assert sorted(f.name for f in folder.iterdir()) == saved  # the refused fit wrote and deleted nothing
        holder.stdin.write('\n')
        holder.stdin.flush()
        assert holder.wait(timeout=300) == 0, holder.stderr.read()
    finally:
        if holder.poll() is None: holder.kill()
    names = [f.name for f in list_checkpoints(folder)]
    assert len(names) == 10 and names[-1] == 'ckpt-e0002-b000000.pt', names  # 4 batches and the end, in 2 epochs
    assert not (folder / '.lock').exists()
