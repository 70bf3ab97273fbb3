"""Which files are a run's own: the record a run keeps of every file it writes.

A run's folder holds ``.manifest.json``: for each file the run wrote (its log beside
the folder, its checkpoints, metrics, settings, TensorBoard events), the file's size and
sha256 and where it lies on disk (device, inode, modification time). A file is the
run's own when the record lists it and it is unchanged: the same inode, size and time,
or, in a copy of the run folder, the same size and sha256. Every other file is foreign,
whatever it holds, and a run never replaces or deletes it, ``--overwrite`` included.

The record learns a new file's identity *before* the file is renamed into place
(``utils.files.write_atomic``), and keeps the old identity until the rename is done:
after a crash at any moment, the file on disk is one the record accepts.
"""
import hashlib
import json
import os
import stat
import threading

from .files import FileError, write_atomic

NAME = ".manifest.json"
FORMAT = "vispa-run-files"
VERSION = 1


class ForeignRecord(FileError):
    """A ``.manifest.json`` that this program did not write."""


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def identity(path: str, size: int, sha256: str) -> dict:
    """What makes the file at ``path`` this one: its content, and where it lies."""
    st = os.lstat(path)
    return {"size": size, "sha256": sha256, "device": st.st_dev, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns}


def identity_of(path: str) -> dict:
    """The identity of an existing file, its content read to hash it."""
    return identity(path, os.lstat(path).st_size, sha256_of(path))


class Manifest:
    """The record of the run whose folder is ``folder``. Paths are kept relative to the
    folder (the log, beside it, as ``../<name>.txt``). Thread-safe: the checkpoints are
    written from a thread of their own while the log and metrics are written."""

    def __init__(self, folder: str, run: str = None, run_id: str = None, entries: dict = None):
        self.folder = folder
        self.path = os.path.join(folder, NAME)
        self.run, self.run_id = run, run_id
        self.entries = dict(entries or {})  # relative path -> [accepted identities]
        self._pending = {}                  # relative path -> identity being renamed into place
        self._lock = threading.Lock()

    # ---- reading ---------------------------------------------------------------------------------

    @classmethod
    def read(cls, folder: str):
        """The record in ``folder``, or None if it has none. ForeignRecord if the file
        there is not a record of this program (it is then never replaced either)."""
        path = os.path.join(folder, NAME)
        if not os.path.lexists(path):
            return None
        if os.path.islink(path) or not os.path.isfile(path):
            raise ForeignRecord(f"{path} is not a file this program wrote (a link, or not a file)")
        try:
            with open(path, "rb") as f:
                content = json.loads(f.read(1 << 24).decode())
            assert content["format"] == FORMAT and content["version"] == VERSION
            entries = {key: [_checked(i) for i in accepted] for key, accepted in content["files"].items()
                       if isinstance(key, str) and isinstance(accepted, list)}
            assert len(entries) == len(content["files"])
            return cls(folder, content.get("run"), content.get("run_id"), entries)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError):
            raise ForeignRecord(f"{path} is not a record of this program's runs: it is never replaced; move it, "
                                f"or choose another --save") from None

    def _key(self, path: str) -> str:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(self.folder))

    def lists(self, path: str) -> bool:
        return self._key(path) in self.entries

    def owns(self, path: str) -> bool:
        """Whether the file at ``path`` is one this run wrote, unchanged since."""
        accepted = self.entries.get(self._key(path), [])
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or not accepted:
            return False
        where = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if any(where == (i["device"], i["inode"], i["size"], i["mtime_ns"]) for i in accepted):
            return True
        if not any(i["size"] == st.st_size for i in accepted):
            return False
        content = sha256_of(path)  # a copy of the run folder: the same bytes elsewhere on disk
        return any(i["size"] == st.st_size and i["sha256"] == content for i in accepted)

    def files(self) -> list:
        """The paths of every file the record lists."""
        return [os.path.normpath(os.path.join(self.folder, key)) for key in self.entries]

    # ---- writing ---------------------------------------------------------------------------------

    def expect(self, path: str, tmp: str, size: int, sha256: str):
        """The file at ``tmp`` is about to become ``path``: accept it there (beside what is
        there now), on disk before the rename."""
        key = self._key(path)
        new = identity(tmp, size, sha256)
        with self._lock:
            self._pending[key] = new
            self.entries[key] = self.entries.get(key, [])[-1:] + [new]
            self._save()

    def settle(self, path: str):
        """The rename is done: only the new file is the run's from now on."""
        key = self._key(path)
        with self._lock:
            self.entries[key] = [self._pending.pop(key)]

    def abandon(self, path: str):
        """The write failed before the rename: the old file stays the run's."""
        key = self._key(path)
        with self._lock:
            new = self._pending.pop(key, None)
            if new is not None:
                self.entries[key] = [i for i in self.entries.get(key, []) if i is not new]

    def adopt(self, path: str):
        """Record an existing file as the run's own (a run of an earlier version of this
        program, which kept no record)."""
        key = self._key(path)
        with self._lock:
            self.entries[key] = [identity_of(path)]
            self._save()

    def remove(self, path: str):
        """Delete a file of the run (it must be one: ``owns``), then forget it."""
        os.unlink(path)
        with self._lock:
            self.entries.pop(self._key(path), None)
            self._save()

    def start_over(self, run: str, run_id: str):
        """The record of a new run in this folder (its predecessor's files are removed)."""
        with self._lock:
            self.run, self.run_id = run, run_id
            self._save()

    def _save(self):
        content = {"format": FORMAT, "version": VERSION, "run": self.run, "run_id": self.run_id,
                   "files": self.entries}
        write_atomic(self.path, lambda f: f.write((json.dumps(content, indent=1) + "\n").encode()))


def _checked(found) -> dict:
    keys = {"size": int, "sha256": str, "device": int, "inode": int, "mtime_ns": int}
    if not isinstance(found, dict) or set(found) != set(keys) or \
            not all(type(found[k]) is kind for k, kind in keys.items()):
        raise ValueError("not an identity")
    return found
