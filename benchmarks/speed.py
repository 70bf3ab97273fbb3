"""How fast VISPA trains and evaluates here, beside the way the authors' code runs.

One table per model, three modes measured side by side in the same process:

  (a) reference: the authors' way of running - torchvision DataLoader with PIL
      transforms in worker processes (started before the timing, which favours
      (a): the authors' code starts them every epoch), float32, the network in
      the default memory format, torch's default SGD update, loss and accuracy
      read on the host after every step (each ``.item()`` waits for the device),
      evaluation in test batches of 256 running the whole network L times per
      batch;
  (b) default: what ``python main.py`` does - the dataset on the device with batch
      augmentation there, channels_last and the fused update on CUDA, metrics
      accumulated on the device (read once per epoch), evaluation in batches of
      1000 computing ResNet18's stem once per batch instead of L times;
  (c) bf16: (b) with ``--bf16`` (bfloat16 autocast in the forward passes).

Rows: training images/s, seconds per training epoch (50k images), seconds of the
L-sample evaluation of 10k images, seconds per full epoch (training +
evaluation), a training step with the batch already on the device (compare
VISPA.md's 22.9 ms / 20.5 ms for the authors' code on an H200), peak memory, the
500-epoch run. Then the checkpoint written every epoch, in the training loop and
from the background writer main.py uses.

The data are CIFAR-100-shaped random images. On a GPU the defaults are the real
sizes (50k training / 10k test images, width 64, L = 40), one round. On the CPU
they are reduced so that the run takes minutes (width 8, 1280 / 256 images, L =
40), and the modes run three rounds in turn, the table showing the best of each
row (a shared CPU's other load is not the code's); per-epoch figures are then
scaled linearly to 50k / 10k images and marked "extrapolated".

On an H100 / H200 (about 3-4 minutes):

    python benchmarks/speed.py                                  # the tables
    python benchmarks/speed.py --models resnet18 --concurrent 5 # five seeds on one GPU

and, for the concurrent runs with CUDA MPS (kernels of the five processes then run
side by side instead of taking turns):

    nvidia-cuda-mps-control -d
    python benchmarks/speed.py --models resnet18 --concurrent 5
    echo quit | nvidia-cuda-mps-control

On the CPU: ``python benchmarks/speed.py`` (a few minutes on 2 otherwise idle cores).
"""
import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main  # noqa: E402  (the repository root is on the path only now)
from data import NUM_CLASSES, normalize  # noqa: E402
from models import MODELS, build_model  # noqa: E402
from optim import VISPA, learning_rate  # noqa: E402
from utils import checkpoint  # noqa: E402

FULL_TRAIN, FULL_TEST, EPOCHS = 50_000, 10_000, 500
BATCH, REFERENCE_TEST_BATCH, EVAL_BATCH = 256, 256, 1000
RECIPE = dict(dataset="cifar100", lr=0.1, momentum=0.9, wd=5e-4, K=8, scale=100.0,
              projection="none", batch_size=BATCH)
# size defaults: (on CUDA, on the CPU)
SIZES = {"train_images": (FULL_TRAIN, 1280), "test_images": (FULL_TEST, 256),
         "width": (64, 8), "steps": (50, 2), "repeats": (1, 3)}
MODES = {"a": "(a) reference", "b": "(b) default", "c": "(c) bf16"}
NO_STOP = SimpleNamespace(signum=None)


def no_progress(iterable, description):
    return iterable


# ---- the authors' way of running ---------------------------------------------------------

def build_reference(name, width, device):
    """The network as the authors' code holds it (default memory format) and VISPA with
    torch's default SGD update (multi-tensor on CUDA)."""
    model = build_model(name, NUM_CLASSES[RECIPE["dataset"]], width).to(device)
    opt = VISPA(model.parameters(), lr=RECIPE["lr"], momentum=RECIPE["momentum"],
                weight_decay=RECIPE["wd"], K=RECIPE["K"], S=RECIPE["scale"], fused=False)
    return model, opt


