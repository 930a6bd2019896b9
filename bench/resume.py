"""Resuming mid-epoch on the full Fashion-MNIST: `ResumeCB`'s replay against `LoaderStateCB` + torchdata's
`StatefulDataLoader` (13_long_runs), at batch 900 of the 938 of an epoch (batch size 64), the course CNN, one thread.

Two pipelines: `tensors` (the images already in memory, as `fashion_dls` gives them: a batch costs next to nothing)
and `augmented` (each item padded, randomly cropped and flipped, as an image pipeline does; decoding would cost more).
For each: the time from the start of the resumed fit to its first trained batch, and the whole resumed fit (38
batches); both resumes must end with the same weights, bit for bit, as the fit that was never interrupted.

    python bench/resume.py            # needs the full Fashion-MNIST (see 01a_data) and torchdata
"""
import contextlib, io, os, sys, tempfile, time
os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch
import torch.nn.functional as F
from torch import optim
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from learnloop.all import *

torch.set_num_threads(1)

class Augmented(TensorDataset):
    "Each image padded by 2, randomly cropped back to 28x28 and flipped half the time (torch's generator)."
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        x = F.pad(x, (2, 2, 2, 2))
        dx, dy = torch.randint(0, 5, (2,)).tolist()
        x = x[:, dy:dy + 28, dx:dx + 28]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y

class CrashCB(Callback):
    def before_batch(self, learn):
        if learn.iter == 900: raise RuntimeError('killed')

class FirstBatchCB(Callback):
    "The time of the first trained batch's end."
    def __init__(self): self.first = None
    def after_batch(self, learn):
        if self.first is None: self.first = time.perf_counter()

def learner(ds, *cbs):
    torch.manual_seed(42)
    dls = DataLoaders(StatefulDataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return Learner(simple_cnn(), dls, F.cross_entropy, lr=0.1, cbs=[TrainCB(), *cbs], opt_func=partial(optim.SGD, momentum=0.9))

def bench(name, ds, folder):
    straight = learner(ds)
    straight.fit(1, valid=False)
    rows = []
    for how, cbs in [('replay', []), ('StatefulDataLoader', [LoaderStateCB()])]:
        crashed = learner(ds, CheckpointCB(folder + how, every_n_batches=900), *cbs)  # the same callbacks as the resume
        try: crashed.fit(1, valid=False, cbs=CrashCB())
        except RuntimeError: pass
        first = FirstBatchCB()
        learn = learner(ds, ResumeCB(folder + how), first, *cbs)
        with contextlib.redirect_stdout(io.StringIO()):  # ResumeCB's message
            start = time.perf_counter()
            learn.fit(1, valid=False)
            end = time.perf_counter()
        same = all(torch.equal(a, b) for a, b in zip(learn.model.state_dict().values(), straight.model.state_dict().values()))
        rows.append((name, how, first.first - start, end - start, same))
    return rows

if __name__ == '__main__':
    x, y, _, _ = load_fashion_mnist()
    x = ((x.float() / 255 - FASHION_MEAN) / FASHION_STD).unsqueeze(1)
    print(f"resume at batch 900 of {len(range(0, len(x), 64))}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores, 1 thread, load average {os.getloadavg()[0]:.1f}")
    print(f"{'pipeline':>10} {'resume by':>19} {'to 1st batch s':>15} {'resumed fit s':>14}  bitwise equal")
    with tempfile.TemporaryDirectory() as tmp:
        for name, ds in [('tensors', TensorDataset(x, y)), ('augmented', Augmented(x, y))]:
            for row in bench(name, ds, os.path.join(tmp, name)):
                print(f"{row[0]:>10} {row[1]:>19} {row[2]:>15.3f} {row[3]:>14.3f}  {row[4]}")
                sys.stdout.flush()
