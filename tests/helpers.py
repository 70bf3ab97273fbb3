"""What the end-to-end tests share: running main.py and the shell scripts as a user
does, watching a running process, and comparing what runs leave behind (logs,
metrics.csv, checkpoints, whole folders)."""
import csv
import hashlib
import io
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import checkpoint  # noqa: E402
from utils import files  # noqa: E402
from utils.manifest import Manifest  # noqa: E402
from utils.run_dir import BEST, CHECKPOINT, RunDir  # noqa: E402,F401

# A run small enough for a CPU test: 5 training steps per epoch on the tiny CIFAR-10
# of conftest.py, a fraction of a second per epoch after the ~2 s it takes to import torch.
TINY = ["--gpus", "cpu", "--model", "resnet18", "--width", "4", "-b", "64", "-L", "2", "-K", "2",
        "--warmup_epochs", "1", "--seed", "1", "--dataset", "cifar10"]



def tiny_for(*extra):
    """TINY for a run with the options ``extra``: without -K (VISPA's rank) where they
    name a rival with --method, which refuses VISPA's settings."""
    method = extra[extra.index("--method") + 1] if "--method" in extra else "vispa"
    if method == "vispa":
        return list(TINY)
    at = TINY.index("-K")
    return TINY[:at] + TINY[at + 2:]


# One thread per process (unless OMP_NUM_THREADS says how many): on a small machine shared
# with other work, a second thread waiting for a busy core makes every step many times slower.
THREADS = os.environ.get("OMP_NUM_THREADS") or "1"
ENV = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, PYTHONDONTWRITEBYTECODE="1")


# ---- running main.py and the scripts ----------------------------------------------------------

# main.py runs in a process of its own, forked from this one, which has imported torch
# already: the same program as `python main.py ...` (run as __main__, with its own
# arguments, environment, files, signals and exit status), without the two seconds that
# importing torch again would cost each of the test suite's many runs.
MAIN = os.path.join(REPO, "main.py")


class Forked:
    """A process running ``main.py args`` (the few methods of subprocess.Popen the tests use).

    Forked only while this process computes with one thread: a process forked after
    torch's OpenMP pool of several threads exists deadlocks at its first parallel
    operation (libgomp is not fork-safe). With more threads (OMP_NUM_THREADS=2 pytest),
    main.py is started anew instead."""

    def __init__(self, args, stdout_path, stderr_path, env=None, preexec_fn=None):
        self.args = [MAIN, *map(str, args)]
        self.returncode = None
        if torch.get_num_threads() > 1:
            self._started(stdout_path, stderr_path, env or ENV, preexec_fn)
            return
        self.pid = os.fork()
        if self.pid == 0:
            self._run_main(stdout_path, stderr_path, env or ENV, preexec_fn)

    def _started(self, stdout_path, stderr_path, env, preexec_fn):
        def prepare():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if preexec_fn is not None:
                preexec_fn()
        with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
            self._process = subprocess.Popen([sys.executable, *self.args], cwd=REPO, env=env,
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                             start_new_session=True, preexec_fn=prepare)
        self.pid = self._process.pid

    def _run_main(self, stdout_path, stderr_path, env, preexec_fn):
        code = 1
        try:
            os.setsid()  # like a process started from a shell: its own process group
            os.chdir(REPO)
            os.environ.clear()
            os.environ.update(env)
            for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, stdout_path, os.O_WRONLY | os.O_APPEND),
                                   (2, stderr_path, os.O_WRONLY | os.O_APPEND)):
                os.dup2(os.open(path, mode | os.O_CREAT, 0o644), fd)
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            if preexec_fn is not None:
                preexec_fn()
            sys.argv = list(self.args)
            runpy.run_path(MAIN, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll(self):
        if self.returncode is None:
            if hasattr(self, "_process"):
                self.returncode = self._process.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, signum):
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def run_main(*args, timeout=300, env=None, preexec_fn=None):
    """Run main.py to its end; returns a CompletedProcess (text stdout/stderr)."""
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = Forked(args, out, err, env, preexec_fn)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, read_text(out), read_text(err))