def reference_train(model, opt, batches, lr_at, device):
    """The authors' training loop: every batch copied to the device, float32, and the
    loss and top-1 accuracy read on the host after every step."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for i, (images, labels) in enumerate(batches):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        opt.zero_grad()
        with opt.sampled_params(train=True):
            output = model(images)
            loss = F.cross_entropy(output, labels)
            loss.backward()
        opt.step()
        loss_sum += loss.item() * len(labels)
        correct += (output.argmax(1) == labels).sum().item()
        seen += len(labels)
    return loss_sum / seen, 100.0 * correct / seen


@torch.no_grad()
def reference_evaluate(model, opt, batches, L, device):
    """The authors' evaluation: the whole network L times per test batch, each pass with
    fresh draws; accuracy of the averaged logits, read on the host per batch."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits_sum, batch_loss = 0.0, 0.0
        for _ in range(L):
            with opt.sampled_params():
                output = model(images)
            logits_sum = logits_sum + output
            batch_loss = batch_loss + F.cross_entropy(output, labels)
        loss_sum += (batch_loss / L).item() * len(labels)
        correct += (logits_sum.argmax(1) == labels).sum().item()
        seen += len(labels)
    return loss_sum / seen, 100.0 * correct / seen


# ---- one mode ------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, work):
    """Seconds ``work()`` takes on ``device`` (waiting for queued kernels at both ends)."""
    synchronize(device)
    began = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - began


