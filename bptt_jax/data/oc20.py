"""OC20 IS2RE/IS2RS LMDB files, decoded by an allow-list unpickler (neither torch_geometric nor torch needed).

An OC20 ``data.lmdb`` (opened with ``subdir=False``) maps the keys ``b"0"`` … ``b"N-1"`` to pickled
PyTorch-Geometric ``Data`` records and ``b"length"`` to a pickled ``N``. A record carries ``pos``
(initial, Å), ``pos_relaxed`` (Å), ``cell`` (1, 3, 3) Å, ``atomic_numbers`` (a float tensor), ``natoms``,
``tags`` (0 subsurface, 1 surface, 2 adsorbate), ``fixed``, ``sid``, and usually ``y_init`` /
``y_relaxed`` (adsorption energies, eV). Each record becomes a two-frame :class:`Trajectory`
``[initial, relaxed]`` with ``endpoints_only=True``, ``pbc`` all True, energies ``[y_init, y_relaxed]``
when both are present, ``id = str(sid)``, and no forces (a record holds at most the initial frame's).

Security: a pickle can run any callable it names, so records go through :class:`RecordUnpickler`, whose
``find_class`` returns only what these records need and refuses everything else with a one-line
:class:`DataError` naming the file, the record key and the refused ``module.name``:

* ``torch_geometric.data.data.Data`` — PyG 1.x keeps the attributes in ``__dict__``, PyG 2.x in a
  ``_store`` (``torch_geometric.data.storage.GlobalStorage``, whose ``_mapping`` holds them) — and
  ``DataEdgeAttr`` / ``DataTensorAttr`` (class references a PyG ≥ 2.3 record keeps); all map to small
  stand-in classes here;
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` and ``torch.storage._load_from_bytes`` — a
  pickled tensor is a storage rebuilt from ``torch.save`` bytes plus offset, size and stride; these map to
  a numpy decoder that parses those bytes itself (the legacy and the zip ``torch.save`` layouts) with a
  second unpickler that admits only the ``torch.*Storage`` type names, and that checks every view against
  its storage's bounds;
* ``collections.OrderedDict`` (a tensor's backward hooks), ``copyreg._reconstructor`` (protocol < 2
  objects; only with ``object`` as base), ``_codecs.encode`` (protocol-2 bytes; latin1 only),
  ``builtins`` ``set``, ``frozenset``, ``slice``, ``complex``, ``object``, and
  numpy's array and scalar reconstruction (``numpy.core.multiarray._reconstruct`` / ``scalar``,
  ``numpy.ndarray``, ``numpy.dtype``; ``numpy._core`` too).

Damaged files: liblmdb trusts the page numbers and sizes it finds in the file, so a truncated or damaged LMDB
would crash the process (SIGBUS) rather than raise. :func:`check_lmdb_file` walks the page tree with
bounds-checked reads first: a broken tree is a one-line error for the file, a value that runs past the end of the
file one for its record (the others are read). Any other failure of a record (unpickling, missing or malformed
fields) costs that record only.

If a storage uses a layout the numpy decoder does not know (e.g. the pre-2018 tar layout), the record is
decoded again with torch, still through the same allow-list, with the storage bytes loaded by
``torch.load(..., weights_only=True)``; without torch this is a one-line error asking for the ``lmdb``
extra (``pip install 'bptt-jax[lmdb]'``).
"""

from __future__ import annotations

import functools
import io
import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from bptt_jax.data.readers import Frame, MissingDependency, assemble, data_error
from bptt_jax.data.trajectory import DataError, Trajectory

INSTALL_HINT = "pip install 'bptt-jax[lmdb]' (installs lmdb and torch==2.13.0)"

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage type name -> numpy dtype ("bfloat16" has none: its bits are widened to float32).
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}


class NeedTorch(Exception):
    """The numpy decoder does not know this storage layout; torch does."""


class Refused(pickle.UnpicklingError):
    """A pickle named a global that is not on the allow-list."""

    def __init__(self, qualified: str, where: str = ""):
        super().__init__(f"refused to unpickle {qualified}{where}: not on the allow-list of OC20 record classes")
        self.qualified = qualified


