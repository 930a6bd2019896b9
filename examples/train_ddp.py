"""Train the course's CNN on the embedded Fashion-MNIST sample, on one process or on several.

    python examples/train_ddp.py                            # one process
    torchrun --nproc_per_node 2 examples/train_ddp.py       # two processes (DDP), on CPUs (gloo) or GPUs (NCCL)

The global batch is `--bs` whatever the number of processes: each of N processes takes batches of bs/N, so
both commands train on the same batches and reach about the same accuracy. Only rank 0 prints."""
import argparse, time
import torch
import torch.distributed as dist
from torcheval.metrics import MulticlassAccuracy
from learnloop.all import *

def main(epochs=3, bs=64, lr=0.1):
    init_distributed()  # joins the process group under torchrun; does nothing otherwise
    n = num_processes()
    if bs % n: raise SystemExit(f"--bs {bs} must be a multiple of the number of processes ({n})")
    torch.manual_seed(42)  # the same initial weights on every process (DDP also copies rank 0's to the others)
    dls = fashion_dls(bs=bs // n)
    cbs = [TrainCB(), DeviceCB(), DistributedCB(), MetricsCB(accuracy=MulticlassAccuracy()), ProgressCB()]
    learn = Learner(simple_cnn(), dls, F.cross_entropy, lr=lr, cbs=cbs, opt_func=partial(optim.SGD, momentum=0.9))
    start = time.time()
    learn.fit(epochs)
    if is_main_process():
        print(f"{n} process{'es' if n > 1 else ''}, global batch {bs}: {time.time() - start:.1f} s, "
              f"valid accuracy {learn.history[-1]['valid_accuracy']:.3f}")
    if dist.is_initialized(): dist.destroy_process_group()

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--bs', type=int, default=64, help='the global batch size, split between the processes')
    parser.add_argument('--lr', type=float, default=0.1)
    main(**vars(parser.parse_args()))
