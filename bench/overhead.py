"""How much does learnloop cost over a hand-written PyTorch loop? Run: `python bench/overhead.py`.

One process, CPU, one thread. Three variants train the same MLP on the same data in the same order, interleaved and
repeated; we report the median time per training batch (the whole 3-epoch fit, validation included, divided by the
number of training batches) and the ratio to the hand-written loop:
- raw: the five steps by hand, plus a validation loop with on-device accuracy and one `.item()` per epoch;
- learnloop-bare: `TrainLearner` and no callbacks;
- learnloop-default: `[TrainCB(), DeviceCB(), MetricsCB(accuracy=MulticlassAccuracy()), ProgressCB()]`, output to a null stream;
- default+stats: the default stack plus `ActivationStatsCB()` (a forward hook on each of the three linear layers);
  the script also prints what it adds over the default stack.
All variants must end with bitwise-equal weights and the same validation accuracy: otherwise the timing compares
different work, and the script says so and exits 1.

Then inference: `learn.get_preds()` on the validation set (2048 rows, batches of 128 and 1024) against a hand-written
`torch.no_grad()` loop over the same DataLoader that collects the predictions and the targets; both must return
bitwise-equal tensors."""
import argparse, contextlib, os, platform, statistics, sys, time
from functools import partial
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset
from torcheval.metrics import MulticlassAccuracy
from learnloop.learner import DataLoaders, TrainCB, TrainLearner, Learner
from learnloop.metrics import MetricsCB
from learnloop.device import DeviceCB
from learnloop.progress import ProgressCB
import learnloop.inference  # Learner.get_preds
from learnloop.hooks import ActivationStatsCB

EPOCHS, LR, MOM = 3, 0.1, 0.9

def make_data(seed=0):
    "8192 train + 2048 valid rows of 64 features, 10 classes given by a random linear teacher."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8192 + 2048, 64, generator=g)
    y = (x @ torch.randn(64, 10, generator=g)).argmax(dim=1)
    return TensorDataset(x[:8192], y[:8192]), TensorDataset(x[8192:], y[8192:])

def make_model(): return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

def make_dls(train_ds, valid_ds, bs):
    return DataLoaders(DataLoader(train_ds, batch_size=bs, shuffle=True), DataLoader(valid_ds, batch_size=bs * 2))

def raw(model, dls):
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOM)
    for epoch in range(EPOCHS):
        model.train()
        for xb, yb in dls.train:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
            for xb, yb in dls.valid:
                preds = model(xb)
                loss_sum += F.cross_entropy(preds, yb) * len(yb)
                correct += (preds.argmax(dim=1) == yb).sum()
            stats = torch.stack([loss_sum / len(dls.valid.dataset), correct / len(dls.valid.dataset)]).tolist()  # the one sync
    return stats

def bare(model, dls):
    TrainLearner(model, dls, F.cross_entropy, lr=LR, opt_func=partial(optim.SGD, momentum=MOM)).fit(EPOCHS)

def default(model, dls, *extra):
    cbs = [TrainCB(), DeviceCB('cpu'), MetricsCB(accuracy=MulticlassAccuracy()), ProgressCB(), *extra]
    with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        Learner(model, dls, F.cross_entropy, lr=LR, cbs=cbs, opt_func=partial(optim.SGD, momentum=MOM)).fit(EPOCHS)

def default_stats(model, dls): default(model, dls, ActivationStatsCB())

VARIANTS = {'raw': raw, 'learnloop-bare': bare, 'learnloop-default': default, 'default+stats': default_stats}

def valid_accuracy(model, ds):
    with torch.no_grad(): return (model(ds.tensors[0]).argmax(dim=1) == ds.tensors[1]).float().mean().item()

def run(variant, dls, seed=1):
    "Train a fresh model with `variant`; return seconds and the trained model."
    torch.manual_seed(seed)              # same initial weights and the same shuffling for every variant
    model = make_model()
    start = time.perf_counter()
    VARIANTS[variant](model, dls)
    return time.perf_counter() - start, model

def hand_preds(model, dl):
    "The hand-written inference loop: eval mode, no gradients, predictions and targets concatenated."
    model.eval()
    with torch.no_grad():
        preds, targs = [], []
        for xb, yb in dl:
            preds.append(model(xb))
            targs.append(yb)
        out = torch.cat(preds), torch.cat(targs)
    model.train()
    return out

def time_inference(model, dls, repeats, calls=20):
    "Median seconds per call of the hand loop and of `get_preds` (interleaved), and whether they agree bitwise."
    learn = Learner(model, dls, F.cross_entropy, cbs=[TrainCB(), DeviceCB('cpu'), MetricsCB(accuracy=MulticlassAccuracy())])
    ways = {'hand-written': lambda: hand_preds(model, dls.valid), 'get_preds': learn.get_preds}
    times, results = {name: [] for name in ways}, {}
    for rep in range(repeats + 1):  # the first round warms up
        for name, way in ways.items():
            start = time.perf_counter()
            for _ in range(calls): results[name] = way()
            if rep: times[name].append((time.perf_counter() - start) / calls)
    same = all(torch.equal(a, b) for a, b in zip(results['hand-written'], results['get_preds']))
    return {name: statistics.median(t) for name, t in times.items()}, same

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=5, help='interleaved repeats (median taken), default 5')
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_ds, valid_ds = make_data()
    times = {(bs, v): [] for bs in (64, 512) for v in VARIANTS}
    final = {}
    for bs in (64, 512): run('raw', make_dls(train_ds, valid_ds, bs))  # warm-up: lazy imports, allocator
    for rep in range(args.repeats):
        for bs in (64, 512):
            dls = make_dls(train_ds, valid_ds, bs)
            for variant in VARIANTS:
                seconds, model = run(variant, dls)
                times[bs, variant].append(seconds / (EPOCHS * len(dls.train)))
                final[bs, variant] = model
    print(f"learnloop overhead, {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.processor() or ''}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread, median of {args.repeats}")
    print(f"{'batch size':>10} {'variant':<18} {'µs/train batch':>15} {'x raw':>7} {'valid acc':>10}")
    ok = True
    for bs in (64, 512):
        base = statistics.median(times[bs, 'raw'])
        for variant in VARIANTS:
            med = statistics.median(times[bs, variant])
            acc = valid_accuracy(final[bs, variant], valid_ds)
            same = all(torch.equal(a, b) for a, b in zip(final[bs, variant].parameters(), final[bs, 'raw'].parameters()))
            ok &= same
            print(f"{bs:>10} {variant:<18} {med * 1e6:>15.1f} {med / base:>7.3f} {acc:>10.4f}{'' if same else '  DIFFERENT WEIGHTS'}")
        stats_cost = statistics.median(times[bs, 'default+stats']) / statistics.median(times[bs, 'learnloop-default']) - 1
        target = ' (target: at most +15 % at batch size 64)' if bs == 64 else ''
        print(f"{'':>10} ActivationStatsCB over the default stack: {stats_cost * 100:+.1f} %{target}")
    print(f"\n{'valid batch':>11} {'inference':<14} {'ms/call':>9} {'x hand':>7}")
    for bs in (64, 512):
        dls = make_dls(train_ds, valid_ds, bs)
        medians, same = time_inference(final[bs, 'raw'], dls, args.repeats)
        ok &= same
        for name, med in medians.items():
            print(f"{bs * 2:>11} {name:<14} {med * 1e3:>9.3f} {med / medians['hand-written']:>7.3f}{'' if same else '  DIFFERENT RESULTS'}")
    if not ok: sys.exit("the variants did not compute the same results: the comparison is not fair")

if __name__ == '__main__': main()