# --------------------------------------------------------------------------------------------------
# Stand-ins for the PyG classes
# --------------------------------------------------------------------------------------------------


def _set_state(obj, state) -> None:
    # BUILD with a (dict, slots) pair or a dict; never calls anything named by the pickle.
    if isinstance(state, tuple) and len(state) == 2:
        merged = dict(state[0] or {})
        merged.update(state[1] or {})
        state = merged
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"unexpected state of type {type(state).__name__} for {type(obj).__name__}")
    obj.__dict__.update(state)


class PygData:
    """Stand-in for ``torch_geometric.data.data.Data`` (PyG 1.x and 2.x pickles)."""

    def __setstate__(self, state):
        _set_state(self, state)

    def attributes(self) -> dict:
        """The record's attributes (``pos``, ``cell``, ``sid``, ...), whichever PyG layout it was."""
        store = self.__dict__.get("_store")
        if isinstance(store, PygStorage):  # PyG 2.x
            mapping = store.__dict__.get("_mapping", {})
            return dict(mapping) if isinstance(mapping, dict) else {}
        # PyG 1.x: attributes in __dict__, with None for unset ones and dunder bookkeeping keys.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_") and v is not None}


class PygStorage:
    """Stand-in for ``torch_geometric.data.storage.GlobalStorage`` (attributes in ``_mapping``)."""

    def __setstate__(self, state):
        _set_state(self, state)


class PygAttrClass:
    """Stand-in for the ``DataEdgeAttr`` / ``DataTensorAttr`` classes a PyG 2.x record refers to."""


def _reconstructor(cls, base, state):
    # copyreg._reconstructor for protocol 0/1 pickles; cls was already vetted by find_class.
    if base is not object:
        raise pickle.UnpicklingError("copyreg._reconstructor with a base other than object")
    obj = object.__new__(cls)
    if state is not None:
        _set_state(obj, state)
    return obj


# --------------------------------------------------------------------------------------------------
# torch storages and tensors without torch
# --------------------------------------------------------------------------------------------------


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def decode(self, buf: bytes, little: bool = True) -> np.ndarray:
        order = "<" if little else ">"
        if self.dtype == "bfloat16":  # the high 16 bits of a float32
            bits = np.frombuffer(buf, np.dtype(np.uint16).newbyteorder(order)).astype(np.uint32)
            return (bits << 16).view(np.float32)
        dt = np.dtype(self.dtype)
        return np.frombuffer(buf, dt.newbyteorder(order) if dt.itemsize > 1 else dt).astype(dt)

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _Storage:
    def __init__(self, stype: _StorageType, numel: int):
        self.stype, self.numel, self.array = stype, int(numel), None


class _StorageView:
    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, int(offset), int(size)


class _StorageUnpickler(pickle.Unpickler):
    """The pickles inside ``torch.save`` bytes: only storage type names, data through persistent ids."""

    def __init__(self, file, persistent=None):
        super().__init__(file)
        self._persistent = persistent

    def find_class(self, module, name):
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module in ("torch", "torch.storage") and name in ("UntypedStorage", "TypedStorage"):
            raise NeedTorch(f"{module}.{name}")
        raise Refused(f"{module}.{name}", " inside a tensor storage")

    def persistent_load(self, pid):
        if self._persistent is None:
            raise pickle.UnpicklingError("unexpected persistent id")
        return self._persistent(pid)


def _storage_id(pid) -> tuple:
    pid = tuple(pid)
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage" or len(pid) < 5 or not isinstance(pid[1], _StorageType):
        raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
    return pid


