"""Shared-memory segments for the machine-wide limits: file layout, locking, holder identity.

This is the only module that touches raw shared memory; `semaphore.py` and `rate_gate.py`
go through the typed views at the bottom (`SemaphoreSlots`, `WindowRing`).

Where a segment lives
---------------------
One named limit part is one file, ``/dev/shm/procqueue.<kind>.<name>`` (``<kind>`` is
``sem`` or ``rate``), mapped with ``mmap(MAP_SHARED)``.  /dev/shm is a tmpfs: the file lives
in RAM, outlives every process that opens it (so two programs started separately share it)
and is removed by ``unlink()`` or a reboot.  We use a plain file rather than
``multiprocessing.shared_memory`` because that module registers every segment a process
attaches with the resource tracker, which unlinks it when that process exits
(https://github.com/python/cpython/issues/82300): a limit shared by independent programs
must survive any one of them, and the tracker would be one more helper process.

Layout (little-endian; offsets in bytes)
----------------------------------------
::

     0  8s  magic  b"PQLIMIT\\0"  written last on creation: a creator that died half-way
                                  leaves a zero magic, and the next opener initialises again
     8  I   layout version (1)
    12  I   kind (1 = semaphore, 2 = rate gate)
    16  Q   capacity   (semaphore value | rate-gate limit)
    24  d   parameter  (0.0 | rate-gate period in seconds)
    32      body

    semaphore body: `capacity` slots of 16 bytes, one per permit
        +0  q  holder pid, 0 = free
        +8  d  holder start time (psutil create_time, seconds since the epoch); with the pid
               it names one process even after the kernel reuses the pid
    rate-gate body: a ring of the last `capacity` start times
        +0  Q  cursor: index of the oldest start (the next one to overwrite)
        +8  d  x capacity: start times on the gate's clock, ascending from the cursor;
               -inf = no start yet

Locking
-------
Every read-modify-write of a body happens under ``flock(LOCK_EX)`` on the segment file
itself.  flock locks belong to an open file description, so the kernel drops them when the
holder dies, even by SIGKILL: a crash can never leave the lock held.  Each `Segment` opens its
own description, and a forked child reopens one (it would otherwise share its parent's, and
with it the parent's lock); a threading.Lock serialises threads sharing one `Segment`, which
flock does not.  The lock is held for microseconds (a few struct reads/writes), except while
a semaphore checks whether its holders are still alive (one /proc read per holding process).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import math
import mmap
import os
import re
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..procfs import stat_fields

# tmpfs shared by every process of the machine; fall back to the temp dir where it is missing.
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
FILE_PREFIX = "procqueue"

# Readable and writable by the owning user only: a limit is shared between the programs of
# one user.  Programs of different users opening one name get a PermissionError.
_FILE_MODE = 0o600

_NAME_RULE = "1-200 characters from [A-Za-z0-9_.-], starting with a letter or digit"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")

_MAGIC = b"PQLIMIT\x00"
_LAYOUT_VERSION = 1
_HEADER = struct.Struct("<8sIIQd")
HEADER_SIZE = _HEADER.size  # 32 bytes; bodies start here

# open() retries when another process unlinks the file between our open() and flock().
_OPEN_ATTEMPTS = 100

# A holder is its pid and its start time, so that a reused pid differs.  The start time is
# /proc/PID/stat's, in seconds since boot: it never changes.  psutil's create_time adds the
# kernel's boot time (/proc/stat btime), whole seconds that step when the wall clock is
# adjusted (NTP, a VM's clock), so a holder identified by it looked dead to a later reader
# and lost its permit to whoever reclaimed it.  Start times below _SINCE_BOOT_MAX_S are since
# boot; an identity written by an earlier procqueue (seconds since the epoch) is still read,
# with room for one such step.
_START_TIME_TOLERANCE_S = 0.05
_EPOCH_START_TIME_TOLERANCE_S = 1.5
_SINCE_BOOT_MAX_S = 1e9  # 31 years of uptime
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class SegmentKind(enum.IntEnum):
    SEMAPHORE = 1
    RATE_GATE = 2

    @property
    def file_tag(self) -> str:
        return "sem" if self is SegmentKind.SEMAPHORE else "rate"


class SegmentState(enum.Enum):
    OPEN = "open"  # mapped and usable
    CLOSED = "closed"  # unmapped; every operation raises ValueError


def validate_name(name: object) -> str:
    """Return `name` if it can name a shared segment, else raise naming the rule."""
    if not isinstance(name, str):
        raise TypeError(f"a limit name must be a str, not {type(name).__name__}")
    if _NAME_RE.fullmatch(name) is None:
        raise ValueError(f"a limit name must be {_NAME_RULE}; got {name!r}")
    return name


def segment_path(kind: SegmentKind, name: str) -> Path:
    return SHM_DIR / f"{FILE_PREFIX}.{kind.file_tag}.{validate_name(name)}"


def segment_names(kind: SegmentKind) -> list[str]:
    """The names of the segments of `kind` on this machine, sorted; files whose name is no
    limit name (not made by procqueue) are left out."""
    prefix = f"{FILE_PREFIX}.{kind.file_tag}."
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return []
    names = (entry.name[len(prefix):] for entry in entries
             if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False))
    return sorted(name for name in names if _NAME_RE.fullmatch(name))


def read_header(kind: SegmentKind, name: str) -> tuple[int, float] | None:
    """(capacity, parameter) of the existing segment `name` of `kind`, which an opener must
    pass to attach to it; None when there is none, or only a file its creator never finished
    (or one of another layout version)."""
    try:
        fd = os.open(segment_path(kind, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # not half-way through a creator's initialisation
        raw = os.pread(fd, HEADER_SIZE, 0)
    finally:
        os.close(fd)  # drops the lock
    if len(raw) < HEADER_SIZE:
        return None
    magic, version, found_kind, capacity, parameter = _HEADER.unpack(raw)
    if magic != _MAGIC or version != _LAYOUT_VERSION or found_kind != kind:
        return None
    return int(capacity), float(parameter)


def unlink_segment(kind: SegmentKind, name: str) -> bool:
    """Remove the named segment's file; True if there was one.  Processes that still have it
    open keep using the old memory, and a later opener creates a fresh segment."""
    try:
        os.unlink(segment_path(kind, name))
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class SegmentSpec:
    """What an opener expects to find; every opener of one name must agree."""

    kind: SegmentKind
    name: str
    capacity: int
    parameter: float
    body_size: int
    label: str  # "semaphore", "rate gate": for messages
    capacity_label: str  # "value", "limit"
    parameter_label: str  # "period_s"; unused when parameter is always 0.0

    def describe(self, capacity: int, parameter: float) -> str:
        text = f"{self.capacity_label}={capacity}"
        if self.kind is SegmentKind.RATE_GATE:
            text += f", {self.parameter_label}={parameter}"
        return text


class Segment:
    """One mapped, lockable shared segment; create it, or attach to the existing one (only
    that with create=False: FileNotFoundError when there is none)."""

    def __init__(self, spec: SegmentSpec, *, create: bool = True) -> None:
        self.spec = spec
        self.path = segment_path(spec.kind, spec.name)
        self._thread_lock = threading.Lock()
        self._fd, self._map = _open_mapped(spec, self.path, create)
        self._file_id = _file_id(os.fstat(self._fd))
        self._pid = os.getpid()
        self._state = SegmentState.OPEN

    @property
    def state(self) -> SegmentState:
        return self._state

    @contextlib.contextmanager
    def locked(self) -> Iterator[mmap.mmap]:
        """Hold the machine-wide lock; yields the mapping for the layout views."""
        self._reopen_after_fork()
        with self._thread_lock:
            self._check_open()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield self._map
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def unlink(self) -> bool:
        """Remove the file if it is still this segment (not already replaced by a newer one
        of the same name); works before and after close()."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # no opener is half-way through initialising it
            if _file_id(os.fstat(fd)) != self._file_id or not _is_linked(fd, self.path):
                return False
            os.unlink(self.path)
            return True
        finally:
            os.close(fd)  # drops the lock

    def close(self) -> None:
        """Unmap; idempotent.  The segment itself stays for other processes."""
        with self._thread_lock:
            if self._state is SegmentState.CLOSED:
                return
            self._state = SegmentState.CLOSED
            self._map.close()
            os.close(self._fd)

    def _check_open(self) -> None:
        if self._state is SegmentState.CLOSED:
            raise ValueError(f"{self.spec.label} {self.spec.name!r} is closed")

    def _reopen_after_fork(self) -> None:
        if self._pid == os.getpid() or self._state is SegmentState.CLOSED:
            return
        # A forked child shares its parent's open file description, hence its flock, so the
        # two would not exclude each other.  /proc/self/fd reopens the same inode (even if
        # it was unlinked meanwhile) as a new description; the mapping stays valid.
        fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
        os.close(self._fd)
        self._fd = fd
        # The parent's thread lock may have been held by a thread that does not exist here.
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()


