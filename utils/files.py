"""Files of plain data (checkpoints, exported networks): written atomically, read as data
only, checked whole.

A file is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one: a crash, a kill or a full disk during a save leaves the previous file
as it was. Files are read with ``torch.load(weights_only=True)``: they hold tensors,
numbers, strings, lists and dicts, never code, and a file that holds anything else is
refused. A file holding a non-finite tensor is refused too.

Our own files carry a digest of their content (every tensor's bytes and every value),
which their readers verify (``verify_digest``): a file damaged on disk or in a copy is
refused, not silently evaluated or resumed. A digest is a checksum, not a schema: what
each field may hold is checked by the file's owner (``checkpoint.py``, ``models/packed.py``).
"""
import errno
import hashlib
import os
import pickle
import re
import secrets
import threading

import torch

DIGEST = "digest"  # the key of the content digest in our files


class FileError(Exception):
    """A file that cannot be written, or read as what it should be; the message says why
    (``reason``: the operating system's words, where it refused a write)."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason


def content_digest(obj) -> str:
    """sha256 of a file's content: its structure, every plain value, and every tensor's
    dtype, shape and bytes, in order."""
    digest = hashlib.sha256()

    def feed(item):
        if isinstance(item, torch.Tensor):
            tensor = item.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"<{tensor.dtype}{tuple(item.shape)}>".encode())
            digest.update(tensor.view(torch.uint8).numpy())
        elif isinstance(item, dict):
            digest.update(b"{")
            for key, value in item.items():
                feed(key)
                feed(value)
            digest.update(b"}")
        elif isinstance(item, (list, tuple)):
            digest.update(b"[" if isinstance(item, list) else b"(")
            for value in item:
                feed(value)
            digest.update(b"]")
        else:
            digest.update(f"{type(item).__name__}:{item!r};".encode())

    feed(obj)
    return digest.hexdigest()


def with_digest(obj: dict) -> dict:
    """``obj`` with the digest of the rest of its content under ``DIGEST``."""
    content = {k: v for k, v in obj.items() if k != DIGEST}
    return dict(content, **{DIGEST: content_digest(content)})


def verify_digest(obj: dict, path: str, what: str) -> dict:
    """``obj`` without its digest, which must be there and match its content (FileError
    otherwise: a file not written whole by this program, or damaged since)."""
    content = {k: v for k, v in obj.items() if k != DIGEST}
    stored = obj.get(DIGEST)
    if stored is None:
        raise FileError(f"{path} has no content digest: it was not written by this program whole, and "
                        f"cannot be trusted as {what}")
    if content_digest(content) != stored:
        raise FileError(f"{path} is damaged: its content does not match the digest written with it "
                        f"(a disk or copy error?); use another file")
    return content


class _Writer:
    """The file object a new file is written through. It hashes what passes (the file's
    sha256, for the record of the run that owns it, without reading the file again), and
    keeps the operating system's error: torch.save reports a failed write (a full disk,
    a file-size limit) only as "unexpected pos"."""

    def __init__(self, file):
        self.file = file
        self.error = None
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data):
        try:
            written = self.file.write(data)
        except OSError as error:
            self.error = error
            raise
        self.sha256.update(data)
        self.size += len(data)
        return written

    def flush(self):
        self.file.flush()


# A temporary file of ours: hidden, named after the file it becomes, with 12 hex digits
# of its own. Only names of exactly this form are ever taken for leftovers of a write.
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{12}\.tmp")


def temporary_name(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")


def write_atomic(path: str, fill, owner=None, new_only=False):
    """Write a new file at ``path``: ``fill(f)`` writes its bytes into a temporary file in
    the same folder, which is flushed to disk and renamed over ``path``, so ``path`` is
    always the old or the new file, whole, and a file that shares the old one's content
    under another name (a hard link) keeps it. ``owner`` (the record of a run,
    ``utils/manifest.py``) learns the new file's identity before the rename. A failed
    write removes the temporary file and raises FileError. ``new_only``: a file that
    appeared at ``path`` meanwhile is never replaced (FileError instead)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        tmp = temporary_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise FileError(f"could not write {path}: {error.strerror or error}; "
                        f"the previous file there is unchanged", error.strerror) from None
    writer = None
    try:
        os.fchmod(fd, 0o666 & ~umask())  # a run's files are as readable as any the user makes
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            fill(writer)
            f.flush()
            os.fsync(f.fileno())
        if owner is not None:
            owner.expect(path, tmp, writer.size, writer.sha256.hexdigest())
        if new_only:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if owner is not None:
            owner.abandon(path)
        cause = writer.error if writer is not None and writer.error is not None else error
        if isinstance(cause, OSError):
            raise FileError(f"could not write {path}: {cause.strerror or cause}; "
                            f"the previous file there is unchanged", cause.strerror) from None
        raise
    _fsync_folder(folder)
    if owner is not None:
        owner.settle(path)