def _decode_legacy(b: bytes) -> np.ndarray:
    """Storage bytes in torch's legacy ``torch.save`` layout (what a pickled storage always holds)."""
    f = io.BytesIO(b)
    if _StorageUnpickler(f).load() != _LEGACY_MAGIC:
        raise NeedTorch("not a legacy torch.save stream")
    _StorageUnpickler(f).load()  # protocol version
    sys_info = _StorageUnpickler(f).load()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}

    def persistent(pid):
        pid = _storage_id(pid)
        stype, key, _location, numel = pid[1:5]
        root = storages.setdefault(str(key), _Storage(stype, numel))
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # torch < 1.0 saved views of a root storage
            _view_key, offset, size = view
            return _StorageView(root, offset, size)
        return root

    result = _StorageUnpickler(f, persistent).load()
    for key in _StorageUnpickler(f).load():
        st = storages.get(str(key))
        if st is None:
            raise pickle.UnpicklingError(f"storage data for unknown key {key!r}")
        head = f.read(8)
        if len(head) != 8:
            raise pickle.UnpicklingError("truncated tensor storage")
        numel = int.from_bytes(head, "little" if little else "big", signed=True)
        nbytes = numel * st.stype.itemsize
        buf = f.read(nbytes) if 0 <= numel else b""
        if numel < 0 or len(buf) != nbytes:
            raise pickle.UnpicklingError("truncated tensor storage")
        st.array = st.stype.decode(buf, little)
    return _resolve(result)


