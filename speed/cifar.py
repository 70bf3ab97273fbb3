"""How fast VISPA trains and evaluates, in three modes measured side by side:
(a) reference-style pipeline: this project's optimizer run the authors' way (torchvision
DataLoader with PIL transforms in workers, float32, default memory format, torch's
default SGD update, loss and accuracy read on the host every step, evaluation in
batches of 256 running the whole network L times); (b) default: what main.py does
(engine.py on the device-resident loader, channels_last and fused SGD on CUDA, the
stem once per evaluation batch of 1000); (c) bf16: (b) with --bf16. On a GPU the
sizes are the real ones; on the CPU reduced ones, extrapolated to 50k / 10k images.
speed/README.md explains the rows and holds the measured tables.

    python speed/cifar.py                                  # the two CIFAR-100 tables
    python speed/cifar.py --recipes resnet18_1w1a_cifar10  # any CIFAR recipe
    python speed/cifar.py --concurrent 5                   # five runs on one device
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repository's packages

import engine  # noqa: E402
from config import RECIPES, Config  # noqa: E402
from data import DATASETS  # noqa: E402
from models import build_model  # noqa: E402
from optim import VISPA, learning_rate  # noqa: E402
from utils import files, threads  # noqa: E402

FULL_TRAIN, FULL_TEST = 50_000, 10_000
CIFAR = [name for name, cfg in RECIPES.items() if cfg.dataset.startswith("cifar")]
SIZES = {"train_images": (FULL_TRAIN, 1280), "test_images": (FULL_TEST, 256), "width": (None, 8),
         "steps": (50, 2), "repeats": (1, 3)}  # (on CUDA, on the CPU)
MODES = {"a": "(a) reference-style", "b": "(b) default", "c": "(c) bf16"}
ROWS = [  # label, key, format, ratio: "time" (a)/(x), "rate" (x)/(a), or None
    ("training images/s", "images_per_s", "{:.0f}", "rate"),
    ("training epoch, 50k images (s)", "train_s", "{:.2f}", "time"),
    ("evaluation L={L}, 10k images (s)", "eval_s", "{:.2f}", "time"),
    ("full epoch, train + eval (s)", "epoch_s", "{:.2f}", "time"),
    ("training step, batch on device (ms)", "step_ms", "{:.1f}", "time"),
    ("peak GPU memory (MiB)", "peak_mib", "{:.0f}", None),
    ("run of all epochs (h)", "run_h", "{:.2f}", "time"),
]


def timed(device, work):
    """Seconds ``work()`` takes: CUDA events around it on a GPU, the wall clock on the CPU."""
    if device.type != "cuda":
        began = time.perf_counter()
        work()
        return time.perf_counter() - began
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


# ---- (a): the authors' loops, written out plainly -------------------------------------------

def reference_train(model, opt, batches, lr_at, device):
    model.train()
    for i, (images, labels) in enumerate(batches):
        images, labels = images.to(device), labels.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        opt.zero_grad()
        with opt.sampled_params(train=True):
            output = model(images)
            loss = F.cross_entropy(output, labels)
            loss.backward()
        opt.step()
        loss.item(), (output.argmax(1) == labels).sum().item()  # read on the host every step


@torch.no_grad()
def reference_evaluate(model, opt, batches, L, device):
    model.eval()
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        outputs = []
        for _ in range(L):
            with opt.sampled_params():
                outputs.append(model(images))
        sum(F.cross_entropy(o, labels) for o in outputs).item(), (sum(outputs).argmax(1) == labels).sum().item()


# ---- one column of the table ------------------------------------------------------------------

def prepare(mode, recipe, data, args, device):
    """The recipe at the benchmark's size, and the network, VISPA and loaders of ``mode``
    ("a": as the authors run - default memory format, torch's default update, torchvision)."""
    cfg = Config(**dict(RECIPES[recipe].to_dict(), width=args.width, L=args.L,
                        bf16=mode == "c", eval_batch_size=256 if mode == "a" else 1000))
    fmt = torch.channels_last if device.type == "cuda" and mode != "a" else torch.contiguous_format
    model = build_model(cfg.model, cfg.num_classes, cfg.width, cfg.image_size).to(device, memory_format=fmt)
    opt = VISPA(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, K=cfg.K,
                S=cfg.scale, fused=False if mode == "a" else None, seed=0)
    spec = DATASETS[cfg.dataset]
    if mode == "a":
        loaders = [spec.reference_loader(x, y, b, train, args.workers) for (x, y), b, train in
                   zip(data, (cfg.batch_size, cfg.eval_batch_size), (True, False))]
    else:
        loaders = [spec.loader(x, y, b, train, device) for (x, y), b, train in
                   zip(data, (cfg.batch_size, cfg.eval_batch_size), (True, False))]
    return cfg, model, opt, fmt, loaders


def resident(images, labels, batch, cfg, device, fmt):
    """Batches already on the device: a full one and one of the epoch's last size."""
    sizes = [min(batch, len(labels))] + ([len(labels) % batch] if len(labels) % batch > 1 else [])
    spec = DATASETS[cfg.dataset]
    batches = [next(iter(spec.loader(images[:n], labels[:n], n, False, device))) for n in sizes]
    return [(x.contiguous(memory_format=fmt), y) for x, y in batches]  # the mode's memory format


def measure(mode, recipe, data, args, device):
    """Train one epoch and evaluate once in ``mode``: the figures of one column."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg, model, opt, fmt, (train_loader, test_loader) = prepare(mode, recipe, data, args, device)
    steps = len(train_loader)
    lr_at = lambda it: learning_rate(it, cfg.lr, cfg.warmup_epochs * steps, cfg.epochs * steps)
    if mode == "a":
        train = lambda batches: reference_train(model, opt, batches, lr_at, device)
        evaluate = lambda batches, L: reference_evaluate(model, opt, batches, L, device)
    else:
        train = lambda batches: engine.train_one_epoch(model, opt, batches, lr_at, 0, cfg.bf16)
        evaluate = lambda batches, L: engine.evaluate(model, opt, batches, L, cfg.bf16)
    (train_x, train_y), (test_x, test_y) = data
    train(resident(train_x, train_y, cfg.batch_size, cfg, device, fmt))  # cuDNN picks its algorithms
    evaluate(resident(test_x, test_y, cfg.eval_batch_size, cfg, device, fmt), 1)
    on_device = resident(train_x, train_y, cfg.batch_size, cfg, device, fmt)[:1] * args.steps
    step_s = timed(device, lambda: train(on_device)) / args.steps
    for loader in (train_loader, test_loader):
        next(iter(loader))  # (a)'s worker processes start here, outside the timing
    train_s = timed(device, lambda: train(train_loader))
    eval_s = timed(device, lambda: evaluate(test_loader, args.L))
    trained = len(train_y) - (len(train_y) % cfg.batch_size == 1)  # a last batch of one is dropped
    result = {"images_per_s": trained / train_s, "train_s": train_s * FULL_TRAIN / trained,
              "eval_s": eval_s * FULL_TEST / len(test_y), "step_ms": 1000 * step_s,
              "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    result["epoch_s"] = result["train_s"] + result["eval_s"]
    result["run_h"] = cfg.epochs * result["epoch_s"] / 3600
    if mode == "b":
        result["checkpoint"] = measure_checkpoint(model, opt)
    return result


def measure_checkpoint(model, opt):
    """The per-epoch checkpoint (network, distribution, momenta): seconds written in the
    loop, and seconds the loop waits when the background writer takes it."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    folder = tempfile.mkdtemp(prefix=".speed-", dir=os.path.join(ROOT, "results"))
    try:
        path = os.path.join(folder, "checkpoint.pth.tar")
        in_loop = timed(torch.device("cpu"), lambda: files.save_atomic(state, path))
        saver = files.BackgroundSaver()
        blocked = timed(torch.device("cpu"), lambda: saver.submit([(state, path)]))
        saver.wait()
        return {"mb": os.path.getsize(path) / 1e6, "in_loop_s": in_loop, "blocked_s": blocked}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def best(rounds):
    """Row by row the best round (what other load on a shared machine took is not the code's)."""
    result = dict(rounds[0])
    result["images_per_s"] = max(r["images_per_s"] for r in rounds)
    for key in ("train_s", "eval_s", "step_ms", "epoch_s", "run_h"):
        result[key] = min(r[key] for r in rounds)
    return result


def table(recipe, results, args):
    labels = [label.format(L=args.L) for label, *_ in ROWS]
    first = max(len(label) for label in labels) + 2
    lines = [" " * first + "".join(f"{m:>20}" for m in MODES.values()) + f"{'(a)/(b)':>10}{'(a)/(c)':>10}"]
    for label, (_, key, fmt, ratio) in zip(labels, ROWS):
        cells = "".join(f"{fmt.format(results[m][key]) if results[m][key] is not None else 'n/a':>20}"
                        for m in MODES)
        for m in ("b", "c"):
            a, x = results["a"][key], results[m][key]
            cells += f"{(a / x if ratio == 'time' else x / a):>9.1f}x" if ratio and a and x else " " * 10
        lines.append(f"{label:<{first}}{cells}")
    scaled = args.train_images != FULL_TRAIN or args.test_images != FULL_TEST
    size = (f"{args.train_images} / {args.test_images} images, per-epoch figures EXTRAPOLATED to 50k / 10k"
            if scaled else "50k training / 10k test images")
    cfg = RECIPES[recipe]
    print(f"\n{recipe}: {cfg.model}, width {args.width or cfg.width}, K={cfg.K}, L={args.L}, batch "
          f"{cfg.batch_size}; {size}; best of {args.repeats} round(s)")
    print("\n".join(lines))
    ck = results["b"]["checkpoint"]
    print(f"checkpoint every epoch ({ck['mb']:.0f} MB with momenta): {ck['in_loop_s']:.2f} s written in "
          f"the loop; the background writer holds the loop {ck['blocked_s']:.2f} s", flush=True)


# ---- several runs sharing the device ---------------------------------------------------------

def worker(args, data, device):
    """One run of mode (b) in its own process: warm up, say "ready", wait for a line on
    stdin, train one epoch and evaluate once, print the seconds of the full epoch."""
    cfg, model, opt, _, (train_loader, test_loader) = prepare("b", args.recipes[0], data, args, device)
    engine.train_one_epoch(model, opt, [next(iter(train_loader))], lambda it: cfg.lr)
    engine.evaluate(model, opt, [next(iter(test_loader))], 1)
    print("ready", flush=True)
    sys.stdin.readline()
    train_s = timed(device, lambda: engine.train_one_epoch(model, opt, train_loader, lambda it: cfg.lr))
    eval_s = timed(device, lambda: engine.evaluate(model, opt, test_loader, args.L))
    print(train_s * FULL_TRAIN / args.train_images + eval_s * FULL_TEST / args.test_images, flush=True)


def concurrent(args, device):
    """One run alone, then ``args.concurrent`` runs at once: seconds per full epoch."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--recipes", args.recipes[0],
               "--device", str(device), "--L", str(args.L), "--train-images", str(args.train_images),
               "--test-images", str(args.test_images)] + (["--width", str(args.width)] if args.width else [])
    epoch = {}
    for count in (1, args.concurrent):
        workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                   for _ in range(count)]
        if any(w.stdout.readline().strip() != "ready" for w in workers):
            raise SystemExit("a worker failed before it was ready")
        for w in workers:  # all at once
            w.stdin.write("go\n")
            w.stdin.flush()
        epoch[count] = max(float(w.communicate()[0].split()[-1]) for w in workers)
    cfg, n = RECIPES[args.recipes[0]], args.concurrent
    E = cfg.epochs
    print(f"\n{args.recipes[0]}, mode (b), width {args.width or cfg.width}, L={args.L} on {device}: seconds per full "
          f"epoch {epoch[1]:.2f} alone, {epoch[n]:.2f} each of {n} at once; {n} runs of {E} epochs: "
          f"{n * E * epoch[1] / 3600:.2f} h one after another, {E * epoch[n] / 3600:.2f} h all at once")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", choices=CIFAR, default=CIFAR[:2], metavar="RECIPE",
                   help=f"CIFAR recipes to measure (default: the two CIFAR-100 ones); one of {', '.join(CIFAR)}")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if there is one)")
    for key in SIZES:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {SIZES[key][0] or 'the recipe'} on CUDA, {SIZES[key][1]} on the CPU")
    p.add_argument("--L", type=int, default=40, help="samples per test image")
    p.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1),
                   help="DataLoader worker processes of mode (a) (the authors used 10)")
    p.add_argument("--concurrent", type=int, default=0, metavar="N",
                   help="instead of the tables: N runs of mode (b) sharing the device, beside one alone")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads.use(threads.choose())
    for key, (gpu, cpu) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if device.type == "cuda" else cpu)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as main.py, for every mode
    g = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.randint(0, 10, (n,), generator=g))  # labels that every CIFAR recipe has
    data = (split(args.train_images), split(args.test_images))
    if args.worker:
        return worker(args, data, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}); {os.cpu_count()} CPU cores; {torch.get_num_threads()} torch threads; "
          f"torch {torch.__version__}")
    if args.concurrent:
        return concurrent(args, device)
    for recipe in args.recipes:
        rounds = {mode: [] for mode in MODES}
        for r in range(args.repeats):
            for mode in MODES:
                began = time.monotonic()
                rounds[mode].append(measure(mode, recipe, data, args, device))
                print(f"  measured {recipe} {MODES[mode]}, round {r + 1}/{args.repeats}: "
                      f"{time.monotonic() - began:.0f} s", flush=True)
        table(recipe, {mode: best(found) for mode, found in rounds.items()}, args)


if __name__ == "__main__":
    main()
