"""Files: atomic output (a file, or a run's set), images, the one cache folder.

Atomic output: write a temporary file beside the target, then rename. A
reader (or a later run) then sees either the previous file or the complete
new one, never a half-written one: ``os.replace`` within one folder is
atomic on POSIX and Windows.
"""

import contextlib
import errno
import gzip
import hashlib
import json
import multiprocessing
import os
import pathlib
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import warnings
import zlib

import nibabel as nib
import numpy as np
from dipy.utils.logging import logger
from nibabel.filebasedimages import ImageFileError

from .checks import OptionError, check_affine

__all__ = [
    "load_or_build",
    "BUILD_LOCK_SUFFIX",
    "StaleCacheError",
    "atomic_write",
    "cache_root",
    "cache_key",
    "load_image",
    "verify_gzip",
    "describe_cause",
    "read_voxels",
    "save_image",
    "save_voxels",
    "writable_folder",
    "WriteError",
    "check_outputs",
    "output_lock",
    "LOCK_NAME",
    "StagedOutputs",
    "recover_staged",
    "STAGING_PREFIX",
    "JOURNAL_NAME",
    "CACHE_ENV",
]

#: Environment variable naming the cache folder.
CACHE_ENV = "DIPY_SPINVERSE_CACHE"


def cache_root(path=None):
    """The folder of everything the package trains or estimates once and reuses.

    ``path`` if given, else ``$DIPY_SPINVERSE_CACHE``, else
    ``$XDG_CACHE_HOME/dipy_spinverse`` (``~/.cache/dipy_spinverse``). Learned
    proposals, approximation-error estimates, compartment networks and
    shape autoencoders live in subfolders or under their own hashes there.
    """
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(
                f"cache_dir must be a folder (a str or path), got {path!r}; "
                f"or leave it out to use {CACHE_ENV} or ~/.cache/dipy_spinverse"
            )
        return pathlib.Path(path).expanduser()
    root = os.environ.get(CACHE_ENV)
    if root:
        return pathlib.Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(xdg) / "dipy_spinverse"


def cache_key(description, arrays):
    """SHA-256 (20 hex digits) of a JSON-able description and some arrays.

    The cache key of everything trained or estimated once and kept under
    :func:`cache_root`: the description holds every setting the product
    depends on, the arrays their data (hashed as float64 with their shape).

    Parameters
    ----------
    description : JSON-able object
        Every setting the product depends on (serialised with sorted keys).
    arrays : iterable of array_like
        The data the product depends on, each hashed as float64 with its shape.

    Returns
    -------
    str
        The first 20 hex digits of the SHA-256 digest.
    """
    h = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


class StaleCacheError(ValueError):
    """A cache file that reads but is not the artefact asked for."""


def load_or_build(path, *, load, build, save, what):
    """An artefact made once and kept: read from ``path``, or built and saved.

    Every load-or-train product of the package (learned proposals,
    approximation-error estimates, learned compartment networks, shape
    autoencoders, posterior estimators) goes through here, under a name that
    holds the hash of everything it depends on (:func:`cache_key`, or the
    grid and protocol digests of :func:`dipy_spinverse.sim.forward.update_digest`,
    with the code's, :func:`dipy_spinverse.provenance.code_digest`).

    One process builds a key at a time: the builder holds an exclusive lock
    on ``<path>.lock`` beside the cache file (:data:`BUILD_LOCK_SUFFIX`;
    ``filelock``, released by the system if the process dies, so no lock is
    ever stale). A second process that asks for the key meanwhile waits,
    then reads the first's artefact and logs that it did (two processes
    training one key end with one artefact, trained once).

    Parameters
    ----------
    path : path-like
        The cache file.
    load : callable
        ``load(path) -> artefact``. It may raise on a file that is damaged,
        foreign or of another version: that file is then built again, with a
        warning naming it (never a crash deep in torch, never silent reuse).
        Raise :class:`StaleCacheError` to say why in the warning.
    build : callable
        ``build() -> artefact``: minutes of simulation and training.
    save : callable
        ``save(artefact, tmp_path)``. Written to a temporary file beside
        ``path``, then renamed: a reader never sees half a file.
    what : str
        Names the artefact in messages ("learned proposal", ...).

    Returns
    -------
    artefact
    """
    path = pathlib.Path(path)
    found = _load_cached(path, load, what)
    if found is not _MISSING:
        return found
    unreadable = _signature(path)
    # Checked before the minutes of work, not after.
    writable_folder(path.parent, what)
    with _build_lock(path, what):
        # Another process may have built it while this one waited (or
        # between the look above and the lock): its file is read, not
        # built again. The unreadable file seen above is not retried.
        if path.exists() and _signature(path) != unreadable:
            found = _load_cached(path, load, what)
            if found is not _MISSING:
                logger.info(
                    f"Using the {what} {path} that another process built while "
                    "this one waited for it."
                )
                return found
        artefact = build()
        with atomic_write(path) as tmp:
            save(artefact, tmp)
    return artefact


