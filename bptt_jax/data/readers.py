"""Readers for real relaxation data: every supported file becomes a stream of :class:`Trajectory` records.

Formats (``fmt``; detected from the file name, or from the content where names are ambiguous):

* ``ase`` — anything ``ase.io`` reads as a sequence of frames: extxyz/xyz (every frame), ASE ``.traj``,
  VASP ``vasprun.xml`` and ``OUTCAR`` (every ionic step). One file is one trajectory. Energy (eV) and
  forces (eV/Å) come from the attached calculator, else from ``info``/``arrays`` (``energy``,
  ``REF_energy``, ``dft_energy``, ``forces``, ``REF_forces``, ``dft_forces``); ``FixAtoms`` constraints,
  an extxyz ``fixed`` array or a leftover ``move_mask`` array give the fixed mask; tags come from
  ``atoms.get_tags()``; masses and the cell of every frame come from the atoms.
* ``mptrj`` — CHGNet's MPtrj JSON (``.json`` / ``.json.gz``), streamed with ``ijson``; see
  :mod:`bptt_jax.data.mptrj`.
* ``oc20_lmdb`` — OC20 IS2RE/IS2RS ``.lmdb`` files of pickled PyG records, decoded by an allow-list
  unpickler; see :mod:`bptt_jax.data.oc20`.
* ``s2ef`` — OC20 S2EF chunks: ``N.extxyz`` (or ``.extxyz.xz``) with a companion ``N.txt`` (or
  ``.txt.xz``) whose lines are ``system_id,frame_number,reference_energy``, one per frame in the same
  order. Frames of one chunk are grouped by ``system_id`` into trajectories (in order of first
  appearance) ordered by frame number. The stored energy is the adsorption energy, the frame's DFT
  energy minus the line's reference energy (eV) — the same convention as OC20's own ``y`` targets and as
  the LMDB reader; the offset is constant within a system, so energy differences are unchanged. The
  distributed S2EF chunks are random samples, so a system whose frames are spread over several chunks
  becomes one (partial) trajectory per chunk; grouping is never done across chunks, which keeps memory
  bounded by one chunk. OC20's full per-system trajectory files are ordinary extxyz (``ase``).
* ``asedb`` — an ASE database (``.db``, via ``ase.db.connect``). Rows are grouped into trajectories by
  the first of these key-value pairs a row has: ``traj_id``, ``sid``, ``system_id``, or ``mp_id`` with
  ``calc_id`` (and ``task_id`` when present); a row with none of them is its own one-frame trajectory
  (which :func:`~bptt_jax.data.trajectory.filter_usable` drops later). Within a trajectory rows are
  ordered by the ``ionic_step``, ``step`` or ``frame`` key (the first one present on every row of the
  group; ``frame`` may be a string such as ``"frame45"``), else by row id. Trajectories come in the order
  of their first row id.

Error handling: a bad record raises :class:`DataError` (one line: file, record, reason) in strict mode;
otherwise it is counted in the :class:`SkipLog` under its ``kind`` and reading goes on, so good records
before and after it are still returned. A trajectory whose atom count changes between frames (MPtrj has
some) is a dataset convention, not corruption: it is always skipped and counted as ``changing_atoms``,
even in strict mode, so a strict pass over the real MPtrj does not stop on the first one.
"""

from __future__ import annotations

import dataclasses
import functools
import lzma
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from ase.data import atomic_numbers as _SYMBOL_TO_Z, chemical_symbols

from bptt_jax.data.trajectory import DataError, SkipLog, Trajectory, unusable_reason

FORMATS = ("ase", "mptrj", "oc20_lmdb", "s2ef", "asedb")

# Kinds that are skipped and counted even in strict mode (see the module docstring).
ALWAYS_SKIPPED = frozenset({"changing_atoms"})

_ENERGY_KEYS = ("energy", "REF_energy", "dft_energy", "total_energy", "free_energy")
_FORCE_KEYS = ("forces", "REF_forces", "dft_forces", "force")
_COMPRESSED = (".gz", ".xz", ".bz2")


