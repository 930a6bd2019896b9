"""torch.compile with `CompileCB` (13_long_runs) against eager, on one CPU thread: the benchmark MLP of
bench/overhead.py (64-128-128-10, 8192 random rows, batch 64) and the course CNN on the Fashion-MNIST sample
(3000 images, batch 64). For each: the first epoch (compiling included: inductor writes and builds C++ for the
training step, then for validation), and the median time per training batch of the next epochs (the fit's time,
validation included, divided by its training batches) in wall time and in this process's CPU time (which other
jobs on a busy machine do not inflate; the compiler's own processes are not in it), each variant in a fresh process so that no compiled code
is reused. Inductor caches compiled kernels on disk: a second run of this script compiles faster; `--cold` points
the cache at a new temporary folder.

    python bench/compile.py [--cold]
"""
import argparse, json, os, subprocess, sys, tempfile, time

CHILD = r'''
import json, sys, time, torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import TensorDataset
from functools import partial
from learnloop.all import *
torch.set_num_threads(1)
model_name, compiled, epochs = sys.argv[1], sys.argv[2] == '1', int(sys.argv[3])
if model_name == 'mlp':
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192 + 2048, 64, generator=g)
    y = (x @ torch.randn(64, 10, generator=g)).argmax(dim=1)
    dls = DataLoaders.from_datasets(TensorDataset(x[:8192], y[:8192]), TensorDataset(x[8192:], y[8192:]), bs=64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
else:
    dls = fashion_dls(bs=64)
    torch.manual_seed(0)
    model = simple_cnn()
learn = TrainLearner(model, dls, F.cross_entropy, lr=0.1, opt_func=partial(optim.SGD, momentum=0.9),
                     cbs=[CompileCB()] if compiled else [])
times, cpu = [], []
for epoch in range(epochs):
    start, start_cpu = time.perf_counter(), time.process_time()
    learn.fit(1)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
print(json.dumps({'times': times, 'cpu': cpu, 'batches': len(dls.train)}))
'''

def run(model, compiled, epochs, env):
    out = subprocess.run([sys.executable, '-c', CHILD, model, '1' if compiled else '0', str(epochs)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

if __name__ == '__main__':
    parser = argparse.ArgumentParser()
    parser.add_argument('--cold', action='store_true', help="compile with an empty inductor cache")
    parser.add_argument('--epochs', type=int, default=6)
    args = parser.parse_args()
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    tmp = tempfile.TemporaryDirectory()
    if args.cold: env['TORCHINDUCTOR_CACHE_DIR'] = tmp.name
    import torch
    print(f"CompileCB vs eager, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} cores, 1 thread, "
          f"{'cold' if args.cold else 'warm'} inductor cache, median of epochs 2-{args.epochs}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':>5} {'variant':>8} {'1st epoch s':>12} {'ms/batch after':>15} {'x eager':>8} {'CPU ms/batch':>13} {'x eager':>8}")
    for model in ['mlp', 'cnn']:
        wall, cpu = {}, {}
        for compiled in [False, True]:
            r = run(model, compiled, args.epochs, env)
            wall[compiled], cpu[compiled] = (sorted(t[1:])[len(t[1:]) // 2] / r['batches'] * 1000 for t in (r['times'], r['cpu']))
            name = 'compiled' if compiled else 'eager'
            print(f"{model:>5} {name:>8} {r['times'][0]:>12.2f} {wall[compiled]:>15.3f} {wall[compiled] / wall[False]:>8.3f} "
                  f"{cpu[compiled]:>13.3f} {cpu[compiled] / cpu[False]:>8.3f}")
            sys.stdout.flush()
    tmp.cleanup()