def train_tiny(data_root, results, save, epochs):
    """Train the TINY network for ``epochs`` into ``results/save``; the run must succeed."""
    done = run_main(*TINY, "--epochs", epochs, "--data_root", data_root, "--results_dir", results, "--save", save)
    assert done.returncode == 0, done.stderr
    return done


def start_main(*args, output):
    """Start main.py; its stdout and stderr go to the file ``output``."""
    open(output, "w").close()
    return Forked(args, output, output)


def script_env(**overrides):
    env = dict(ENV)
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def run_script(name, *args, timeout=300, **env):
    """Run ``bash <repo>/<name> args...`` with the environment overrides ``env``."""
    return subprocess.run(["bash", os.path.join(REPO, name), *map(str, args)], env=script_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def assert_clear_error(result, *fragments, status=1):
    """One ``error:`` line on stderr holding every fragment, and the exit ``status``."""
    assert result.returncode == status, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- watching a running process ------------------------------------------------------------

def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for(predicate, timeout=120, interval=0.05):
    """Poll until ``predicate()`` is true; AssertionError after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


def send_when_logged(process, output, pattern, signum, deadline=120.0):
    """Send ``signum`` to ``process`` as soon as its output matches ``pattern``; wait for its end."""
    began = time.monotonic()
    while process.poll() is None and time.monotonic() - began < deadline:
        if re.search(pattern, read_text(output), re.M):
            process.send_signal(signum)
            break
        time.sleep(0.002)
    process.wait(timeout=deadline)


class CheckpointWatcher:
    """Loads every version of the run folder's checkpoint files it sees, as soon as it
    sees it: opened first, then read, so a rename in between cannot mix two files.
    ``failures`` lists the versions that did not load (torn or truncated files)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.seen = {}  # (name, inode, mtime, size) -> epoch
        self.failures = []

    def poll(self):
        for name in (CHECKPOINT, BEST):
            path = os.path.join(self.run_dir, name)
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                continue
            with f:
                st = os.fstat(f.fileno())
                key = (name, st.st_ino, st.st_mtime_ns, st.st_size)
                if key in self.seen:
                    continue
                try:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
                    self.seen[key] = obj["epoch"]
                except Exception as error:  # recorded, reported by the test
                    self.seen[key] = None
                    self.failures.append(f"{name} ({st.st_size} bytes): {error}")


def temporary_files(run_dir):
    """The temporary files of unfinished writes in ``run_dir``."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(n for n in os.listdir(run_dir) if n.endswith(".tmp"))


def watch(process, run_dir, output, watcher, kill_when=None, fast=False, deadline=120.0):
    """Poll the running ``process`` (and its checkpoints, through ``watcher``) until it
    exits or ``kill_when(output_text, run_dir)`` is true; then kill it with SIGKILL at
    once. ``fast``: poll without pausing (to catch a write in progress).
    Returns True if it was killed."""
    began = time.monotonic()
    while process.poll() is None:
        if time.monotonic() - began > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"main.py still running after {deadline} s")
        if kill_when is not None and kill_when(read_text(output), run_dir):
            process.send_signal(signal.SIGKILL)
            process.wait()
            watcher.poll()
            return True
        if not fast:  # loading a checkpoint takes longer than writing one
            watcher.poll()
            time.sleep(0.002)
    watcher.poll()
    return False


# ---- the authors' files ------------------------------------------------------------------------

def key_list(filename, samples=False):
    """[(key, shape, torch dtype)] of a key list in tests/reference/ (every key of one of the
    authors' files, in order); ``samples``: with the unused zero ``<layer>.sample`` (1 x K)
    after every ``<layer>.Z``, as their code of 2024 wrote them (docs/released-checkpoints.md)."""
    keys = []
    with open(os.path.join(REPO, "tests", "reference", filename)) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                key, shape, dtype = line.split()
                shape = () if shape == "-" else tuple(int(s) for s in shape.split("x"))
                keys.append((key, shape, getattr(torch, dtype)))
                if samples and key.endswith(".Z"):
                    keys.append((key[:-1] + "sample", (1, shape[0]), torch.float32))
    return keys


def shapes_and_dtypes(state):
    """{key: (shape, dtype)} of a state_dict, to compare with a key list."""
    return {key: (tuple(value.shape), value.dtype) for key, value in state.items()}


# ---- what runs leave behind ------------------------------------------------------------------

EPOCH_LINE = re.compile(r"^(Epoch \d+/\d+ .*)\|\s*[0-9.]+ s$", re.M)


def epoch_lines(log_text):
    """The log's epoch lines without their last field (the seconds the epoch took)."""
    return [m.group(1).rstrip() for m in EPOCH_LINE.finditer(log_text)]


def metrics_without_seconds(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def run_results(results_dir, name):
    """{epoch: (val top-1, mean-net top-1)} from a run's metrics.csv, and its status."""
    run = RunDir(str(results_dir), name)
    rows = run.read_metrics()
    return {row["epoch"]: (row["val_prec1"], row["mean_prec1"]) for row in rows}, run.status()


def load_checkpoint(path):
    """A checkpoint's content (its digest checked and left out), as a dict to look at or change."""
    return files.verify_digest(files.load(str(path)), str(path), "a checkpoint")


def rewrite_as_the_run(content, path):
    """Write a checkpoint into a run folder as the run itself would have written it
    (recorded as one of its own files), to give a test run another state."""
    checkpoint.write(content, str(path))
    record = Manifest.read(os.path.dirname(str(path)))
    if record is not None:
        record.adopt(str(path))


def restore_through_a_file(model, opt, into_model, into_opt):
    """Give ``into_model`` and ``into_opt`` the state of ``model`` and ``opt`` as a resumed
    run gets it: through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    into_model.load_state_dict(saved["model"])
    into_opt.load_state_dict(saved["opt"])


def resumable_copy(one_epoch, tmp_path, epochs=2):
    """A copy of the run "run" of the results folder ``one_epoch`` (every file elsewhere on
    disk), its checkpoint set to go on to ``epochs``: (results folder, RunDir)."""
    import shutil
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    run = RunDir(str(results), "run")
    state = load_checkpoint(run.checkpoint)
    rewrite_as_the_run(dict(state, config=dict(state["config"], epochs=epochs)), run.checkpoint)
    return results, run


def tensors_of(obj, prefix=""):
    """Every tensor in a nested checkpoint structure, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found = {}
    for key, value in items:
        found.update(tensors_of(value, f"{prefix}/{key}"))
    return found


def without_tensors(obj):
    """A nested structure with its tensors left out: the plain data next to them."""
    if isinstance(obj, dict):
        return {k: without_tensors(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if isinstance(obj, (list, tuple)):
        return [without_tensors(v) for v in obj if not isinstance(v, torch.Tensor)]
    return obj


def assert_bit_identical(a, b, what):
    """Same plain data, and tensors with the same keys, dtypes, shapes and bytes
    (NaN-safe, and +0.0 differs from -0.0)."""
    assert without_tensors(a) == without_tensors(b), f"{what}: different data next to the tensors"
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb), f"{what}: different tensors"
    assert ta, f"{what}: no tensors to compare"
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape
                 or ta[k].reshape(-1).view(torch.uint8).numpy().tobytes()
                 != tb[k].reshape(-1).view(torch.uint8).numpy().tobytes()]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:5]}"


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def folder_digest(*folders):
    """sha256 of every file under ``folders``, and which files and folders exist."""
    digest = {}
    for folder in folders:
        for base, subfolders, names in os.walk(folder):
            digest.update({os.path.join(base, name): "folder" for name in subfolders})
            for name in names:
                path = os.path.join(base, name)
                with open(path, "rb") as f:
                    digest[path] = hashlib.sha256(f.read()).hexdigest()
    return digest