def _open_mapped(spec: SegmentSpec, path: Path, create: bool) -> tuple[int, mmap.mmap]:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    for _ in range(_OPEN_ATTEMPTS):
        fd = os.open(path, flags, _FILE_MODE)
        try:
            mapping = _map_locked(spec, path, fd, create)
        except BaseException:
            os.close(fd)
            raise
        if mapping is not None:
            return fd, mapping
        os.close(fd)
    raise OSError(f"{path} was unlinked {_OPEN_ATTEMPTS} times while being opened")


def _map_locked(spec: SegmentSpec, path: Path, fd: int, create: bool) -> mmap.mmap | None:
    """Under the lock: initialise a new file or check an existing one, then map it.
    None when the file was unlinked (and maybe recreated) between open() and flock()."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        if not _is_linked(fd, path):
            if not create:  # unlinked meanwhile: retrying would find no file
                raise FileNotFoundError(errno.ENOENT, f"no {spec.label} {spec.name!r}", str(path))
            return None
        size = HEADER_SIZE + spec.body_size
        if _read_magic(fd) != _MAGIC:
            if not create:  # a creator died half-way: there is no usable segment
                raise FileNotFoundError(errno.ENOENT, f"no {spec.label} {spec.name!r}", str(path))
            _initialise(spec, fd, size)
        else:
            _check_header(spec, path, fd, size)
        return mmap.mmap(fd, size)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _is_linked(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _file_id(stat: os.stat_result) -> tuple[int, int]:
    return (stat.st_dev, stat.st_ino)


def _read_magic(fd: int) -> bytes:
    return os.pread(fd, len(_MAGIC), 0)


def _initialise(spec: SegmentSpec, fd: int, size: int) -> None:
    os.ftruncate(fd, 0)  # zero everything a half-finished creator may have left
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as mapping:
        _initialise_body(spec, mapping)
        header = _HEADER.pack(_MAGIC, _LAYOUT_VERSION, spec.kind, spec.capacity, spec.parameter)
        mapping[0:HEADER_SIZE] = header  # magic last: the segment is valid from here on


def _initialise_body(spec: SegmentSpec, mapping: mmap.mmap) -> None:
    # Semaphore slots start zeroed (pid 0 = free); the ring needs explicit "never" times.
    if spec.kind is SegmentKind.RATE_GATE:
        ring = WindowRing(mapping, spec.capacity)
        ring.set_cursor(0)
        for index in range(spec.capacity):
            ring.set_time_at(index, -math.inf)


def _check_header(spec: SegmentSpec, path: Path, fd: int, size: int) -> None:
    _magic, version, kind, capacity, parameter = _HEADER.unpack(os.pread(fd, HEADER_SIZE, 0))
    if version != _LAYOUT_VERSION or kind != spec.kind:
        raise ValueError(
            f"{path} is not a procqueue {spec.label} of layout version {_LAYOUT_VERSION} "
            f"(found kind {kind}, version {version}); unlink it if no program uses it"
        )
    if capacity != spec.capacity or parameter != spec.parameter:
        raise ValueError(
            f"{spec.label} {spec.name!r} already exists with "
            f"{spec.describe(capacity, parameter)}, but this opener asked for "
            f"{spec.describe(spec.capacity, spec.parameter)}; every process must open a name "
            f"with the same values (or unlink it when no program uses it)"
        )
    if os.fstat(fd).st_size != size:
        raise ValueError(f"{path} has size {os.fstat(fd).st_size}, expected {size}")


# -- holder identity --------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessIdentity:
    """A process on this machine: its pid plus its start time, so a reused pid differs."""

    pid: int
    start_time: float


_current: ProcessIdentity | None = None


def current_identity() -> ProcessIdentity:
    """This process's identity (cached, and recomputed in a forked child)."""
    global _current
    if _current is None or _current.pid != os.getpid():
        pid = os.getpid()
        since_boot = _started_since_boot(pid)
        if since_boot is None:  # no /proc (not Linux): psutil's start time, since the epoch
            import psutil  # here, not at import: a pool without limits never needs it (~8 ms)

            _current = ProcessIdentity(pid, float(psutil.Process(pid).create_time()))
        else:
            _current = ProcessIdentity(pid, since_boot[1])
    return _current