def _link_new(tmp, path):
    """Give ``tmp`` the name ``path`` unless a file has it (FileExistsError): a hard link
    fails where the name exists, where a rename would replace it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: the same, but not atomic
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def save_atomic(obj, path: str, owner=None, new_only=False):
    """``torch.save(obj)`` to ``path`` by ``write_atomic``."""
    write_atomic(path, lambda f: torch.save(obj, f), owner, new_only)


def write_text_atomic(text: str, path: str, owner=None):
    write_atomic(path, lambda f: f.write(text.encode()), owner)


def umask() -> int:
    """The process's umask, read from /proc where it can be (reading it with os.umask
    means setting it, which a thread writing files at the same moment would notice)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def to_host(obj, _copies=None):
    """A copy of ``obj`` (dicts, lists, tuples of tensors and plain values) whose tensors
    are on the CPU and share no memory with the originals: what the training goes on to
    change in place does not reach it. A tensor that appears twice is copied once."""
    copies = {} if _copies is None else _copies
    if isinstance(obj, torch.Tensor):
        if id(obj) not in copies:
            copies[id(obj)] = obj.detach().to("cpu", copy=True)
        return copies[id(obj)]
    if isinstance(obj, dict):
        copy = type(obj)((key, to_host(value, copies)) for key, value in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's version information
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(value, copies) for value in obj)
    return obj


class BackgroundSaver:
    """Writes files with ``write`` (``save_atomic``, or a file owner's writer) from a
    thread while training goes on.

    A ResNet18 checkpoint with K = 8 and momenta is about 800 MB: written in the
    training loop, its every-epoch save would cost seconds of an epoch of a few.
    ``submit`` first waits for the previous write (so at most one is in flight, and
    its failure is raised here), then copies the tensors to host memory (a device
    copy of a fraction of a second: the files hold the state of this moment) and
    writes the files in order from a thread. ``wait`` blocks until the write is
    done and raises its error, if any: call it before reporting a checkpoint as
    written and before the process ends.
    """

    def __init__(self, write=save_atomic):
        self._write_one = write
        self._thread = None
        self._done = threading.Event()
        self._error = None

    def submit(self, jobs):
        """``jobs``: a list of (object, path), written one after the other."""
        self.wait()
        snapshot = to_host([obj for obj, _ in jobs])
        paths = [path for _, path in jobs]
        self._done.clear()
        self._thread = threading.Thread(target=self._write, args=(list(zip(snapshot, paths)),),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, jobs):
        try:
            for obj, path in jobs:
                self._write_one(obj, path)
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error
        finally:
            self._done.set()

    def wait(self):
        """Block until the write in flight has landed, even through Ctrl-C: an interrupt
        (a second Ctrl-C) is raised once the files are whole. (It waits on an event, not
        on ``Thread.join``, which an interrupt can leave believing the thread stopped.)"""
        interrupted = None
        while self._thread is not None:
            try:
                self._done.wait()
                self._thread.join()
                self._thread = None
            except KeyboardInterrupt as error:
                interrupted = error
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if interrupted is not None:
            raise interrupted


def _fsync_folder(folder):
    """Make the rename itself durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str, map_location="cpu", mmap=False, what="checkpoint") -> dict:
    """Read a file as data. FileError if it is missing, truncated, not a dict of plain
    data, holds objects other than plain data, or a non-finite tensor. ``mmap``: the
    tensors stay on disk until used (to read a few plain fields of a large file)."""
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith((".pth.tar", ".bnn")))
        raise FileError(f"{path} is a folder, not a file" + (f": give a file in it ({', '.join(inside)})"
                                                               if inside else ""))
    if not os.path.isfile(path):
        raise FileError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:  # not a pickle of ours at all (a text file, garbage)
            raise FileError(f"cannot read {path}: truncated, corrupt, or not a checkpoint "
                            f"(it is not a pickle of plain data)") from None
        raise FileError(f"refusing to load {path}: it holds objects other than tensors and "
                        f"plain data, which could run code (it names {found.group(1)})") from None
    except Exception as error:
        first = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else ""
        raise FileError(f"cannot read {path}: truncated, corrupt, or not a checkpoint "
                        f"({type(error).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise FileError(f"{path} is not a checkpoint (it holds a {type(obj).__name__}, not a dict)")
    if not mmap:
        bad = _first_non_finite(obj)
        if bad is not None and what == "checkpoint":
            raise FileError(f"{path} holds non-finite values (NaN or infinity) in {bad}: the run it "
                            f"comes from had diverged; use an earlier checkpoint")
        if bad is not None:
            raise FileError(f"{path} holds non-finite values (NaN or infinity) in {bad}: not a {what} to use")
    return obj


def _first_non_finite(obj, where=""):
    """The path of keys of the first floating tensor with a NaN or an infinity, or None."""
    if isinstance(obj, torch.Tensor):
        finite = not obj.is_floating_point() or bool(torch.isfinite(obj).all())
        return None if finite else (where or "a tensor")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None