#: The suffix of the lock file beside a cache file while it is built
#: (:func:`load_or_build`).
BUILD_LOCK_SUFFIX = ".lock"

_MISSING = object()


def _load_cached(path, load, what):
    """``load(path)``, or ``_MISSING`` when there is no file or it cannot be
    read (then with a warning that names it)."""
    if not path.exists():
        return _MISSING
    try:
        return load(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt
        # Not torch's own message: it suggests weights_only=False, which
        # would run code from a file that is not ours.
        reason = str(err) if isinstance(err, StaleCacheError) else ""
        warnings.warn(
            f"the cached {what} {path} cannot be read "
            f"({type(err).__name__}{': ' * bool(reason)}{reason}); training "
            "it again",
            stacklevel=4,
        )
    return _MISSING


def _signature(path):
    """What tells a file from the one written in its place (or None)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


#: How to write a script whose work spawned workers do not start again.
MAIN_GUARD_HINT = (
    'put the script\'s top-level code under `if __name__ == "__main__":` '
    '(https://docs.python.org/3/library/multiprocessing.html, "Safe '
    'importing of main module"), or pass the address of a running cluster, '
    "or use engine='serial'"
)


def refuse_spawned_main_import():
    """Raise RuntimeError in a spawned process that is still running its
    parent's main module (the parent's unguarded work, run again as the
    process starts): what would wait on its parent must not."""
    # The test of multiprocessing's own _check_not_importing_main.
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        main = getattr(sys.modules.get("__main__"), "__file__", "the main script")
        raise RuntimeError(
            f"this process was spawned (a Dask worker, a multiprocessing "
            f"process) and is running {main} again as it starts: its parent "
            'started it from code outside `if __name__ == "__main__":`, '
            f"and this process would wait for ever on its parent. Fix: "
            f"{MAIN_GUARD_HINT}."
        )


@contextlib.contextmanager
def _build_lock(path, what):
    """Hold ``<path>.lock`` while ``path`` is built; wait (saying so) when
    another process holds it. Where the file system cannot lock, build
    without (a warning): two processes may then both build, each writing
    whole. The lock file stays (removing it would let a third process lock
    a new file while a second waits on the removed one)."""
    from filelock import FileLock, Timeout

    lock_path = path.with_name(path.name + BUILD_LOCK_SUFFIX)
    # One lock object per file in this process: a build that asks for its
    # own key again in the same thread goes on (no deadlock), another thread
    # or process waits.
    lock = FileLock(lock_path, is_singleton=True)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            # A spawned process running its parent's unguarded script again
            # would wait for ever on the lock its parent holds.
            refuse_spawned_main_import()
            logger.info(
                f"Another process is building the {what} {path} (it holds "
                f"{lock_path}); waiting for it, to use its result."
            )
            lock.acquire()
    except OSError as err:
        warnings.warn(
            f"cannot lock {lock_path} ({describe_cause(err)}); building the "
            f"{what} without a lock (another process may build it too)",
            stacklevel=5,
        )
        yield
        return
    try:
        yield
    finally:
        lock.release()


def writable_folder(folder, what, fix=None):
    """``folder`` as a Path, created if needed, after checking that a file
    can be written there: a cache or output folder that cannot be written is
    reported before minutes of work, not after (``what`` names the product,
    ``fix`` says how to choose another folder; default: the cache's way).

    Parameters
    ----------
    folder : str or path-like
        The folder to create and check.
    what : str
        What will be written there, named in the error.
    fix : str, optional
        How to choose another folder, appended to the error; None: the cache's
        way (``cache_dir`` or the cache environment variable).

    Returns
    -------
    pathlib.Path
        ``folder``, which exists and can be written.

    Raises
    ------
    ValueError
        Naming the folder and how to choose another.
    """
    if fix is None:
        fix = f"give a writable cache_dir, or set {CACHE_ENV} to a writable folder"
    folder = pathlib.Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        raise ValueError(
            f"cannot write the {what} to {folder} ({describe_cause(err)}); {fix}"
        ) from err
    return folder


class WriteError(OSError):
    """A file that could not be written, with one message that names it, the
    cause in words (a full disk, a permission) and what was kept.

    An ``OSError`` (its ``errno`` and ``filename`` are the cause's and the
    file's), so that callers catching ``OSError`` still catch it; the
    command-line tools print it as one line and exit with status 2.
    """

    @classmethod
    def of(cls, path, err, *, what="", during="", fix=""):
        """The WriteError of writing ``path`` (``what`` names it, ``during``
        says at which step) that failed with ``err``; ``fix`` says what the
        user can do."""
        path = os.fspath(path)
        code = getattr(err, "errno", None)
        subject = f"{what} {path}" if what else path
        subject += f" ({during})" if during else ""
        text = f"cannot write {subject}: {describe_cause(err)}."
        return cls(code or errno.EIO, text + (" " + fix if fix else ""), path)

    def __str__(self):
        return self.strerror


#: Causes of failed writes in words.
_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
}


def describe_cause(err):
    """Why a write failed, in words: the errno's meaning when it is a usual
    one (a full disk, a permission), else the error's type and message."""
    code = getattr(err, "errno", None)
    if code in _CAUSES:
        return f"{_CAUSES[code]} ({errno.errorcode.get(code, code)})"
    detail = getattr(err, "strerror", None) or str(err) or "no detail"
    return f"{type(err).__name__}: {detail}"


@contextlib.contextmanager
def atomic_write(path):
    """Context manager: a temporary path to write to, renamed to ``path``.

    The temporary file lies in ``path``'s folder (created if needed), so the
    rename never crosses file systems, and its name ends with ``path``'s own
    name, so that writers that choose the format from the extension
    (nibabel's ``.nii.gz``, matplotlib's ``.png``) write the right one. If
    the block raises, the temporary file is removed and ``path`` is left as
    it was.

    Parameters
    ----------
    path : str or os.PathLike

    Yields
    ------
    str
        The temporary path; write the whole file there.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> with atomic_write(target) as tmp:
    ...     np.save(tmp, np.arange(3))
    >>> np.load(target).tolist()
    [0, 1, 2]
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{secrets.token_hex(4)}-{name}")
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        yield tmp
        if not os.path.isfile(tmp):
            raise OSError(errno.EIO, f"nothing was written for {path}")
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as err:
        # One message naming the output and the cause, the file that was
        # there before left as it was.
        raise WriteError.of(path, err, fix=_KEPT_OUTPUT) from err
    finally:
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)


_KEPT_OUTPUT = (
    "The file that was there before (if any) is unchanged; free space or "
    "choose another folder, and run again."
)


def check_outputs(outputs, *, folders=()):
    """Refuse outputs that would overwrite each other or cannot be written.

    Checked by the command-line tools before any data is read: two outputs
    that resolve to the same path (``out_s0="status.nii.gz"``: one map
    written over the other), a file output that is a folder, or a folder
    output that is a file.

    Parameters
    ----------
    outputs : iterable of (str, path)
        ``(name, path)`` of every output, named as the argument that gives
        it (``"out_s0"``); a name may come more than once (an output
        written as several files).
    folders : container of str
        The names of the outputs that are folders.

    Raises
    ------
    OptionError
        Naming both outputs and the path, or the output and what it must
        be (a command rewords them in its flags).
    """
    owners = {}
    for key, path in outputs:
        path = os.fspath(path)
        real = os.path.realpath(path)
        if real in owners and owners[real] != key:
            raise OptionError(
                f"{owners[real]} and {key} both write {path!r}: one output "
                "would overwrite the other; give each its own name",
                options=(owners[real], key),
            )
        owners[real] = key
        if key in folders and os.path.isfile(path):
            raise OptionError(
                f"{key}={path!r} is a file, but it names a folder of outputs; "
                "give a folder name",
                options=(key,),
            )
        if key not in folders and os.path.isdir(path):
            raise OptionError(
                f"{key}={path!r} is a folder, but it names an output file; give "
                "a file name (or remove the folder)",
                options=(key,),
            )


#: The lock file of an output folder (:func:`output_lock`).
LOCK_NAME = ".dipy_spinverse.lock"


@contextlib.contextmanager
def output_lock(folder, *, command, option="folder"):
    """Hold an output folder while a command writes to it: a second run
    writing there is refused at once, with a message, instead of the two
    overwriting each other's checkpoint and maps.

    An advisory lock on ``folder/.dipy_spinverse.lock`` (``filelock``:
    ``flock`` on POSIX, ``msvcrt`` on Windows), released by the system when
    the process ends, so a killed run leaves no stale lock behind.

    Parameters
    ----------
    folder : str or os.PathLike
    command : str
        The command's name, for the message.
    option : str, optional
        The argument that gave ``folder``, as the message names it (a
        command's ``"out_dir"``).

    Raises
    ------
    OptionError
        When another process holds the folder, or it cannot be locked,
        naming ``option`` (a command rewords it in its flags).
    """
    from filelock import FileLock, Timeout

    path = os.path.join(os.fspath(folder), LOCK_NAME)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OptionError(
            f"another dipy_spinverse run is writing to {os.fspath(folder)!r} (it "
            f"holds {path!r}); wait for it to finish, or give this {command} run "
            f"another {option}",
            options=(option,),
        ) from None
    except OSError as err:
        raise OptionError(
            f"cannot lock the output folder {os.fspath(folder)!r} "
            f"({describe_cause(err)}); "
            f"give a writable {option}",
            options=(option,),
        ) from err
    try:
        yield path
    finally:
        lock.release()


#: The staging folder of :class:`StagedOutputs`, renamed "done" once its set
#: is in place, and its journal of the set's renames.
STAGING_PREFIX = ".spinverse-staging-"
_DONE_PREFIX = ".spinverse-done-"
JOURNAL_NAME = "journal.json"


class StagedOutputs:
    """A run's outputs replace the previous run's as one set, never mixed.

    Each file is atomic (:func:`atomic_write`), a set of them is not. So the
    set is written into ``<folder>/.spinverse-staging-<pid>`` (:meth:`stage`),
    and :meth:`commit` writes a journal (the commit point), moves the old
    set into the staging folder's trash and the new one into place (renames;
    Ctrl-C and SIGTERM wait), then deletes the staging folder. A run killed
    before the journal leaves the old set, after it a swap the next run
    finishes (:func:`recover_staged`). An exception before :meth:`commit`
    deletes what was staged. Use it holding ``folder``'s :func:`output_lock`.

    Parameters
    ----------
    folder : str or os.PathLike
        The output folder; its staging folder lies in it.
    """

    def __init__(self, folder):
        self.folder = os.path.abspath(os.fspath(folder))
        self.root = os.path.join(self.folder, f"{STAGING_PREFIX}{os.getpid()}")
        self.committed = False  # whether the new set is in place
        self._mirrors = {}  # a target folder -> its mirror in the staging folder

    def __enter__(self):
        recover_staged(self.folder)  # a killed run's staging folder first
        os.makedirs(self.root)
        return self

    def __exit__(self, kind, err, traceback):
        if self.committed or os.path.exists(os.path.join(self.root, JOURNAL_NAME)):
            return
        shutil.rmtree(self.root, ignore_errors=True)  # the old set is whole
        if isinstance(err, WriteError):  # named as the output, not staged
            text = err.strerror
            for parent, mirror in self._mirrors.items():
                text = text.replace(mirror, parent)
            raise WriteError(err.errno, text, self.folder) from err

    def stage(self, path):
        """Where to write the output ``path`` (a file or a folder): what is
        written beside or inside it goes beside or inside ``path``.

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        str
        """
        parent, name = os.path.split(os.path.abspath(os.fspath(path)))
        mirror = os.path.join(self.root, "new", str(len(self._mirrors)))
        return os.path.join(self._mirrors.setdefault(parent, mirror), name)

    def commit(self, replaces=(), discard=()):
        """Swap the staged files in for the previous set's.

        Parameters
        ----------
        replaces : iterable of path
            The previous set's files: each that exists is removed.
        discard : iterable of path
            Files removed once the new set is in place (a checkpoint).

        Returns
        -------
        written, removed : list of str
            The new set's files; the previous set's that none replaced.

        Raises
        ------
        WriteError
            A rename that failed; the previous set is put back.
        """
        journal = self._journal(replaces, discard)
        with _signals_held():
            with atomic_write(os.path.join(self.root, JOURNAL_NAME)) as tmp:
                with open(tmp, "w") as f:
                    json.dump(journal, f)
            try:
                _swap(self.root, self.folder, journal)
            except OSError as err:
                try:
                    _roll_back(self.root, self.folder, journal)
                    fix = f"{self.folder} keeps the previous run's outputs."
                except OSError:
                    fix = f"The next run into {self.folder} finishes the swap."
                path = getattr(err, "filename", None) or self.folder
                raise WriteError.of(path, err, during="swapping", fix=fix) from err
            except BaseException:  # not held (not the main thread): finished
                _swap(self.root, self.folder, journal)
                self.committed = True
                raise
            self.committed = True
        new = [os.path.join(self.folder, target) for _, target in journal["new"]]
        old = {os.path.join(self.folder, rel) for rel in journal["old"]}
        return new, sorted(old - set(new))

    def _journal(self, replaces, discard):
        """The swap's renames, relative to the folder (which may be moved
        before a next run finishes them)."""

        def relative(path):
            return os.path.relpath(os.path.abspath(path), self.folder)

        new, dirs = [], []
        for parent, mirror in self._mirrors.items():
            for top, folders, files in os.walk(mirror):
                target = os.path.join(parent, os.path.relpath(top, mirror))
                dirs += [relative(os.path.join(target, d)) for d in folders]
                for name in files:
                    source = os.path.relpath(os.path.join(top, name), self.root)
                    new.append([source, relative(os.path.join(target, name))])
        old = [relative(p) for p in replaces if os.path.lexists(p)]
        return dict(new=new, dirs=dirs, old=old, discard=list(map(relative, discard)))


def recover_staged(folder):
    """Finish or undo what an interrupted run left in an output folder.

    A staging folder of :class:`StagedOutputs` without its journal (an
    incomplete set) is deleted; with it, its swap is finished. A warning
    names the folder. Call it holding the folder's :func:`output_lock`.

    Parameters
    ----------
    folder : str or os.PathLike

    Returns
    -------
    list of str
        The staging folders dealt with.
    """
    folder = os.path.abspath(os.fspath(folder))
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        root = os.path.join(folder, name)
        if name.startswith(_DONE_PREFIX):  # its set is in place
            shutil.rmtree(root, ignore_errors=True)
        if not name.startswith(STAGING_PREFIX) or not os.path.isdir(root):
            continue
        found.append(root)
        try:
            with open(os.path.join(root, JOURNAL_NAME)) as f:
                journal = json.load(f)
        except (OSError, ValueError):
            shutil.rmtree(root, ignore_errors=True)
            logger.warning(
                f"Removed {root}, the unfinished outputs of an interrupted run: "
                f"{folder} keeps the outputs it had before that run."
            )
            continue
        try:
            _swap(root, folder, journal)
        except OSError as err:
            fix = "Free space or fix the permission, and run again."
            raise WriteError.of(root, err, during="finishing", fix=fix) from err
        logger.warning(
            f"Finished the swap of outputs that an interrupted run began in "
            f"{folder} (from {root}): the folder holds that run's outputs."
        )
    return found


def _swap(root, folder, journal):
    """The previous set aside, the new one in, the staging folder deleted;
    run again, it finishes a swap cut short anywhere."""
    pending = {t for s, t in journal["new"] if os.path.lexists(os.path.join(root, s))}
    targets = {t for _, t in journal["new"]}
    os.makedirs(os.path.join(root, "trash"), exist_ok=True)
    # shutil.move renames, or copies across file systems (an out_* path
    # elsewhere): a copy cut short is redone, its source is kept until whole.
    for i, rel in enumerate(journal["old"]):
        path = os.path.join(folder, rel)
        # A target that holds its new file already is not the old set's.
        if (rel in pending or rel not in targets) and os.path.lexists(path):
            shutil.move(path, os.path.join(root, "trash", str(i)))
    for rel in journal["dirs"]:
        os.makedirs(os.path.join(folder, rel), exist_ok=True)
    for source, target in journal["new"]:
        if target in pending:
            path = os.path.join(folder, target)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.move(os.path.join(root, source), path)
    for rel in journal["discard"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, rel))
    # Renamed first: half deleted, it would read as an incomplete set.
    done = os.path.join(folder, _DONE_PREFIX + secrets.token_hex(4))
    os.replace(root, done)
    shutil.rmtree(done, ignore_errors=True)


def _roll_back(root, folder, journal):
    """Undo a swap (the old set back in place), delete the staging folder."""
    for source, target in journal["new"]:
        staged, path = os.path.join(root, source), os.path.join(folder, target)
        if not os.path.lexists(staged) and os.path.lexists(path):
            shutil.move(path, staged)
    for i, rel in enumerate(journal["old"]):
        aside = os.path.join(root, "trash", str(i))
        if os.path.lexists(aside):
            shutil.move(aside, os.path.join(folder, rel))
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _signals_held(signals=(signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C and SIGTERM delivered after the block, not within it (Python
    handles signals in the main thread only: elsewhere none is held)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught, previous = [], {}
    for number in signals:
        previous[number] = signal.signal(number, lambda n, _: caught.append(n))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)


def save_image(path, data, affine=None, reference=None, *, description=None):
    """Write ``data`` as a NIfTI image, atomically.

    Through a temporary file beside ``path``, then a rename: an interrupted
    run never leaves a half-written image.

    Parameters
    ----------
    path : str or os.PathLike
    data : ndarray
    affine : ndarray (4, 4), optional
        Voxel-to-world affine (default identity).
    reference : nibabel image or Nifti1Header, optional
        The image the data came from: the output keeps its qform and sform
        codes and its spatial unit (default: sform code 2, "aligned", no
        qform, mm).

    description : str, optional
        The header's ``descrip`` field (at most 80 characters): what the
        values are and their unit, which viewers show.

    Returns
    -------
    str
        The path written.
    """
    image = _image_in_space(data, affine, reference, description)
    with atomic_write(path) as tmp:
        image.to_filename(tmp)
    return os.fspath(path)


def _space_of(reference):
    """(qform code, sform code, spatial unit) of a reference image or header:
    the reference's, or nibabel's default codes (0, 2) and mm (the unit of
    the affines this package writes) where it has none."""
    if reference is None:
        return 0, 2, "mm"
    header = getattr(reference, "header", reference)
    if not isinstance(header, nib.Nifti1Header):
        raise TypeError(
            "reference must be a NIfTI image or header (nibabel), got "
            f"{type(reference).__name__}; pass the image the data came from."
        )
    qform, sform = int(header["qform_code"]), int(header["sform_code"])
    if qform == 0 and sform == 0:  # no code to keep: the affine is aligned
        qform, sform = 0, 2
    unit = header.get_xyzt_units()[0]
    return qform, sform, "mm" if unit == "unknown" else unit


#: What a damaged or truncated image raises while nibabel reads it.
_DAMAGED = (EOFError, zlib.error, OSError, ImageFileError, ValueError)


def load_image(path, what="image"):
    """The NIfTI image at ``path``, its data not read yet (nibabel's proxy).

    The file is kept open, so that reading it volume by volume
    (:func:`read_voxels`) decompresses a ``.nii.gz`` once, front to back.

    A gzipped file is checked whole first (:func:`verify_gzip`): nibabel
    stops reading before the gzip trailer, so a damaged ``.nii.gz`` would
    otherwise be read as data.

    Parameters
    ----------
    path : str or path-like
        The NIfTI file (``.nii`` or ``.nii.gz``).
    what : str, optional
        What the image is, named in errors.

    Returns
    -------
    nibabel.spatialimages.SpatialImage
        The image, with its file kept open and its data not yet read.

    Raises
    ------
    ValueError
        Naming ``what`` and the file when it is missing, not an image, or
        damaged, instead of nibabel's ``FileNotFoundError`` or "Cannot work
        out file type".
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} does not exist; check the path.")
    verify_gzip(path, what)
    try:
        return nib.load(path, keep_file_open=True)
    except _DAMAGED as err:
        raise ValueError(
            f"{what} {path} cannot be read as a NIfTI image ({err}); pass a "
            ".nii or .nii.gz file, and write it again if it is damaged."
        ) from err


#: The first bytes of a gzip stream.
_GZIP_MAGIC = b"\x1f\x8b"

#: Bytes decompressed at a time by :func:`verify_gzip`.
_VERIFY_BYTES = 1 << 24


def verify_gzip(path, what="file"):
    """Check a gzip file's CRC-32 and length by reading it to its end once.

    gzip stores both in the trailer of each stream, which a reader that
    stops after the bytes it needs (nibabel reading an image's volumes)
    never reaches: flipped bytes inside a ``.nii.gz`` would be fitted as
    data. This costs one decompression of the file (about a second per
    300 MB of image on one core). Files that are not gzip pass untouched.

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        The file's role in the message (e.g. ``"input_files"``).

    Raises
    ------
    ValueError
        Naming ``what`` and the file when its checksum or length does not
        match, or it ends early.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        if f.read(2) != _GZIP_MAGIC:
            return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(_VERIFY_BYTES):
                pass
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(
            f"{what} {path} is damaged or truncated: reading its gzip stream to "
            f"the end failed ({type(err).__name__}: {err}), so its values cannot be "
            "trusted; copy or write the file again."
        ) from err


def read_voxels(image, mask, what="image"):
    """The voxels of ``mask`` of a 4-D image, read one volume at a time.

    Memory grows with the mask, not with the image: at most one 3-D volume
    is held besides the result, so a few voxels of a brain-sized
    ``.nii.gz`` cost megabytes, where loading the image whole costs
    gigabytes.

    Parameters
    ----------
    image : nibabel image or str or os.PathLike
        4-D (x, y, z, volumes); a path is opened with :func:`load_image`.
    mask : ndarray of bool (x, y, z)
    what : str
        The image's role in error messages (e.g. ``"input_files"``).

    Returns
    -------
    ndarray (n_mask, n_volumes)
        ``data[mask]`` in C order of the mask, in the image's own data type
        (or float64 when the header scales the values).

    Raises
    ------
    ValueError
        Naming the file when it ends early or is damaged.
    """
    if not isinstance(image, nib.spatialimages.SpatialImage):
        image = load_image(image, what)
    mask = np.asarray(mask, dtype=bool)
    shape = image.shape
    if len(shape) != 4 or shape[:3] != mask.shape:
        raise ValueError(
            f"{what} {image.get_filename()} has shape {shape}; read_voxels needs "
            f"a 4-D image whose first three axes are the mask's {mask.shape}."
        )
    out = None
    try:
        for volume in range(shape[3]):
            values = np.asanyarray(image.dataobj[..., volume])[mask]
            if out is None:
                out = np.empty((values.size, shape[3]), dtype=values.dtype)
            out[:, volume] = values
    except _DAMAGED as err:
        raise ValueError(
            f"{what} {image.get_filename()} is damaged or truncated: reading "
            f"volume {volume} of {shape[3]} failed ({type(err).__name__}: "
            f"{err}); copy or write the file again."
        ) from err
    return out


def save_voxels(
    path, rows, mask, affine=None, reference=None, *, fill=0.0, description=None
):
    """Write per-voxel values of a mask as a NIfTI image, atomically.

    The image is written one volume at a time from ``rows``, so memory grows
    with the mask (plus one 3-D volume), never with the volume times the
    values per voxel: per-voxel vectors of a brain-sized mask (predicted
    signals, per-face permeabilities) would take gigabytes as one array.

    Parameters
    ----------
    path : str or os.PathLike
    rows : ndarray (n_mask,) or (n_mask, n_values)
        The values of the voxels of ``mask``, in C order (``volume[mask]``).
    mask : ndarray of bool, 3-D
    affine : ndarray (4, 4), optional
    reference : nibabel image or Nifti1Header, optional
        As in :func:`save_image`.
    fill : float
        The value outside the mask.
    description : str, optional
        The header's ``descrip`` field (at most 80 characters): what the
        values are and their unit, which viewers show.

    Returns
    -------
    str
        The path written.
    """
    rows = np.asarray(rows)
    mask = np.asarray(mask, dtype=bool)
    if rows.shape[:1] != (int(mask.sum()),):
        raise ValueError(
            f"rows has {rows.shape[:1]} voxels but mask selects {int(mask.sum())}; "
            "pass volume[mask]."
        )
    extra = rows.shape[1:]
    columns = rows.reshape(len(rows), -1)
    header = _header(affine, reference, mask.shape + extra, rows.dtype, description)
    with atomic_write(path) as tmp:
        with nib.openers.ImageOpener(tmp, "wb") as stream:
            header.write_to(stream)
            stream.write(b"\0" * (int(header["vox_offset"]) - stream.tell()))
            volume = np.full(mask.shape, fill, dtype=rows.dtype)
            # NIfTI is Fortran-ordered: the last axes vary slowest, so each
            # column of values is one contiguous 3-D volume of the file.
            columns_c = np.arange(columns.shape[1]).reshape(extra or (1,))
            for column in columns_c.reshape(-1, order="F"):
                volume[mask] = columns[:, column]
                stream.write(volume.tobytes(order="F"))
    return os.fspath(path)


def _description(text):
    text = str(text)
    if len(text.encode()) > 80:
        raise ValueError(f"description must fit in 80 bytes (NIfTI descrip): {text!r}")
    return text


def _image_in_space(data, affine, reference, description=None):
    """``data`` as a NIfTI image in the space of ``reference`` (its qform and
    sform codes and spatial unit, :func:`_space_of`), with ``description``
    in its ``descrip`` field."""
    affine = check_affine(affine)
    image = nib.Nifti1Image(data, affine)
    qform, sform, units = _space_of(reference)
    # The codes say what the affine maps to (1 scanner, 2 aligned, ...):
    # a map of the DWI lives where the DWI does, so it keeps the input's
    # codes (registration tools that read the qform need it set).
    image.set_qform(affine, code=qform)
    image.set_sform(affine, code=sform)
    image.header.set_xyzt_units(xyz=units)
    if description is not None:
        image.header["descrip"] = _description(description)
    return image


def _header(affine, reference, shape, dtype, description=None):
    """A single-file NIfTI-1 header of an image of ``shape`` and ``dtype`` in
    the space of :func:`save_image`."""
    empty = np.zeros((1,) * len(shape), dtype)
    header = _image_in_space(empty, affine, reference, description).header
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header