def _decode_zip(b: bytes) -> np.ndarray:
    """Storage bytes in the zip ``torch.save`` layout (``archive/data.pkl`` + ``archive/data/<key>``)."""
    with zipfile.ZipFile(io.BytesIO(b)) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("data.pkl")), None)
        if pkl is None:
            raise NeedTorch("zip without data.pkl")
        prefix = pkl[: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = zf.read(prefix + "byteorder").decode().strip() != "big"

        def persistent(pid):
            pid = _storage_id(pid)
            stype, key = pid[1], pid[2]
            st = _Storage(stype, pid[4])
            st.array = stype.decode(zf.read(f"{prefix}data/{key}"), little)
            return st

        return _resolve(_StorageUnpickler(io.BytesIO(zf.read(pkl)), persistent).load())


def _resolve(obj) -> np.ndarray:
    if isinstance(obj, _StorageView):
        arr = obj.root.array
        if arr is None or obj.offset < 0 or obj.offset + obj.size > arr.size:
            raise pickle.UnpicklingError("storage view out of bounds")
        return arr[obj.offset:obj.offset + obj.size]
    if isinstance(obj, _Storage) and obj.array is not None:
        return obj.array
    raise pickle.UnpicklingError("tensor storage without data")


def load_storage(b: bytes) -> np.ndarray:
    """Numpy stand-in for ``torch.storage._load_from_bytes``: the flat storage as a 1-D array."""
    if not isinstance(b, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage bytes expected")
    if b[:4] == b"PK\x03\x04":
        return _decode_zip(bytes(b))
    return _decode_legacy(bytes(b))


def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                      metadata=None) -> np.ndarray:
    """Numpy stand-in for ``torch._utils._rebuild_tensor_v2``: a bounds-checked strided copy."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("tensor without a decoded storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride} offset={offset}")
    if 0 in size:
        return np.empty(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:  # a crafted stride must not read past the storage
        raise pickle.UnpicklingError("tensor view exceeds its storage")
    out = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                          strides=[s * storage.itemsize for s in stride]).copy()
    if isinstance(metadata, dict):
        if metadata.get("conj"):
            out = np.conj(out)
        if metadata.get("neg"):
            out = -out
    return out


def rebuild_tensor(storage, storage_offset, size, stride) -> np.ndarray:
    """Numpy stand-in for ``torch._utils._rebuild_tensor`` (pickles of torch < 1.0)."""
    return rebuild_tensor_v2(storage, storage_offset, size, stride)


# --------------------------------------------------------------------------------------------------
# The record unpickler
# --------------------------------------------------------------------------------------------------


def _numpy_globals() -> dict:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x writers
        out[(mod, "_reconstruct")] = multiarray._reconstruct
        out[(mod, "scalar")] = multiarray.scalar
    return out


def _latin1_encode(text, encoding="latin1"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); nothing else is allowed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 bytes")
    return text.encode("latin1")


@functools.lru_cache(maxsize=None)  # built once, not per record
def _common_globals() -> dict:
    out = {
        ("torch_geometric.data.data", "Data"): PygData,
        ("torch_geometric.data.data", "DataEdgeAttr"): PygAttrClass,
        ("torch_geometric.data.data", "DataTensorAttr"): PygAttrClass,
        ("collections", "OrderedDict"): OrderedDict,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("copy_reg", "_reconstructor"): _reconstructor,
        ("_codecs", "encode"): _latin1_encode,
    }
    for name in ("GlobalStorage", "BaseStorage", "NodeStorage", "EdgeStorage"):
        out[("torch_geometric.data.storage", name)] = PygStorage
    for mod in ("builtins", "__builtin__"):  # protocol <= 2 pickles name the module __builtin__
        for name, obj in (("set", set), ("frozenset", frozenset), ("slice", slice), ("complex", complex),
                          ("object", object)):
            out[(mod, name)] = obj
    out.update(_numpy_globals())
    return out


_NUMPY_DECODER = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): load_storage,
}


def _torch_decoder() -> dict:
    try:
        import torch
        import torch._utils
    except ImportError:
        raise MissingDependency(f"this OC20 LMDB stores tensors in a layout that needs torch to decode: "
                                f"{INSTALL_HINT}") from None

    def load_from_bytes(b):
        # torch's own _load_from_bytes uses weights_only=False (arbitrary code); never that.
        return torch.load(io.BytesIO(b), weights_only=True)

    return {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): load_from_bytes,
    }


class RecordUnpickler(pickle.Unpickler):
    """Unpickles one OC20 record, resolving only allow-listed globals (see the module docstring).

    Args:
      data: the pickled bytes.
      source, record: file and record key, for error messages.
      decoder: ``"numpy"`` (default; no torch needed) or ``"torch"``.
    """

    def __init__(self, data: bytes, source: object, record: object, decoder: str = "numpy"):
        super().__init__(io.BytesIO(data))
        self.source, self.record = source, record
        self.allowed = {**_common_globals(), **(_NUMPY_DECODER if decoder == "numpy" else _torch_decoder())}

    def find_class(self, module, name):
        obj = self.allowed.get((module, name))
        if obj is None:
            raise Refused(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids do not occur in OC20 records")


def _to_numpy(value):
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor (torch decoder)
        return value.detach().cpu().numpy()
    return value


def unpickle_record(data: bytes, source: object, record: object, decoder: str = "auto"):
    """Unpickle one record safely; the numpy decoder first, torch only for layouts it does not know.

    Raises:
      DataError: a refused class (``refused_class``) or bytes that do not unpickle (``unpickle``).
      MissingDependency: torch is needed but not installed.
    """
    order = ["numpy", "torch"] if decoder == "auto" else [decoder]
    for i, dec in enumerate(order):
        try:
            return RecordUnpickler(data, source, record, dec).load()
        except Refused as exc:
            raise data_error(source, record, str(exc), "refused_class") from None
        except NeedTorch:
            if i + 1 == len(order):
                raise data_error(source, record, "the numpy decoder does not know this tensor layout; "
                                                 "decode with torch", "unpickle") from None
        except MissingDependency:
            raise
        except Exception as exc:  # corrupt bytes raise anything from UnpicklingError to MemoryError
            raise data_error(source, record, f"cannot unpickle ({type(exc).__name__}: {exc})", "unpickle") from None
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# Records -> trajectories
# --------------------------------------------------------------------------------------------------


def _scalar(value) -> Optional[float]:
    if value is None:
        return None
    arr = np.asarray(_to_numpy(value), np.float64).reshape(-1)
    return float(arr[0]) if arr.size == 1 else None


def record_trajectory(source: object, record: str, obj) -> Trajectory:
    """A decoded record as a two-frame ``[initial, relaxed]`` trajectory (``endpoints_only``)."""
    if isinstance(obj, PygData):
        attrs = obj.attributes()
    elif isinstance(obj, dict):
        attrs = dict(obj)
    else:
        raise data_error(source, record, f"record is a {type(obj).__name__}, not a PyG Data", "malformed")
    attrs = {k: _to_numpy(v) for k, v in attrs.items()}

    def array(name: str, required: bool = True):
        value = attrs.get(name)
        if value is None:
            if required:
                hint = " (an S2EF LMDB? only IS2RE/IS2RS records hold a relaxation)" if name == "pos_relaxed" else ""
                raise data_error(source, record, f"no {name!r} attribute{hint}", "missing_field")
            return None
        return np.asarray(value)

    try:
        z = array("atomic_numbers").astype(np.float64).reshape(-1)
        if not np.all(np.isfinite(z) & (np.abs(z) < 1000)):
            raise data_error(source, record, "atomic numbers are not all finite and below 1000", "malformed")
        numbers = np.rint(z).astype(np.int32)
        if not np.allclose(z, numbers):
            raise data_error(source, record, "atomic numbers are not integers", "malformed")
        n = len(numbers)
        pos = array("pos").astype(np.float64).reshape(-1, 3)
        relaxed = array("pos_relaxed").astype(np.float64).reshape(-1, 3)
        cell = array("cell").astype(np.float64)
        if cell.size != 9:
            raise data_error(source, record, f"cell has shape {cell.shape}, expected (1, 3, 3)", "malformed")
        natoms = _scalar(attrs.get("natoms"))
        for what, value in (("pos", len(pos)), ("pos_relaxed", len(relaxed)), ("natoms", natoms)):
            if value is not None and int(value) != n:
                raise data_error(source, record, f"{what} has {int(value)} atoms, atomic_numbers {n}", "malformed")
        tags = array("tags", False)
        fixed = array("fixed", False)
        for name, values in (("tags", tags), ("fixed", fixed)):
            if values is not None and not np.all(np.isfinite(values.astype(np.float64))):
                raise data_error(source, record, f"non-finite {name}", "malformed")
        tags = None if tags is None else tags.reshape(n).astype(np.int32)
        fixed = None if fixed is None else fixed.reshape(n).astype(bool)
        y_init, y_relaxed = _scalar(attrs.get("y_init")), _scalar(attrs.get("y_relaxed"))
        sid = attrs.get("sid")
        sid = None if sid is None else np.asarray(sid).reshape(-1)
    except DataError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise data_error(source, record, f"malformed record ({type(exc).__name__}: {exc})", "malformed") from None
    if y_init is None or y_relaxed is None:
        y_init = y_relaxed = None  # energies for both frames or none
    # A scalar sid names the trajectory; anything else (an array, a damaged value) is no id.
    traj_id = str(sid[0].item()) if sid is not None and sid.size == 1 else f"{Path(str(source)).name}:{record}"
    pbc = np.ones(3, bool)
    frames = [Frame(pos, numbers, cell.reshape(3, 3), pbc, y_init, None, fixed, tags, label="initial"),
              Frame(relaxed, numbers, cell.reshape(3, 3), pbc, y_relaxed, None, fixed, tags, label="relaxed")]
    return assemble(source, record, frames, traj_id=traj_id, endpoints_only=True)


# --------------------------------------------------------------------------------------------------
# The LMDB file's structure, checked before liblmdb maps it
# --------------------------------------------------------------------------------------------------

# liblmdb (0.9, 64-bit layout) maps the file and follows its page numbers and value sizes without checking them
# against the file's length: a truncated file (an interrupted download) or a damaged page makes it read past the
# end of the mapping, and the process dies of SIGBUS or SIGSEGV instead of raising. check_lmdb_file walks the
# main B-tree with bounds-checked reads first, so that liblmdb is only ever asked to read inside the file.
_PAGE_HEADER, _NODE_HEADER = 16, 8  # MDB_page and MDB_node headers (bytes)
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META = 0x01, 0x02, 0x04, 0x08
_F_BIGDATA = 0x01  # a leaf node whose value lives in overflow pages
_META_MAGIC, _NO_ROOT = 0xBEEFC0DE, (1 << 64) - 1
_ORDER_FLAGS = 0x02  # MDB_REVERSEKEY; other database flags (dupsort, integer keys) do not occur in OC20 files


class _Corrupt(Exception):
    pass


def _meta(mm, offset: int) -> tuple[int, int, int, int, int, int]:
    """(page size, main DB flags, depth, root page, last page, txn id) of the meta page at ``offset``."""
    try:
        _, _, page_flags = struct.unpack_from("<QHH", mm, offset)
        magic, version = struct.unpack_from("<II", mm, offset + _PAGE_HEADER)
        psize = struct.unpack_from("<I", mm, offset + 40)[0]  # the free DB's md_pad holds the page size
        _, db_flags, depth, _, _, _, _, root = struct.unpack_from("<IHHQQQQQ", mm, offset + 88)
        last_page, txnid = struct.unpack_from("<QQ", mm, offset + 136)
    except struct.error:
        raise _Corrupt("truncated header") from None
    if not page_flags & _P_META or magic != _META_MAGIC or version != 1:
        raise _Corrupt("not an LMDB file (no valid meta page)")
    return psize, db_flags, depth, root, last_page, txnid


def check_lmdb_file(path: Path) -> dict[bytes, str]:
    """Check that liblmdb can read the main database of ``path`` without leaving the file.

    Returns:
      {key: reason} of the records whose value lies (partly) outside the file; their values must not be read.

    Raises:
      DataError: the file is not an LMDB, is truncated, or its tree pages are damaged (``malformed``).
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 2 * 512:
                raise _Corrupt(f"{size} bytes, too short for an LMDB header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _check_tree(mm, size)
    except (_Corrupt, struct.error) as exc:
        raise data_error(path, None, f"damaged LMDB file: {exc}", "malformed") from None


def _check_tree(mm, size: int) -> dict[bytes, str]:
    psize = _meta(mm, 0)[0]
    if not 512 <= psize <= 1 << 16 or psize & (psize - 1):
        raise _Corrupt(f"page size {psize}")
    if size < 2 * psize:
        raise _Corrupt(f"{size} bytes, shorter than its two meta pages")
    first, second = _meta(mm, 0), _meta(mm, psize)
    _, db_flags, depth, root, last_page, _ = second if first[5] < second[5] else first  # liblmdb's choice
    n_pages = last_page + 1
    if n_pages * psize > size:
        raise _Corrupt(f"truncated: its header counts {n_pages} pages of {psize} bytes ({n_pages * psize} bytes), "
                       f"the file has {size}")
    if db_flags & ~_ORDER_FLAGS:
        raise _Corrupt(f"unsupported database flags {db_flags:#x}")
    if root == _NO_ROOT:
        return {}
    bad: dict[bytes, str] = {}
    seen: set[int] = set()
    level = [root]
    for height in range(depth, 0, -1):  # from the root's level down to the leaves (height 1)
        below = []
        for pgno in level:
            if not 2 <= pgno < n_pages or pgno in seen:
                raise _Corrupt(f"page number {pgno} out of range or repeated")
            seen.add(pgno)
            for key, lo, hi, flags, data_at in _nodes(mm, pgno, psize, leaf=height == 1):
                if height > 1:
                    below.append(lo | hi << 16 | flags << 32)  # a branch node's child page
                    continue
                reason = _value_outside(mm, lo | hi << 16, flags, data_at, pgno, psize, n_pages)
                if reason:
                    bad[key] = reason
        level = below
    if level:
        raise _Corrupt("the tree is deeper than its header says")
    return bad


def _nodes(mm, pgno: int, psize: int, leaf: bool):
    """(key, lo, hi, flags, value offset) of every node of page ``pgno``, every offset checked."""
    base = pgno * psize
    header_pgno, _, flags, lower, upper = struct.unpack_from("<QHHHH", mm, base)
    want = _P_LEAF if leaf else _P_BRANCH
    if header_pgno != pgno or flags & (_P_BRANCH | _P_LEAF | _P_OVERFLOW | _P_META) != want:
        raise _Corrupt(f"page {pgno} is not the {'leaf' if leaf else 'branch'} page the tree points to")
    if not _PAGE_HEADER <= lower <= upper <= psize:
        raise _Corrupt(f"page {pgno} has a bad free-space range")
    n_keys = (lower - _PAGE_HEADER) // 2
    if n_keys < (1 if leaf else 2):
        raise _Corrupt(f"page {pgno} holds {n_keys} node(s)")
    for offset in struct.unpack_from(f"<{n_keys}H", mm, base + _PAGE_HEADER):
        if not lower <= offset <= psize - _NODE_HEADER:
            raise _Corrupt(f"page {pgno} has a node outside the page")
        lo, hi, node_flags, ksize = struct.unpack_from("<HHHH", mm, base + offset)
        key_at = offset + _NODE_HEADER
        if key_at + ksize > psize:
            raise _Corrupt(f"page {pgno} has a key outside the page")
        yield bytes(mm[base + key_at:base + key_at + ksize]), lo, hi, node_flags, base + key_at + ksize


def _value_outside(mm, nbytes: int, flags: int, data_at: int, pgno: int, psize: int, n_pages: int) -> Optional[str]:
    """Why a leaf value is not wholly inside the file (None: it is)."""
    page_end = (pgno + 1) * psize
    if not flags & _F_BIGDATA:
        return None if data_at + nbytes <= page_end else "its value runs past its page"
    if data_at + 8 > page_end:
        return "its overflow page number runs past its page"
    first = struct.unpack_from("<Q", mm, data_at)[0]
    if not 2 <= first < n_pages:
        return f"its value's overflow page {first} is outside the file"
    _, _, page_flags, n_overflow = struct.unpack_from("<QHHI", mm, first * psize)
    if not page_flags & _P_OVERFLOW or first + n_overflow > n_pages or _PAGE_HEADER + nbytes > n_overflow * psize:
        return f"its value ({nbytes} bytes from page {first}) does not fit the file"
    return None


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise MissingDependency(f"reading OC20 LMDB files needs lmdb: {INSTALL_HINT}") from None
    return lmdb


def read_oc20_lmdb(path: Path, decoder: str = "auto") -> Iterator[Trajectory | DataError]:
    """Stream the records of one OC20 IS2RE/IS2RS ``.lmdb`` file as trajectories.

    Records are read in key order ``0 … length-1`` (numeric order of the digit keys when there is no
    ``length`` key), one at a time.

    Yields:
      :class:`Trajectory` records, and bad records as :class:`DataError` values.

    Raises:
      DataError: the file is empty or not an LMDB.
      MissingDependency: lmdb (or, for unusual tensor layouts, torch) is not installed.
    """
    lmdb = _lmdb()
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise data_error(path, None, "empty file", "empty")
    unreadable = check_lmdb_file(path)
    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as exc:
        raise data_error(path, None, f"cannot open as an LMDB ({exc})", "malformed") from None
    try:
        with env.begin() as txn:
            if b"length" in unreadable:
                raise data_error(path, "length", unreadable[b"length"], "malformed")
            raw_length = txn.get(b"length")
            if raw_length is not None:
                length = unpickle_record(raw_length, path, "length", "numpy")
                if not isinstance(length, (int, np.integer)) or length < 0:
                    raise data_error(path, "length", f"expected a count, got {length!r}", "malformed")
                keys = [str(i).encode() for i in range(int(length))]
            else:
                keys = sorted((k for k in txn.cursor().iternext(keys=True, values=False) if k.isdigit()), key=int)
            if not keys:
                raise data_error(path, None, "no records", "empty")
            for key in keys:
                record = key.decode()
                if key in unreadable:
                    yield data_error(path, record, unreadable[key], "malformed")
                    continue
                value = txn.get(key)
                if value is None:
                    yield data_error(path, record, "record missing (the 'length' key counts it)", "malformed")
                    continue
                try:
                    traj = record_trajectory(path, record, unpickle_record(value, path, record, decoder))
                except DataError as err:
                    yield err
                    continue
                except MissingDependency:
                    raise
                except Exception as exc:  # whatever else a damaged record holds costs that record only
                    yield data_error(path, record, f"malformed record ({type(exc).__name__}: {exc})", "malformed")
                    continue
                yield traj
    finally:
        env.close()