def is_alive(holder: ProcessIdentity) -> bool:
    """False once the process has exited (zombies included: a SIGKILLed child its parent has
    not reaped yet holds nothing) or its pid now belongs to another process."""
    if holder.start_time < _SINCE_BOOT_MAX_S:
        try:
            found = _started_since_boot(holder.pid)
        except PermissionError:
            return True  # it exists and we may not look closer: assume the holder lives
        if found is None:
            return False
        state, start_time = found
        return state != "Z" and abs(start_time - holder.start_time) <= _START_TIME_TOLERANCE_S
    return _is_alive_by_epoch_start(holder)


def _started_since_boot(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in seconds since boot) of process `pid` from /proc, None if
    there is no such process (or no /proc)."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return fields[0].decode(), int(fields[19]) / _CLOCK_TICKS


def _is_alive_by_epoch_start(holder: ProcessIdentity) -> bool:
    import psutil

    try:
        proc = psutil.Process(holder.pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            start_time = float(proc.create_time())
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return abs(start_time - holder.start_time) <= _EPOCH_START_TIME_TOLERANCE_S


# -- typed views over the bodies (callers hold Segment.locked()) --------------------------


class SemaphoreSlots:
    """The semaphore body: one slot per permit, holding the identity of its holder."""

    _SLOT = struct.Struct("<qd")

    def __init__(self, mapping: mmap.mmap, value: int) -> None:
        self._map = mapping
        self._value = value

    @classmethod
    def body_size(cls, value: int) -> int:
        return cls._SLOT.size * value

    def read(self, index: int) -> ProcessIdentity | None:
        pid, start_time = self._SLOT.unpack_from(self._map, self._offset(index))
        return None if pid == 0 else ProcessIdentity(pid, start_time)

    def write(self, index: int, holder: ProcessIdentity | None) -> None:
        pid, start_time = (0, 0.0) if holder is None else (holder.pid, holder.start_time)
        self._SLOT.pack_into(self._map, self._offset(index), pid, start_time)

    def read_all(self) -> list[ProcessIdentity | None]:
        return [self.read(index) for index in range(self._value)]

    def _offset(self, index: int) -> int:
        if not 0 <= index < self._value:
            raise IndexError(f"slot {index} outside 0..{self._value - 1}")
        return HEADER_SIZE + self._SLOT.size * index


class WindowRing:
    """The rate-gate body: a cursor and a ring of the last `limit` start times."""

    _CURSOR = struct.Struct("<Q")
    _TIME = struct.Struct("<d")

    def __init__(self, mapping: mmap.mmap, limit: int) -> None:
        self._map = mapping
        self._limit = limit

    @classmethod
    def body_size(cls, limit: int) -> int:
        return cls._CURSOR.size + cls._TIME.size * limit

    def cursor(self) -> int:
        (cursor,) = self._CURSOR.unpack_from(self._map, HEADER_SIZE)
        return int(cursor)

    def set_cursor(self, cursor: int) -> None:
        self._CURSOR.pack_into(self._map, HEADER_SIZE, cursor)

    def time_at(self, index: int) -> float:
        (when,) = self._TIME.unpack_from(self._map, self._offset(index))
        return float(when)

    def set_time_at(self, index: int, when: float) -> None:
        self._TIME.pack_into(self._map, self._offset(index), when)

    def _offset(self, index: int) -> int:
        if not 0 <= index < self._limit:
            raise IndexError(f"ring index {index} outside 0..{self._limit - 1}")
        return HEADER_SIZE + self._CURSOR.size + self._TIME.size * index