class PeakMemory:
    """Peak device memory on CUDA; on the CPU the process's peak resident memory
    (VmHWM, reset through /proc/self/clear_refs), which leaves out DataLoader worker
    processes; None where neither can be read."""

    def __init__(self, device):
        self.device = device

    def reset(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def mib(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024
        except (OSError, AttributeError):
            return None


def trained_images(n, batch):
    """Images in one training epoch: both loaders drop a last batch of one image."""
    return n - 1 if n % batch == 1 and n > 1 else n


def warm_batches(images, labels, batch, device, memory_format):
    """A full batch and, if the dataset leaves one, a batch of the last size: running
    them first lets cuDNN pick its algorithms for both shapes before timing."""
    sizes = [min(batch, len(labels))]
    if len(labels) % batch > 1:
        sizes.append(len(labels) % batch)
    return [(normalize(images[:n].to(device)).contiguous(memory_format=memory_format),
             labels[:n].to(device)) for n in sizes]


def measure(mode, name, data, args, device, peak):
    """Train one epoch and evaluate once in ``mode``; returns the figures of one column."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(0)
    peak.reset()
    settings = dict(RECIPE, model=name, width=args.width,
                    eval_batch_size=REFERENCE_TEST_BATCH if mode == "a" else EVAL_BATCH,
                    loader="torchvision" if mode == "a" else "device")
    if mode == "a":
        model, opt = build_reference(name, args.width, device)
        memory_format = torch.contiguous_format
    else:
        model, opt = main.build(settings, device)
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    train_loader, test_loader = main.loaders(settings, data, device, args.workers)
    steps = len(train_loader)
    lr_at = lambda it: learning_rate(it, RECIPE["lr"], 5 * steps, EPOCHS * steps)
    bf16 = mode == "c"

    if mode == "a":
        train = lambda batches: reference_train(model, opt, batches, lr_at, device)
        evaluate = lambda batches, L: reference_evaluate(model, opt, batches, L, device)
    else:
        train = lambda batches: main.train_one_epoch(model, opt, batches, lr_at, 0, device,
                                                     bf16, NO_STOP, no_progress)
        evaluate = lambda batches, L: main.evaluate(model, opt, batches, L, device, bf16)

    # warm-up, then one training step after another on a batch already on the device
    batch = settings["batch_size"]
    train(warm_batches(train_x, train_y, batch, device, memory_format))
    evaluate(warm_batches(test_x, test_y, settings["eval_batch_size"], device, memory_format), 1)
    on_device = warm_batches(train_x, train_y, batch, device, memory_format)[:1] * args.steps
    step_s = timed(device, lambda: train(on_device)) / args.steps

    # one epoch through the mode's loaders; (a)'s worker processes are started before
    # (the authors' code starts them every epoch: leaving that out favours (a))
    for loader in (train_loader, test_loader):
        next(iter(loader))
    train_s = timed(device, lambda: train(train_loader))
    eval_s = timed(device, lambda: evaluate(test_loader, args.L))
    trained = trained_images(len(train_y), batch)
    result = {"images_per_s": trained / train_s,
              "train_s": train_s * FULL_TRAIN / trained,
              "eval_s": eval_s * FULL_TEST / len(test_y),
              "step_ms": 1000 * step_s,
              "peak_mib": peak.mib()}
    result["epoch_s"] = result["train_s"] + result["eval_s"]
    result["run_h"] = EPOCHS * result["epoch_s"] / 3600
    if mode == "b":
        result["checkpoint"] = measure_checkpoint(model, opt)
    del train_loader, test_loader  # ends the DataLoader's worker processes
    return result


def measure_checkpoint(model, opt):
    """Seconds the training loop spends on one per-epoch checkpoint (network, distribution
    and momenta): written in the loop, and handed to the background writer."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    folder = tempfile.mkdtemp(prefix=".speed-", dir=os.path.join(ROOT, "results"))
    try:
        path = os.path.join(folder, "checkpoint.pth.tar")
        began = time.perf_counter()
        checkpoint.save_atomic(state, path)
        in_loop = time.perf_counter() - began
        size = os.path.getsize(path)
        saver = checkpoint.BackgroundSaver()
        began = time.perf_counter()
        saver.submit([(state, path)])
        blocked = time.perf_counter() - began
        saver.wait()
        beside = time.perf_counter() - began
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"mb": size / 1e6, "in_loop_s": in_loop, "blocked_s": blocked, "beside_s": beside}


# ---- printing ------------------------------------------------------------------------------

def machine(device):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = re.search(r"model name\s*:\s*(.+)", f.read()).group(1)
        except (OSError, AttributeError):
            pass
    return (f"device {device} ({name}); {cpus} CPU cores available, {torch.get_num_threads()} "
            f"torch threads; torch {torch.__version__}")


ROWS = [  # label, key, format, ratio: "time" (a)/(x), "rate" (x)/(a), or None
    ("training images/s", "images_per_s", "{:.0f}", "rate"),
    ("training epoch, 50k images (s)", "train_s", "{:.2f}", "time"),
    ("evaluation L={L}, 10k images (s)", "eval_s", "{:.2f}", "time"),
    ("full epoch, train + eval (s)", "epoch_s", "{:.2f}", "time"),
    ("training step, batch on device (ms)", "step_ms", "{:.1f}", "time"),
    ("peak memory (MiB){memory_note}", "peak_mib", "{:.0f}", None),
    ("500-epoch run (h)", "run_h", "{:.2f}", "time"),
]


def table(name, results, args, device, extrapolated):
    labels = [label.format(L=args.L, memory_note="" if device.type == "cuda" else ", RSS")
              for label, *_ in ROWS]
    first = max(len(label) for label in labels) + 2
    header = "".join(f"{MODES[m]:>15}" for m in MODES) + f"{'(a)/(b)':>10}{'(a)/(c)':>10}"
    lines = [" " * first + header]
    for label, (_, key, fmt, ratio) in zip(labels, ROWS):
        cells = "".join(f"{fmt.format(results[m][key]) if results[m][key] is not None else 'n/a':>15}"
                        for m in MODES)
        for m in ("b", "c"):
            a, x = results["a"][key], results[m][key]
            value = (a / x if ratio == "time" else x / a) if ratio and a and x else None
            cells += f"{value:>9.1f}x" if value is not None else f"{'':>10}"
        lines.append(f"{label:<{first}}{cells}")
    size = (f"{args.train_images} training / {args.test_images} test images, scaled to "
            f"50k / 10k: per-epoch figures EXTRAPOLATED" if extrapolated
            else "50k training / 10k test images")
    rounds = f"; best of {args.repeats} rounds" if args.repeats > 1 else ""
    print(f"\n{name}, width {args.width}, K={RECIPE['K']}, L={args.L}, batch {BATCH}; {size}{rounds}")
    print("\n".join(lines))
    ck = results["b"]["checkpoint"]
    print(f"checkpoint every epoch ({ck['mb']:.0f} MB with momenta): written in the loop "
          f"{ck['in_loop_s']:.2f} s; background writer: the loop waits {ck['blocked_s']:.2f} s "
          f"(copy to host memory) while the file takes {ck['beside_s']:.2f} s beside it", flush=True)


# ---- several runs sharing the device -------------------------------------------------------

def worker(args, device):
    """One training run of the default mode in its own process: warm up, report
    "ready", wait for "go" on stdin, then train one epoch and evaluate once; print
    the timings as one JSON line."""
    name = args.models[0]
    data = synthetic_cifar100(args.train_images, args.test_images)
    peak = PeakMemory(device)
    peak.reset()
    torch.manual_seed(0)
    settings = dict(RECIPE, model=name, width=args.width, eval_batch_size=EVAL_BATCH, loader="device")
    model, opt = main.build(settings, device)
    train_loader, test_loader = main.loaders(settings, data, device, 0)
    steps = len(train_loader)
    lr_at = lambda it: learning_rate(it, RECIPE["lr"], 5 * steps, EPOCHS * steps)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    main.train_one_epoch(model, opt, warm_batches(data[0], data[1], BATCH, device, memory_format),
                         lr_at, 0, device, False, NO_STOP, no_progress)
    main.evaluate(model, opt, warm_batches(data[2], data[3], EVAL_BATCH, device, memory_format),
                  1, device, False)
    synchronize(device)
    print("ready", flush=True)
    sys.stdin.readline()
    began = time.time()
    train_s = timed(device, lambda: main.train_one_epoch(model, opt, train_loader, lr_at, 0, device,
                                                         False, NO_STOP, no_progress))
    trained = time.time()
    eval_s = timed(device, lambda: main.evaluate(model, opt, test_loader, args.L, device, False))
    print(json.dumps({"began": began, "trained": trained, "train_s": train_s, "eval_s": eval_s,
                      "images": trained_images(len(data[1]), BATCH),
                      "peak_mib": peak.mib()}), flush=True)


def launch(args, device, count):
    """Start ``count`` workers, let them go at the same moment, collect their timings."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--models", args.models[0],
               "--device", str(device), "--train-images", str(args.train_images),
               "--test-images", str(args.test_images), "--width", str(args.width), "--L", str(args.L)]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(count)]
    for w in workers:
        if w.stdout.readline().strip() != "ready":
            raise SystemExit(f"a worker failed before it was ready (exit code {w.wait()})")
    for w in workers:
        w.stdin.write("go\n")
        w.stdin.flush()
    results = []
    for w in workers:
        out, _ = w.communicate()
        if w.returncode != 0:
            raise SystemExit(f"a worker failed (exit code {w.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def concurrent(args, device):
    """One run alone, then ``args.concurrent`` runs at once on the same device."""
    n = args.concurrent
    alone = launch(args, device, 1)[0]
    together = launch(args, device, n)
    scale_train, scale_test = FULL_TRAIN / alone["images"], FULL_TEST / args.test_images

    def epoch(r):
        return r["train_s"] * scale_train + r["eval_s"] * scale_test

    total_rate = sum(r["images"] for r in together) / (
        max(r["trained"] for r in together) - min(r["began"] for r in together))
    each_rate = [r["images"] / r["train_s"] for r in together]
    extrapolated = args.train_images != FULL_TRAIN or args.test_images != FULL_TEST
    print(f"\n{args.models[0]}, default mode (b), width {args.width}, L={args.L}: 1 run alone, then "
          f"{n} runs at once on {device}" + (" (per-epoch figures EXTRAPOLATED to 50k / 10k)"
                                              if extrapolated else ""))
    rows = [
        ("training images/s", f"{alone['images'] / alone['train_s']:.0f}",
         f"{min(each_rate):.0f}..{max(each_rate):.0f}", f"{total_rate:.0f}"),
        ("training epoch, 50k images (s)", f"{alone['train_s'] * scale_train:.2f}",
         f"{max(r['train_s'] for r in together) * scale_train:.2f}", ""),
        (f"evaluation L={args.L}, 10k images (s)", f"{alone['eval_s'] * scale_test:.2f}",
         f"{max(r['eval_s'] for r in together) * scale_test:.2f}", ""),
        ("full epoch (s)", f"{epoch(alone):.2f}", f"{max(epoch(r) for r in together):.2f}", ""),
        (f"{n} runs x {EPOCHS} epochs, wall (h)", f"{n * EPOCHS * epoch(alone) / 3600:.2f}",
         "", f"{EPOCHS * max(epoch(r) for r in together) / 3600:.2f}"),
        ("peak memory per run (MiB)", _mib(alone["peak_mib"]),
         _mib(max((r["peak_mib"] or 0) for r in together) or None), ""),
    ]
    print(f"{'':<36}{'1 run alone':>14}{f'each of {n}':>14}{f'all {n}':>14}")
    for label, *cells in rows:
        print(f"{label:<36}" + "".join(f"{c:>14}" for c in cells))
    print(f"(runs one after another: {n} x the run alone; runs at once: {EPOCHS} x the slowest "
          f"run's epoch. The authors' code: about 3.1 h (ResNet18) / 2.7 h (VGG16) on five GPUs.)")


def _mib(value):
    return "n/a" if value is None else f"{value:.0f}"


# ---- main ----------------------------------------------------------------------------------

def synthetic_cifar100(num_train, num_test, seed=0):
    """Random CIFAR-100-shaped data: uint8 images (N, 3, 32, 32), labels 0..99."""
    g = torch.Generator().manual_seed(seed)
    images = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = lambda n: torch.randint(0, 100, (n,), generator=g)
    return images(num_train), labels(num_train), images(num_test), labels(num_test)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sizes default to the real ones on CUDA and to a reduced "
                                       "setting on the CPU: " + ", ".join(
                                           f"--{k.replace('_', '-')} {gpu} / {cpu}"
                                           for k, (gpu, cpu) in SIZES.items()) + ".")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if there is one)")
    p.add_argument("--train-images", type=int, default=None, help="training images per epoch")
    p.add_argument("--test-images", type=int, default=None, help="test images per evaluation")
    p.add_argument("--width", type=int, default=None, help="network width (64 = the paper's)")
    p.add_argument("--L", type=int, default=40, help="samples per test image")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps timed with the batch already on the device")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds of the three modes, in turn; the table shows the best of them")
    p.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1),
                   help="DataLoader worker processes of mode (a) (the authors used 10)")
    p.add_argument("--concurrent", type=int, default=0, metavar="N",
                   help="instead of the tables: N training processes of the default mode "
                        "sharing the device, beside one alone (first model of --models)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for key, (gpu, cpu) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if args.device.type == "cuda" else cpu)
    for key in ("train_images", "test_images", "width", "L", "steps", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.train_images < 2:
        p.error("--train-images must be >= 2")
    return args


def run(argv=None):
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as main.py, for every mode
    if args.worker:
        return worker(args, device)
    print(machine(device))
    if args.concurrent:
        return concurrent(args, device)
    data = synthetic_cifar100(args.train_images, args.test_images)
    extrapolated = args.train_images != FULL_TRAIN or args.test_images != FULL_TEST
    peak = PeakMemory(device)
    for name in args.models:
        runs = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode in MODES:
                began = time.perf_counter()
                runs[mode].append(measure(mode, name, data, args, device, peak))
                print(f"  {name} {MODES[mode]}, round {repeat + 1}/{args.repeats}: measured in "
                      f"{time.perf_counter() - began:.0f} s", flush=True)
        table(name, {mode: best(found) for mode, found in runs.items()}, args, device, extrapolated)


def best(found):
    """The best of the rounds, row by row (what other load on the machine took away is
    not the code's): the highest rate, the shortest times, the highest memory peak."""
    result = dict(found[0])
    result["images_per_s"] = max(r["images_per_s"] for r in found)
    for key in ("train_s", "eval_s", "step_ms"):
        result[key] = min(r[key] for r in found)
    peaks = [r["peak_mib"] for r in found if r["peak_mib"] is not None]
    result["peak_mib"] = max(peaks) if peaks else None
    result["epoch_s"] = result["train_s"] + result["eval_s"]
    result["run_h"] = EPOCHS * result["epoch_s"] / 3600
    return result


if __name__ == "__main__":
    run()