# --------------------------------------------------------------------------------------------------
# Shared helpers (also used by mptrj.py and oc20.py)
# --------------------------------------------------------------------------------------------------


class MissingDependency(RuntimeError):
    """An optional package a reader needs is not installed (one-line message naming the extra)."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` squashed to one line (parsers such as yajl put a caret diagram on later lines)."""
    out = " ".join(str(text).split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


def data_error(source: object, record: object, reason: object, kind: str) -> DataError:
    """A :class:`DataError` whose message is guaranteed to be a single line."""
    return DataError(str(source), record, one_line(reason), kind=kind)


def _kind_of_trajectory_error(reason: str) -> str:
    if "non-finite" in reason:
        return "non_finite"
    if "unknown element" in reason:
        return "unknown_element"
    return "malformed"


@functools.lru_cache(maxsize=1024)  # MPtrj repeats a few hundred species strings millions of times
def element_number(symbol: str) -> int:
    """Atomic number of an element symbol; oxidation-state suffixes ("Fe2+", "O2-") are stripped.

    Raises:
      KeyError: the symbol names no element (e.g. "Xx", or the dummy "X").
    """
    match = re.match(r"\s*([A-Z][a-z]?)", str(symbol))
    z = _SYMBOL_TO_Z.get(match.group(1)) if match else None
    if not z:  # "X" maps to 0 in ASE: a dummy atom is no element either
        raise KeyError(symbol)
    return int(z)


@dataclasses.dataclass
class Frame:
    """One frame on its way into a :class:`Trajectory` (positions Å, cell Å, energy eV, forces eV/Å)."""

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: Optional[float] = None
    forces: Optional[np.ndarray] = None
    fixed: Optional[np.ndarray] = None
    tags: Optional[np.ndarray] = None
    masses: Optional[np.ndarray] = None
    label: object = None  # how messages name the frame ("frame 3", "mp-1-0-5", "row 17")


def assemble(source: object, record: object, frames: Sequence[Frame], traj_id: str,
             endpoints_only: bool = False) -> Trajectory:
    """Stack frames into a :class:`Trajectory`, checking they describe one relaxation.

    Per-atom properties that cannot change during a relaxation (fixed mask, tags, masses, pbc) are taken
    from the first frame.

    Raises:
      DataError: no frames (``empty``), a changing atom count (``changing_atoms``) or species
        (``changing_species``), forces or energies on some frames only (``inconsistent_forces`` /
        ``inconsistent_energy``), non-finite values (``non_finite``), unknown elements.
    """
    if not frames:
        raise data_error(source, record, "no frames", "empty")
    first = frames[0]
    n = len(first.numbers)
    for f in frames[1:]:
        if len(f.numbers) != n:
            raise data_error(source, record, f"atom count changes from {n} to {len(f.numbers)} at "
                                             f"{f.label}", "changing_atoms")
        if not np.array_equal(f.numbers, first.numbers):
            raise data_error(source, record, f"atomic numbers change at {f.label}", "changing_species")
    for name, kind in (("forces", "inconsistent_forces"), ("energy", "inconsistent_energy")):
        has = [getattr(f, name) is not None for f in frames]
        if any(has) and not all(has):
            with_, without = frames[has.index(True)], frames[has.index(False)]
            raise data_error(source, record, f"{without.label} has no {name} while {with_.label} has", kind)
    if first.energy is not None and not all(np.isfinite(f.energy) for f in frames):
        bad = next(f for f in frames if not np.isfinite(f.energy))
        raise data_error(source, record, f"non-finite energy at {bad.label}", "non_finite")
    try:
        return Trajectory(
            positions=np.stack([np.asarray(f.positions, np.float64).reshape(n, 3) for f in frames]),
            numbers=first.numbers,
            cell=np.stack([np.asarray(f.cell, np.float64).reshape(3, 3) for f in frames]),
            pbc=first.pbc,
            forces=None if first.forces is None else np.stack(
                [np.asarray(f.forces, np.float64).reshape(n, 3) for f in frames]),
            energy=None if first.energy is None else np.array([float(f.energy) for f in frames]),
            masses=first.masses,
            fixed=first.fixed,
            tags=first.tags,
            id=str(traj_id),
            source=f"{source}: record {record}" if record is not None else str(source),
            endpoints_only=endpoints_only,
        )
    except DataError as err:
        raise data_error(source, record, err.reason, _kind_of_trajectory_error(err.reason)) from None
    except (ValueError, TypeError, OverflowError) as err:  # ragged or non-numeric arrays
        raise data_error(source, record, f"{type(err).__name__}: {err}", "malformed") from None


# --------------------------------------------------------------------------------------------------
# ASE-readable files
# --------------------------------------------------------------------------------------------------


def _fixed_mask(atoms) -> np.ndarray:
    from ase.constraints import FixAtoms

    fixed = np.zeros(len(atoms), bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = True
    if "fixed" in atoms.arrays:  # our generators and OC20 extxyz write a per-atom 0/1 array
        fixed |= np.asarray(atoms.arrays["fixed"]).astype(bool).reshape(len(atoms))
    if "move_mask" in atoms.arrays:  # an extxyz move_mask ASE did not turn into a constraint
        mm = np.asarray(atoms.arrays["move_mask"]).astype(bool).reshape(len(atoms), -1)
        fixed |= ~mm.any(axis=1)
    return fixed


def frame_from_atoms(atoms, label: object) -> Frame:
    """A :class:`Frame` from an ``ase.Atoms`` (energy/forces from its calculator, info or arrays)."""
    energy = forces = None
    if atoms.calc is not None:
        results = getattr(atoms.calc, "results", {}) or {}
        energy = results.get("energy", results.get("free_energy"))
        forces = results.get("forces")
    if energy is None:
        energy = next((atoms.info[k] for k in _ENERGY_KEYS if k in atoms.info), None)
    if forces is None:
        forces = next((atoms.arrays[k] for k in _FORCE_KEYS if k in atoms.arrays), None)
    return Frame(
        positions=atoms.get_positions(),
        numbers=atoms.get_atomic_numbers(),
        cell=np.asarray(atoms.get_cell()),
        pbc=atoms.get_pbc(),
        energy=None if energy is None else float(energy),
        forces=None if forces is None else np.asarray(forces, np.float64),
        fixed=_fixed_mask(atoms),
        tags=atoms.get_tags(),
        masses=atoms.get_masses() if "masses" in atoms.arrays else None,
        label=label,
    )


def _ase_failure(source: object, record: object, exc: Exception) -> DataError:
    """Classify an exception raised inside ``ase.io`` as a :class:`DataError`."""
    if isinstance(exc, KeyError) and exc.args and re.fullmatch(r"[A-Za-z]{1,3}", str(exc.args[0])):
        return data_error(source, record, f"unknown element {exc.args[0]!r}", "unknown_element")
    return data_error(source, record, f"cannot parse ({type(exc).__name__}: {exc})", "malformed")


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise data_error(path, None, "empty file", "empty")


def _iread_frames(path: Path, ase_format: Optional[str] = None) -> Iterator[Frame]:
    """Every frame of an ASE-readable file, streamed; parse failures become :class:`DataError`."""
    import ase.io

    _check_not_empty(path)
    count = 0
    try:
        if _strip_compression(path.name).lower().endswith((".xyz", ".extxyz")):
            _check_xyz_atom_counts(path)
        elif "OUTCAR" in path.name:
            _check_outcar_ion_count(path)
        for atoms in ase.io.iread(str(path), index=":", format=ase_format):
            yield frame_from_atoms(atoms, f"frame {count}")
            count += 1
    except DataError:
        raise
    except Exception as exc:  # ASE raises many types (XYZError, KeyError, ValueError, IndexError, ...)
        raise _ase_failure(path, f"frame {count}", exc) from None


def _check_xyz_atom_counts(path: Path) -> None:
    """Check each frame's atom count against the lines that follow it.

    ASE's extxyz reader skips a frame's atom lines by the count in its header without looking for the end of the
    file, so a damaged count (say 10^20) keeps it reading empty lines at the end of the file for ever. This pass
    stops where ASE's own index pass would, and reports a count the file cannot hold.
    """
    from ase.io.formats import open_with_compression

    with open_with_compression(str(path), "r") as f:
        frame = 0
        while True:
            line = f.readline()
            while line.lstrip().startswith("VEC"):  # lattice vectors after a frame (ASE skips them too)
                line = f.readline()
            if not line.strip():
                return
            try:
                n_atoms = int(line)
            except ValueError:
                return  # ASE says what is wrong
            f.readline()  # the comment line
            for i in range(n_atoms):
                if not f.readline():
                    raise data_error(path, f"frame {frame}", f"its header says {n_atoms} atoms, only {i} lines "
                                                            f"follow", "malformed")
            frame += 1


def _check_outcar_ion_count(path: Path) -> None:
    """ASE builds an OUTCAR's symbol list from its header's "ions per type" before reading any position, so a
    damaged count (say 10^9) would take gigabytes first. Each ion takes a position line of some 80 bytes per
    ionic step: a count the file's size cannot hold is refused."""
    from ase.io.formats import open_with_compression

    size = path.stat().st_size * (20 if path.name.endswith(_COMPRESSED) else 1)  # generous for compressed files
    with open_with_compression(str(path), "r") as f:
        for line in f:
            if "Iteration" in line:  # the end of the header
                return
            if "ions per type" in line:
                counts = [int(x) for x in line.split("=", 1)[-1].split() if x.lstrip("-").isdigit()]
                if sum(counts) * 40 > size:
                    raise data_error(path, None, f"'ions per type' counts {sum(counts)} ions, more than a file of "
                                                 f"{path.stat().st_size} bytes holds", "malformed")
                return


def read_ase(path: Path) -> Iterator[Trajectory]:
    """One trajectory from an ASE-readable file (extxyz, xyz, traj, vasprun.xml, OUTCAR)."""
    path = Path(path)
    frames = list(_iread_frames(path))
    if not frames:
        raise data_error(path, None, "no frames", "empty")
    yield assemble(path, None, frames, traj_id=_stem(path))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


# --------------------------------------------------------------------------------------------------
# OC20 S2EF chunks
# --------------------------------------------------------------------------------------------------


def s2ef_companion(path: Path) -> Optional[Path]:
    """The ``N.txt`` / ``N.txt.xz`` beside an ``N.extxyz`` / ``N.extxyz.xz`` chunk, if any."""
    name = path.name
    for ext in (".extxyz.xz", ".extxyz", ".xyz.xz", ".xyz"):
        if name.endswith(ext):
            base = name[: -len(ext)]
            for txt in (base + ".txt", base + ".txt.xz"):
                if (path.parent / txt).is_file():
                    return path.parent / txt
    return None


def _read_s2ef_index(txt: Path) -> list[tuple[str, int, Optional[float]]]:
    opener = lzma.open if txt.name.endswith(".xz") else open
    rows = []
    with opener(txt, "rt") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split(",")]
            digits = re.search(r"(\d+)\s*$", parts[1]) if len(parts) >= 2 else None
            if len(parts) < 2 or not parts[0] or digits is None:
                raise data_error(txt, f"line {line_no}", f"expected 'system_id,frame_number,reference_energy', "
                                                         f"got {line.strip()!r}", "malformed")
            try:
                ref = float(parts[2]) if len(parts) > 2 and parts[2] else None
            except ValueError:
                raise data_error(txt, f"line {line_no}", f"reference energy {parts[2]!r} is not a number",
                                 "malformed") from None
            rows.append((parts[0], int(digits.group(1)), ref))
    return rows


def read_s2ef(path: Path) -> Iterator[Trajectory | DataError]:
    """Trajectories of one OC20 S2EF chunk (``N.extxyz`` + ``N.txt``), grouped by system id.

    Yields bad systems as :class:`DataError` values so the caller can skip them and go on.
    """
    path = Path(path)
    txt = s2ef_companion(path)
    if txt is None:
        raise data_error(path, None, "no companion .txt (system_id,frame_number,reference_energy) beside "
                                     "this S2EF chunk", "malformed")
    index = _read_s2ef_index(txt)
    groups: dict[str, list[tuple[int, Frame]]] = {}
    failure: Optional[DataError] = None
    n_read = 0
    try:
        for i, frame in enumerate(_iread_frames(path)):
            if i >= len(index):
                raise data_error(path, f"frame {i}", f"more frames than the {len(index)} lines of {txt.name}",
                                 "malformed")
            sid, number, ref = index[i]
            frame.label = f"frame{number}"
            if frame.energy is not None and ref is not None:
                frame.energy -= ref  # adsorption energy, OC20's convention (module docstring)
            groups.setdefault(sid, []).append((number, frame))
            n_read = i + 1
    except DataError as err:
        failure = err
    if failure is None and n_read != len(index):
        failure = data_error(path, None, f"{n_read} frames but {len(index)} lines in {txt.name}", "malformed")
    if failure is not None:
        # Systems whose frames all come before the failure are complete: keep them (finished work is
        # never lost); the others are lost with the bad frame.
        last_line = {sid: i for i, (sid, _, _) in enumerate(index)}
        groups = {sid: fr for sid, fr in groups.items() if last_line.get(sid, len(index)) < n_read}
    for sid, items in groups.items():
        items.sort(key=lambda t: t[0])
        try:
            yield assemble(path, sid, [f for _, f in items], traj_id=sid)
        except DataError as err:
            yield err
    if failure is not None:
        raise failure


# --------------------------------------------------------------------------------------------------
# ASE databases
# --------------------------------------------------------------------------------------------------

_DB_GROUP_KEYS = ("traj_id", "sid", "system_id")
_DB_STEP_KEYS = ("ionic_step", "step", "frame")


def _db_group(kvp: dict, row_id: int) -> tuple[str, str]:
    """(record label, trajectory id) of a row, following the convention in the module docstring."""
    for key in _DB_GROUP_KEYS:
        if key in kvp:
            return f"{key}={kvp[key]}", str(kvp[key])
    if "mp_id" in kvp and "calc_id" in kvp:
        parts = [kvp["mp_id"]] + ([kvp["task_id"]] if "task_id" in kvp else []) + [kvp["calc_id"]]
        tid = "/".join(str(p) for p in parts)
        return f"mp_id/calc_id={tid}", tid
    return f"row {row_id}", f"row{row_id}"


def _db_step(value) -> Optional[int]:
    if isinstance(value, (int, np.integer)):
        return int(value)
    match = re.search(r"(\d+)\s*$", str(value))
    return int(match.group(1)) if match else None


def _db_index(db, path: Path) -> list[tuple[int, dict | DataError]]:
    """(row id, key-value pairs) of every row, reading neither structures nor data (memory holds an index); a row
    whose pairs cannot be decoded comes with a :class:`DataError` in their place."""
    try:
        index = [(row.id, row.key_value_pairs) for row in db.select(include_data=False,
                                                                   columns=["id", "key_value_pairs"])]
        if all(isinstance(kvp, dict) for _, kvp in index):
            return index
    except Exception:  # noqa: BLE001 (a damaged row ends the select: go row by row to find it)
        pass
    index = []
    for (row_id,) in [(row.id,) for row in db.select(columns=["id"])]:
        try:
            (row,) = db.select(id=row_id, include_data=False, columns=["id", "key_value_pairs"])
            if not isinstance(row.key_value_pairs, dict):
                raise TypeError(f"a {type(row.key_value_pairs).__name__}, not a mapping")
            index.append((row_id, row.key_value_pairs))
        except Exception as exc:  # noqa: BLE001
            index.append((row_id, data_error(path, f"row {row_id}", f"unreadable key-value pairs "
                                                                   f"({type(exc).__name__}: {exc})", "malformed")))
    return index


def read_asedb(path: Path) -> Iterator[Trajectory | DataError]:
    """Trajectories from an ASE database (grouping convention in the module docstring)."""
    import ase.db

    path = Path(path)
    _check_not_empty(path)
    try:
        db = ase.db.connect(str(path), create_indices=False) if path.suffix == ".db" else ase.db.connect(str(path))
        index = _db_index(db, path)
    except DataError:
        raise
    except Exception as exc:
        raise data_error(path, None, f"cannot open as an ASE database ({type(exc).__name__}: {exc})",
                         "malformed") from None
    if not index:
        raise data_error(path, None, "no rows", "empty")
    groups: dict[str, tuple[str, list[tuple[int, dict]]]] = {}
    for row_id, kvp in index:
        if isinstance(kvp, DataError):
            yield kvp  # a row whose key-value pairs are damaged: it cannot be grouped, so it is its own record
            continue
        label, tid = _db_group(kvp, row_id)
        groups.setdefault(label, (tid, []))[1].append((row_id, kvp))
    for label, (tid, rows) in groups.items():
        step_key = next((k for k in _DB_STEP_KEYS if all(k in kvp for _, kvp in rows)), None)
        steps = [(_db_step(kvp[step_key]) if step_key else None) for _, kvp in rows]
        if step_key and all(s is not None for s in steps):
            order = sorted(range(len(rows)), key=lambda j: (steps[j], rows[j][0]))
        else:
            order = sorted(range(len(rows)), key=lambda j: rows[j][0])
        try:
            frames = []
            for j in order:
                row_id = rows[j][0]
                try:
                    frames.append(frame_from_atoms(db.get(id=row_id).toatoms(), f"row {row_id}"))
                except Exception as exc:  # a damaged row: its trajectory is skipped, the others are read
                    raise _ase_failure(path, f"{label} (row {row_id})", exc) from None
            yield assemble(path, label, frames, traj_id=tid)
        except DataError as err:
            yield err


# --------------------------------------------------------------------------------------------------
# Format detection and the public entry points
# --------------------------------------------------------------------------------------------------


def _strip_compression(name: str) -> str:
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_format(path: Path, sniff: bool = True) -> Optional[str]:
    """The format of one file from its name (and, for ``.json``, its first bytes); None if unsupported."""
    path = Path(path)
    name = path.name
    base = _strip_compression(name).lower()
    if name.endswith(".lmdb"):
        return "oc20_lmdb"
    if base.endswith(".db"):
        return "asedb"
    if base.endswith(".json"):
        if not sniff:
            return "mptrj"
        from bptt_jax.data.mptrj import looks_like_mptrj

        return "mptrj" if looks_like_mptrj(path) else None
    if base.endswith((".extxyz", ".xyz")):
        return "s2ef" if s2ef_companion(path) is not None else "ase"
    if base.endswith(".traj") or ("vasprun" in base and base.endswith(".xml")) or "OUTCAR" in name:
        return "ase"
    return None


def _files_below(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return sorted(out)


def _plan(path: Path, fmt: Optional[str]) -> list[tuple[Path, str]]:
    """(file, format) pairs to read, in order."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        found = fmt or detect_format(path, sniff=False)
        if found is None:
            raise data_error(path, None, f"unsupported file type; pass a format ({', '.join(FORMATS)})",
                             "unsupported")
        return [(path, found)]
    files = _files_below(path)
    plan = []
    for f in files:
        found = detect_format(f)  # sniffed even with a forced format: a manifest.json is never MPtrj
        # Forcing "ase" on a directory also reads S2EF chunks as plain extxyz (one trajectory per file).
        if found is None or (fmt is not None and found != fmt and (fmt, found) != ("ase", "s2ef")):
            continue
        plan.append((f, fmt or found))
    return plan


def _reader(fmt: str):
    if fmt == "ase":
        return read_ase
    if fmt == "s2ef":
        return read_s2ef
    if fmt == "asedb":
        return read_asedb
    if fmt == "mptrj":
        from bptt_jax.data.mptrj import read_mptrj

        return read_mptrj
    from bptt_jax.data.oc20 import read_oc20_lmdb

    return read_oc20_lmdb


def _handle(err: DataError, strict: bool, skipped: Optional[SkipLog]) -> None:
    if strict and err.kind not in ALWAYS_SKIPPED:
        raise err
    if skipped is not None:
        skipped.add(err.kind, str(err))


def _iter_files(path, strict: bool, skipped: Optional[SkipLog], fmt: Optional[str], placeholders: bool = False
                ) -> Iterator[tuple[Path, str, Iterator[Trajectory]]]:
    """(file, format, trajectories) per file; bad records are handled before they reach the caller (and,
    with ``placeholders``, then passed on as their :class:`DataError`)."""
    for file, file_fmt in _plan(Path(path), fmt):
        yield file, file_fmt, _read_file(file, file_fmt, strict, skipped, placeholders)


def _read_file(file: Path, fmt: str, strict: bool, skipped: Optional[SkipLog],
               placeholders: bool = False) -> Iterator[Trajectory]:
    def bad(err: DataError):
        _handle(err, strict, skipped)
        return [err] if placeholders else []

    try:
        for item in _reader(fmt)(file):
            if isinstance(item, DataError):
                yield from bad(item)
            else:
                yield item
    except DataError as err:  # the file cannot be read further
        yield from bad(err)
    except OSError as err:
        yield from bad(data_error(file, None, f"cannot read ({err.strerror or err})", "io"))
    except MissingDependency:
        raise
    except Exception as err:  # a parser failure outside the readers' own checks: name the file, go on
        yield from bad(data_error(file, None, f"cannot parse ({type(err).__name__}: {err})", "malformed"))


def read_trajectories(path, *, strict: bool = False, skipped: Optional[SkipLog] = None,
                      fmt: Optional[str] = None, limit: Optional[int] = None,
                      placeholders: bool = False) -> Iterator[Trajectory]:
    """Stream the trajectories in a file or directory.

    Args:
      path: a file, or a directory (every supported file below it, sorted, recursively; ``*.lmdb``
        files in it are OC20 LMDBs).
      strict: raise the first bad record's :class:`DataError` instead of skipping it.
      skipped: where skipped records are counted (reason kind → count, first messages).
      fmt: force a reader: one of ``ase``, ``mptrj``, ``oc20_lmdb``, ``s2ef``, ``asedb``. For a
        directory, only the files of that format are read.
      limit: stop after this many trajectories (records, with ``placeholders``).
      placeholders: also yield each skipped record's :class:`DataError` (after counting it) in its place,
        so that a caller can take "the first n records" before anything is filtered (the paper's test
        split: 96 usable of the first 100). A file that cannot be read at all is one such record.

    Yields:
      :class:`Trajectory` records (positions Å, energies eV, forces eV/Å), in file order.

    Raises:
      DataError: in strict mode, on the first bad record (one line naming file and record).
      FileNotFoundError: ``path`` does not exist.
      ValueError: unknown ``fmt``.
    """
    if limit is not None and limit <= 0:
        return
    count = 0
    for _, _, trajs in _iter_files(path, strict, skipped, fmt, placeholders):
        for traj in trajs:
            yield traj
            count += 1
            if limit is not None and count >= limit:
                trajs.close()
                return


# --------------------------------------------------------------------------------------------------
# Summary for `python -m bptt_jax.data inspect`
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    """What a file or directory holds.

    Attributes:
      path: what was read.
      trajectories: trajectories read (before the usability filter).
      usable: of those, usable for BPTT (:func:`~bptt_jax.data.trajectory.unusable_reason` is None).
      frames: frames over all trajectories.
      frames_min, frames_max: frames per trajectory (None when there is none).
      atoms_min, atoms_max: atoms per structure (None when there is none).
      elements: element symbols present, sorted alphabetically.
      formats: trajectories per format.
      files: files read, per format.
      skipped: skipped records by reason.
      cell_changes: trajectories whose cell changes (variable-cell relaxations).
      endpoints_only: trajectories holding only the initial and relaxed structure (OC20 LMDB).
      with_forces, with_energy: trajectories carrying forces / energies.
    """

    path: str = ""
    trajectories: int = 0
    usable: int = 0
    frames: int = 0
    frames_min: Optional[int] = None
    frames_max: Optional[int] = None
    atoms_min: Optional[int] = None
    atoms_max: Optional[int] = None
    elements: list[str] = dataclasses.field(default_factory=list)
    formats: Counter = dataclasses.field(default_factory=Counter)
    files: Counter = dataclasses.field(default_factory=Counter)
    skipped: SkipLog = dataclasses.field(default_factory=SkipLog)
    cell_changes: int = 0
    endpoints_only: int = 0
    with_forces: int = 0
    with_energy: int = 0

    @property
    def files_read(self) -> int:
        return sum(self.files.values())


def summarize(path, *, strict: bool = False, fmt: Optional[str] = None) -> Summary:
    """Read everything under ``path`` once (streaming) and count what is there; see :class:`Summary`."""
    s = Summary(path=str(path))
    numbers: set[int] = set()
    for file, file_fmt, trajs in _iter_files(path, strict, s.skipped, fmt):
        s.files[file_fmt] += 1
        for t in trajs:
            s.trajectories += 1
            s.formats[file_fmt] += 1
            s.usable += unusable_reason(t) is None
            s.frames += t.n_frames
            s.frames_min = t.n_frames if s.frames_min is None else min(s.frames_min, t.n_frames)
            s.frames_max = t.n_frames if s.frames_max is None else max(s.frames_max, t.n_frames)
            s.atoms_min = t.n_atoms if s.atoms_min is None else min(s.atoms_min, t.n_atoms)
            s.atoms_max = t.n_atoms if s.atoms_max is None else max(s.atoms_max, t.n_atoms)
            numbers.update(int(z) for z in np.unique(t.numbers))
            s.cell_changes += t.cell_changes
            s.endpoints_only += t.endpoints_only
            s.with_forces += t.forces is not None
            s.with_energy += t.energy is not None
    s.elements = sorted(chemical_symbols[z] for z in numbers)
    return s


def _per(counter: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items()))


def format_summary(summary: Summary) -> str:
    """Human-readable, multi-line text of a :class:`Summary`."""
    s = summary
    lines = [f"{s.path}"]
    lines.append(f"  files read      {s.files_read}" + (f" ({_per(s.files)})" if s.files else ""))
    lines.append(f"  trajectories    {s.trajectories}" + (f" ({_per(s.formats)})" if s.formats else "")
                 + f"; {s.usable} usable for BPTT")
    if s.trajectories:
        lines.append(f"  frames          {s.frames} ({s.frames_min}-{s.frames_max} per trajectory)")
        lines.append(f"  atoms           {s.atoms_min}-{s.atoms_max} per structure")
        lines.append(f"  elements        {len(s.elements)}: {' '.join(s.elements)}")
        lines.append(f"  forces/energies {s.with_forces} / {s.with_energy} trajectories carry them")
        lines.append(f"  variable cell   {s.cell_changes} trajectories (target = final fractional coordinates "
                     f"in the initial cell)")
        lines.append(f"  endpoints only  {s.endpoints_only} trajectories (initial + relaxed structure only)")
    lines.append(f"  skipped         {s.skipped.total}" + (f" ({_per(s.skipped.counts)})" if s.skipped.total else ""))
    for msg in s.skipped.messages:
        lines.append(f"    {msg}")
    if s.skipped.total > len(s.skipped.messages):
        lines.append(f"    ... {s.skipped.total - len(s.skipped.messages)} more")
    return "\n".join(lines)


__all__ = ["FORMATS", "Summary", "detect_format", "format_summary", "read_trajectories", "summarize"]
