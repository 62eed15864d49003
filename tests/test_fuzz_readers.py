"""Fuzzing the readers with hypothesis: each format starts from a valid small file written here (extxyz, VASP
vasprun.xml and OUTCAR, MPtrj JSON, ASE db, OC20 LMDB), which is then damaged: truncated, bytes flipped or inserted,
numbers made NaN/inf/huge, keys and fields dropped or given the wrong type or shape, records deleted.

Properties: a strict read either returns valid trajectories (finite, consistent shapes) or raises a
:class:`DataError` whose message is one line starting with the file (and naming the record when the damage is in
one record); a lenient read never raises, skips and counts the bad records and keeps the good ones. No other
exception type may escape. Hypothesis is derandomized and the example counts are small; for a longer hunt,
``BPTT_FUZZ_EXAMPLES=10`` multiplies them and ``BPTT_FUZZ_RANDOM=1`` (with pytest's ``--hypothesis-seed=N``)
draws other examples.

Also here: hostile pickles in OC20 records (the allow-list unpickler must refuse them without running anything),
and the ``python -m bptt_jax.data inspect --strict`` exit status and one-line message.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from hypothesis import HealthCheck, given, settings, strategies as st

from bptt_jax.data.readers import ALWAYS_SKIPPED, read_trajectories
from bptt_jax.data.trajectory import DataError, SkipLog, Trajectory

ROOT = Path(__file__).resolve().parents[1]
SCALE = float(os.environ.get("BPTT_FUZZ_EXAMPLES", "1"))
RANDOM = bool(os.environ.get("BPTT_FUZZ_RANDOM"))


def fuzz(n: int):
    """Deterministic hypothesis settings with ``n`` examples (times ``BPTT_FUZZ_EXAMPLES``)."""
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=not RANDOM, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory(prefix="bptt_fuzz_") as d:
        yield Path(d)


# --------------------------------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------------------------------


def check_trajectory(t: Trajectory) -> None:
    T, n = t.n_frames, t.n_atoms
    assert T >= 1 and t.positions.shape == (T, n, 3) and np.isfinite(t.positions).all()
    assert t.numbers.shape == (n,) and (n == 0 or (t.numbers.min() >= 1 and t.numbers.max() <= 118))
    assert t.cell.shape == (T, 3, 3) and np.isfinite(t.cell).all() and t.pbc.shape == (3,)
    assert t.forces is None or (t.forces.shape == (T, n, 3) and np.isfinite(t.forces).all())
    assert t.energy is None or (t.energy.shape == (T,) and np.isfinite(t.energy).all())
    assert t.masses.shape == (n,) and (t.masses > 0).all() and t.fixed.shape == (n,) and t.tags.shape == (n,)
    if n and T >= 2:  # what the pipeline does with every record
        start, target = t.relaxation_pair()
        assert np.isfinite(target).all() and target.shape == (n, 3)


def check_error(err: DataError, path: Path) -> None:
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(str(path)), msg
    if err.record is not None:
        assert f": record {err.record}: " in msg, msg


def check_read(path: Path, fmt=None) -> tuple[DataError | None, list[Trajectory], SkipLog]:
    """Read ``path`` strictly and leniently and check the properties in the module docstring.

    Returns (the strict read's error or None, the lenient read's trajectories, its skip log)."""
    before, error = [], None
    try:
        for t in read_trajectories(path, strict=True, fmt=fmt):
            before.append(t)
    except DataError as err:
        error = err
        check_error(err, path)
    skipped = SkipLog(keep=10_000)
    lenient = list(read_trajectories(path, skipped=skipped, fmt=fmt))
    for t in lenient:
        check_trajectory(t)
    for m in skipped.messages:
        assert "\n" not in m and m.startswith(str(path)), m
    ids = [t.id for t in lenient]
    if error is None:
        assert ids == [t.id for t in before]
        assert set(skipped.counts) <= ALWAYS_SKIPPED
    else:
        assert error.kind in skipped.counts and str(error) in skipped.messages
        assert ids[:len(before)] == [t.id for t in before]  # the good records before the bad one are kept
    return error, lenient, skipped


# --------------------------------------------------------------------------------------------------
# Damage
# --------------------------------------------------------------------------------------------------

BAD_NUMBERS = ["nan", "NaN", "inf", "-inf", "1e999", "-1e400", "1e308", "99999999999999999999", "", "x", "1.2.3",
               "0x1f", "--1", "1e-400", "0"]

byte_edit = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 40)),
)


def damage_bytes(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for op, where, *arg in edits:
        i = min(int(where * len(b)), max(len(b) - 1, 0))
        if op == "truncate":
            del b[int(where * len(b)):]
        elif op == "flip" and b:
            b[i] ^= arg[0]
        elif op == "insert":
            b[i:i] = arg[0]
        elif op == "delete":
            del b[i:i + arg[0]]
    return bytes(b)


text_edit = st.one_of(
    st.tuples(st.just("number"), st.floats(0, 1), st.sampled_from(BAD_NUMBERS)),
    st.tuples(st.just("drop_line"), st.floats(0, 1)),
    st.tuples(st.just("dup_line"), st.floats(0, 1)),
    st.tuples(st.just("swap_lines"), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("drop_token"), st.floats(0, 1)),
)


def damage_text(text: str, edits) -> str:
    import re

    for op, where, *arg in edits:
        lines = text.split("\n")
        if op == "number":
            spans = [m.span() for m in re.finditer(r"-?\d+\.?\d*(?:[eE][-+]?\d+)?", text)]
            if spans:
                a, b = spans[min(int(where * len(spans)), len(spans) - 1)]
                text = text[:a] + arg[0] + text[b:]
            continue
        if op == "drop_token":
            spans = [m.span() for m in re.finditer(r"\S+", text)]
            if spans:
                a, b = spans[min(int(where * len(spans)), len(spans) - 1)]
                text = text[:a] + text[b:]
            continue
        i = min(int(where * len(lines)), len(lines) - 1)
        if op == "drop_line":
            del lines[i]
        elif op == "dup_line":
            lines.insert(i, lines[i])
        else:
            j = min(int(arg[0] * len(lines)), len(lines) - 1)
            lines[i], lines[j] = lines[j], lines[i]
        text = "\n".join(lines)
    return text


# Atom counts: small, and beyond the largest default size bucket (512) now and then.
n_atoms = st.sampled_from([1, 2, 3, 4, 5, 513])


# --------------------------------------------------------------------------------------------------
# extxyz
# --------------------------------------------------------------------------------------------------


def si_frames(n: int, n_frames: int = 3, seed: int = 0) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    side = 5.43 * max(1.0, (n / 8) ** (1 / 3))
    base = rng.uniform(0, side, (n, 3))
    frames = []
    for i in range(n_frames):
        atoms = Atoms(["Si"] * (n - 1) + ["O"], positions=base + 0.01 * i, cell=np.eye(3) * side, pbc=True)
        atoms.new_array("fixed", (np.arange(n) == 0).astype(int))
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - i, forces=rng.normal(size=(n, 3)))
        frames.append(atoms)
    return frames


def extxyz_text(n: int) -> str:
    buf = io.StringIO()
    write(buf, si_frames(n), format="extxyz")
    return buf.getvalue()


def _read_after(tmp: Path, name: str, content: bytes | str):
    path = tmp / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path, check_read(path)


@fuzz(30)
@given(n=n_atoms, edits=st.lists(text_edit, min_size=1, max_size=3))
def test_fuzz_extxyz_text(n, edits):
    with workdir() as tmp:
        path, (error, trajs, _) = _read_after(tmp, "relax.extxyz", damage_text(extxyz_text(n), edits))
        assert error is not None or len(trajs) == 1


@pytest.mark.parametrize("count", ["99999999999999999999", "100000000"])
def test_extxyz_huge_atom_count_is_an_error_not_a_hang(count):
    """ASE skips a frame's atom lines by its header's count without checking for the end of the file (found by
    the fuzzer: the read never finished)."""
    lines = extxyz_text(2).split("\n")
    lines[4] = count  # the second frame's header
    with workdir() as tmp:
        path, (error, trajs, skipped) = _read_after(tmp, "relax.extxyz", "\n".join(lines))
        assert str(error) == f"{path}: record frame 1: its header says {count} atoms, only 6 lines follow"
        assert trajs == [] and skipped.counts == {"malformed": 1}


@fuzz(30)
@given(n=st.integers(1, 4), edits=st.lists(byte_edit, min_size=1, max_size=3))
def test_fuzz_extxyz_bytes(n, edits):
    with workdir() as tmp:
        _read_after(tmp, "relax.extxyz", damage_bytes(extxyz_text(n).encode(), edits))


# --------------------------------------------------------------------------------------------------
# VASP: vasprun.xml and OUTCAR
# --------------------------------------------------------------------------------------------------


def _rows(rows, tag="v") -> str:
    return "".join(f"    <{tag}> {' '.join(f'{x:.8f}' for x in r)} </{tag}>\n" for r in rows)


def vasprun_text(n: int, n_frames: int = 3) -> str:
    frames = si_frames(n, n_frames)
    cell = frames[0].cell.array
    atoms = "".join("    <rc><c>Si</c><c>   1</c></rc>\n" for _ in range(n))
    out = ('<?xml version="1.0" encoding="ISO-8859-1"?>\n<modeling>\n <atominfo>\n'
           f'  <atoms>       {n} </atoms>\n  <types>       1 </types>\n  <array name="atoms" >\n   <set>\n{atoms}'
           '   </set>\n  </array>\n </atominfo>\n <kpoints>\n  <varray name="kpointlist" >\n'
           '   <v>       0.00000000       0.00000000       0.00000000 </v>\n  </varray>\n </kpoints>\n'
           f' <structure name="initialpos" >\n  <crystal>\n   <varray name="basis" >\n{_rows(cell)}   </varray>\n'
           f'  </crystal>\n  <varray name="positions" >\n{_rows(frames[0].get_scaled_positions())}  </varray>\n'
           ' </structure>\n')
    for i, a in enumerate(frames):
        energy = (f'   <energy>\n    <i name="e_fr_energy">   {-10.1 - i:.8f} </i>\n'
                  f'    <i name="e_wo_entrp">    {-10.1 - i:.8f} </i>\n'
                  f'    <i name="e_0_energy">    {-10.0 - i:.8f} </i>\n   </energy>\n')
        out += (f' <calculation>\n  <scstep>\n{energy}  </scstep>\n  <structure>\n   <crystal>\n'
                f'    <varray name="basis" >\n{_rows(cell)}    </varray>\n   </crystal>\n'
                f'   <varray name="positions" >\n{_rows(a.get_scaled_positions())}   </varray>\n  </structure>\n'
                f'  <varray name="forces" >\n{_rows(a.calc.results["forces"])}  </varray>\n{energy} </calculation>\n')
    return out + "</modeling>\n"


def outcar_text(n: int, n_frames: int = 3) -> str:
    frames = si_frames(n, n_frames)
    out = (" POTCAR:    PAW_PBE Si 05Jan2001\n POTCAR:    PAW_PBE Si 05Jan2001\n"
           f"   ions per type =               {n}\n")
    rule = " " + "-" * 83 + "\n"
    for i, a in enumerate(frames):
        cell = a.cell.array
        recip = np.linalg.inv(cell).T
        out += f"--------------------------------------- Iteration    {i + 1}(   1)  ---------------------------\n"
        out += "      direct lattice vectors                 reciprocal lattice vectors\n"
        out += "".join(f"  {' '.join(f'{x:12.9f}' for x in c)}  {' '.join(f'{x:12.9f}' for x in r)}\n"
                       for c, r in zip(cell, recip))
        out += " POSITION                                       TOTAL-FORCE (eV/Angst)\n" + rule
        out += "".join(f" {' '.join(f'{x:12.5f}' for x in p)}    {' '.join(f'{x:13.6f}' for x in f)}\n"
                       for p, f in zip(a.positions, a.calc.results["forces"]))
        out += rule
        e = -10.0 - i
        out += ("  FREE ENERGIE OF THE ION-ELECTRON SYSTEM (eV)\n  " + "-" * 51 + "\n"
                f"  free  energy   TOTEN  =       {e - 0.1:.8f} eV\n\n"
                f"  energy  without entropy=      {e - 0.1:.8f}  energy(sigma->0) =      {e:.8f}\n\n")
    return out


@pytest.mark.parametrize("name,make", [("vasprun.xml", vasprun_text), ("OUTCAR", outcar_text)])
def test_vasp_files_are_valid_before_damage(name, make):
    with workdir() as tmp:
        path, (error, trajs, skipped) = _read_after(tmp, name, make(3))
        assert error is None and len(trajs) == 1 and trajs[0].n_frames == 3 and trajs[0].n_atoms == 3
        np.testing.assert_allclose(trajs[0].energy, [-10.0, -11.0, -12.0])
        np.testing.assert_allclose(trajs[0].positions, [a.positions for a in si_frames(3)], atol=1e-4)


def test_outcar_ion_count_beyond_the_file_is_refused_before_reading():
    """ASE would build a list of that many symbols first (10^9: gigabytes) before failing."""
    text = outcar_text(3).replace("ions per type =               3", "ions per type =               1000000000")
    with workdir() as tmp:
        path, (error, trajs, skipped) = _read_after(tmp, "OUTCAR", text)
        assert "'ions per type' counts 1000000000 ions" in str(error) and error.record is None and trajs == []


@fuzz(25)
@given(name=st.sampled_from(["vasprun.xml", "OUTCAR"]), n=n_atoms,
       edits=st.lists(st.one_of(text_edit, text_edit, byte_edit), min_size=1, max_size=3))
def test_fuzz_vasp(name, n, edits):
    text = (vasprun_text if name == "vasprun.xml" else outcar_text)(n)
    with workdir() as tmp:
        texts = [e for e in edits if e[0] in ("number", "drop_line", "dup_line", "swap_lines", "drop_token")]
        data = damage_bytes(damage_text(text, texts).encode(), [e for e in edits if e not in texts])
        _read_after(tmp, name, data)


# --------------------------------------------------------------------------------------------------
# MPtrj JSON
# --------------------------------------------------------------------------------------------------


def mptrj_data(n: int) -> dict:
    """Two mp-ids with one three-frame relaxation each (pymatgen's Structure.as_dict layout)."""
    data = {}
    for k, mp_id in enumerate(["mp-1", "mp-22"]):
        frames = si_frames(n, seed=k)
        cell = frames[0].cell.array
        data[mp_id] = {
            f"{mp_id}-0-{i}": {
                "structure": {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
                              "lattice": {"matrix": cell.tolist(), "pbc": [True, True, True]},
                              "sites": [{"species": [{"element": s, "occu": 1}], "abc": f.tolist(),
                                         "xyz": x.tolist(), "label": s, "properties": {"magmom": 0.0}}
                                        for s, f, x in zip(a.get_chemical_symbols(), a.get_scaled_positions(),
                                                           a.positions)]},
                "uncorrected_total_energy": -5.0 - i, "corrected_total_energy": -6.0 - i,
                "force": a.calc.results["forces"].tolist(), "stress": [[0.0] * 3 for _ in range(3)], "mp_id": mp_id}
            for i, a in enumerate(frames)}
    return data


def _paths(node, prefix=()):
    """Every (path, value) below ``node`` (dict keys and list indices)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,), v
        yield from _paths(v, prefix + (k,))


REPLACEMENTS = [None, "garbage", float("nan"), float("inf"), -1e308, [], {}, [[1.0, 2.0]], [1, 2, 3, 4], True, 0,
                "Fe2+", "Xx", 10 ** 30, 10 ** 400]
json_edit = st.tuples(st.sampled_from(["delete", "replace", "wrap"]), st.floats(0, 1), st.sampled_from(REPLACEMENTS))


def damage_json(data: dict, edits) -> dict:
    import copy

    data = json.loads(json.dumps(data))  # a tree: no list or dict shared by two parents
    for op, where, value in edits:
        value = copy.deepcopy(value)
        paths = list(_paths(data))
        if not paths:
            break
        path, old = paths[min(int(where * len(paths)), len(paths) - 1)]
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if op == "delete":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = value
        else:
            parent[path[-1]] = [old]
    return data


@fuzz(40)
@given(n=n_atoms, edits=st.lists(json_edit, min_size=1, max_size=3))
def test_fuzz_mptrj_fields(n, edits):
    with workdir() as tmp:
        data = damage_json(mptrj_data(n), edits)
        path, (error, trajs, skipped) = _read_after(tmp, "MPtrj.json", json.dumps(data))
        if error is not None and error.kind != "empty":
            assert error.record is not None, str(error)  # the file is valid JSON: the damage is in one record
        assert len(trajs) + skipped.total >= min(len(data), 1)


@fuzz(30)
@given(n=st.integers(1, 3), edits=st.lists(st.one_of(byte_edit, text_edit), min_size=1, max_size=3))
def test_fuzz_mptrj_bytes(n, edits):
    text = json.dumps(mptrj_data(n))
    texts = [e for e in edits if e[0] in ("number", "drop_line", "dup_line", "swap_lines", "drop_token")]
    with workdir() as tmp:
        data = damage_bytes(damage_text(text, texts).encode(), [e for e in edits if e not in texts])
        _read_after(tmp, "MPtrj.json", data)


@fuzz(20)
@given(edits=st.lists(byte_edit, min_size=1, max_size=2))
def test_fuzz_mptrj_gzip(edits):
    import gzip

    data = gzip.compress(json.dumps(mptrj_data(2)).encode())
    with workdir() as tmp:
        _read_after(tmp, "MPtrj.json.gz", damage_bytes(data, edits))


@pytest.mark.parametrize("buf_size", [7, 65536])
def test_mptrj_out_of_range_numbers_cost_their_trajectory(monkeypatch, buf_size):
    """yajl stops at a number outside int64/double, which used to end the reading of the whole file."""
    from bptt_jax.data import mptrj

    monkeypatch.setattr(mptrj, "BUF_SIZE", buf_size)
    data = mptrj_data(2)
    data["mp-1"]["mp-1-0-1"]["uncorrected_total_energy"] = 777.25
    data["mp-1"]["mp-1-0-2"]["stress"] = [[12345678901234567890123456789] * 3] * 3  # ignored field
    text = json.dumps(data).replace("777.25", "-1e400")
    with workdir() as tmp:
        path, (error, trajs, skipped) = _read_after(tmp, "MPtrj.json", text)
        assert str(error) == f"{path}: record mp-1/mp-1-0: non-finite energy at mp-1-0-1"
        assert [t.id for t in trajs] == ["mp-22/mp-22-0"] and skipped.counts == {"non_finite": 1}


def test_mptrj_missing_lattice_names_file_and_record():
    data = mptrj_data(2)
    del data["mp-22"]["mp-22-0-1"]["structure"]["lattice"]
    with workdir() as tmp:
        path, (error, trajs, skipped) = _read_after(tmp, "MPtrj.json", json.dumps(data))
        assert str(error) == f"{path}: record mp-22/mp-22-0-1: missing field 'lattice'"
        assert [t.id for t in trajs] == ["mp-1/mp-1-0"] and skipped.counts == {"malformed": 1}


# --------------------------------------------------------------------------------------------------
# ASE db
# --------------------------------------------------------------------------------------------------


def write_asedb(path: Path, n: int) -> None:
    import ase.db

    with ase.db.connect(path) as db:
        for tid in ("a", "b"):
            for step, atoms in enumerate(si_frames(n, seed=len(tid))):
                db.write(atoms, traj_id=tid, ionic_step=step)


SQL_VALUES = [None, 0, -1, 3.5, float("nan"), "garbage", b"", b"\x00" * 7, b"\xff" * 64, "{]", '{"traj_id": 1}']
db_edit = st.tuples(st.floats(0, 1), st.floats(0, 1), st.sampled_from(SQL_VALUES))


def damage_asedb(path: Path, edits) -> None:
    """Set cells of the ``systems`` table (a row's positions, numbers, cell, key-value pairs, ...) to bad values."""
    con = sqlite3.connect(path)
    try:
        cols = [r[1] for r in con.execute("PRAGMA table_info(systems)") if r[1] != "id"]
        ids = [r[0] for r in con.execute("SELECT id FROM systems")]
        for row, col, value in edits:
            column = cols[min(int(col * len(cols)), len(cols) - 1)]
            row_id = ids[min(int(row * len(ids)), len(ids) - 1)]
            with contextlib.suppress(sqlite3.Error):
                con.execute(f"UPDATE systems SET {column} = ? WHERE id = ?", (value, row_id))
        con.commit()
    finally:
        con.close()


@fuzz(30)
@given(n=n_atoms, edits=st.lists(db_edit, min_size=1, max_size=3))
def test_fuzz_asedb_fields(n, edits):
    with workdir() as tmp:
        path = tmp / "relax.db"
        write_asedb(path, n)
        damage_asedb(path, edits)
        error, trajs, skipped = check_read(path)
        assert len(trajs) + skipped.total >= 1
        if error is not None:
            assert error.record is not None, str(error)  # a damaged row costs its trajectory, not the file


@fuzz(25)
@given(edits=st.lists(byte_edit, min_size=1, max_size=3))
def test_fuzz_asedb_bytes(edits):
    with workdir() as tmp:
        path = tmp / "relax.db"
        write_asedb(path, 2)
        path.write_bytes(damage_bytes(path.read_bytes(), edits))
        check_read(path)


# --------------------------------------------------------------------------------------------------
# OC20 LMDB
# --------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
lmdb = pytest.importorskip("lmdb")


def _pyg_classes():
    mods = {name: types.ModuleType(name) for name in ("torch_geometric", "torch_geometric.data",
                                                      "torch_geometric.data.data", "torch_geometric.data.storage")}
    out = {}
    for module, name in (("torch_geometric.data.data", "Data"), ("torch_geometric.data.data", "DataEdgeAttr"),
                         ("torch_geometric.data.data", "DataTensorAttr"),
                         ("torch_geometric.data.storage", "GlobalStorage")):
        cls = type(name, (), {"__module__": module, "__qualname__": name})
        setattr(mods[module], name, cls)
        out[name] = cls
    return mods, types.SimpleNamespace(**out)


PYG_MODULES, PYG = _pyg_classes()


@contextlib.contextmanager
def pyg_importable():
    """torch_geometric's module paths point at stand-in classes while a record is pickled (pickle checks them)."""
    saved = {k: sys.modules.get(k) for k in PYG_MODULES}
    sys.modules.update(PYG_MODULES)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def oc20_attrs(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=g) * 8
    return {"pos": pos, "pos_relaxed": pos + 0.1 * torch.rand(n, 3, generator=g),
            "cell": (torch.eye(3) * 8).reshape(1, 3, 3), "atomic_numbers": torch.full((n,), 29.0),
            "natoms": n, "tags": torch.zeros(n, dtype=torch.long), "fixed": torch.zeros(n),
            "sid": 1000 + seed, "y_init": 0.5, "y_relaxed": -0.25}


def pickle_record(attrs: dict, protocol: int = 4, layout: int = 2) -> bytes:
    data = PYG.Data()
    if layout == 1:
        data.__dict__.update(attrs)
    else:
        store = PYG.GlobalStorage()
        store.__dict__.update(_mapping=dict(attrs), _parent=data)
        data.__dict__.update(_store=store, _edge_attr_cls=PYG.DataEdgeAttr)
    with pyg_importable(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pickle.dumps(data, protocol=protocol)


def write_lmdb(path: Path, values: dict) -> Path:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, v in values.items():
            txn.put(k if isinstance(k, bytes) else str(k).encode(), v)
    env.sync()
    env.close()
    lock = Path(str(path) + "-lock")
    if lock.exists():
        lock.unlink()
    return path


def _tensor_edit(value, op: str, rng: np.random.Generator):
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return {"nan": float("nan"), "string": "x", "none": None}.get(op, value)
    v = value.clone()
    flat = v.reshape(-1)
    if op == "nan" and v.is_floating_point():
        flat[int(rng.integers(flat.numel()))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    elif op == "shape":
        return v.reshape(-1)[: max(flat.numel() - 1, 0)]
    elif op == "transpose" and v.dim() >= 2:
        return v.transpose(0, 1)
    elif op == "dtype":
        return v.to(torch.float16) if v.is_floating_point() else v.to(torch.float64) + 0.5
    elif op == "string":
        return "x"
    elif op == "none":
        return None
    elif op == "huge":
        return torch.full((3,), 1e300, dtype=torch.float64) if v.is_floating_point() else torch.tensor([2 ** 40])
    return v


record_edit = st.tuples(st.sampled_from(["drop", "nan", "shape", "transpose", "dtype", "string", "none", "huge"]),
                        st.sampled_from(["pos", "pos_relaxed", "cell", "atomic_numbers", "natoms", "tags", "fixed",
                                         "sid", "y_init", "y_relaxed"]))


@fuzz(40)
@given(n=n_atoms, bad=st.integers(0, 2), edits=st.lists(record_edit, min_size=1, max_size=3),
       protocol=st.sampled_from([2, 4, 5]), layout=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_fuzz_oc20_record_fields(n, bad, edits, protocol, layout, seed):
    rng = np.random.default_rng(seed)
    records = [oc20_attrs(n, s) for s in range(3)]
    for op, key in edits:
        if op == "drop":
            records[bad].pop(key, None)
        else:
            records[bad][key] = _tensor_edit(records[bad].get(key), op, rng)
    with workdir() as tmp:
        values = {i: pickle_record(a, protocol, layout) for i, a in enumerate(records)}
        path = write_lmdb(tmp / "data.lmdb", {**values, "length": pickle.dumps(3)})
        error, trajs, skipped = check_read(path)
        assert len(trajs) + skipped.total == 3
        assert {t.id for t in trajs} >= {str(1000 + s) for s in range(3) if s != bad}  # the good records stay
        if error is not None:
            assert error.record == str(bad)


@fuzz(40)
@given(bad=st.integers(0, 2), edits=st.lists(byte_edit, min_size=1, max_size=3), protocol=st.sampled_from([2, 4]))
def test_fuzz_oc20_pickle_bytes(bad, edits, protocol):
    values = {i: pickle_record(oc20_attrs(3, i), protocol) for i in range(3)}
    values[bad] = damage_bytes(values[bad], edits)
    with workdir() as tmp:
        path = write_lmdb(tmp / "data.lmdb", values)  # no "length" key: the digit keys in order
        error, trajs, skipped = check_read(path)
        assert len(trajs) + skipped.total == 3 and {t.id for t in trajs} >= {str(1000 + s) for s in range(3)
                                                                              if s != bad}
        if error is not None:
            assert error.record == str(bad)


keys_edit = st.sampled_from(["length_too_big", "length_negative", "length_string", "length_garbage", "drop_record",
                             "extra_key", "no_length"])


@fuzz(15)
@given(ops=st.lists(keys_edit, min_size=1, max_size=2))
def test_fuzz_oc20_keys(ops):
    values = {str(i): pickle_record(oc20_attrs(2, i)) for i in range(3)}
    values["length"] = pickle.dumps(3)
    for op in ops:
        if op == "length_too_big":
            values["length"] = pickle.dumps(5)
        elif op == "length_negative":
            values["length"] = pickle.dumps(-1)
        elif op == "length_string":
            values["length"] = pickle.dumps("3")
        elif op == "length_garbage":
            values["length"] = b"\x80\x04garbage"
        elif op == "drop_record":
            values.pop("1", None)
        elif op == "extra_key":
            values["meta"] = b"not a pickle"
        else:
            values.pop("length", None)
    with workdir() as tmp:
        check_read(write_lmdb(tmp / "data.lmdb", {k.encode(): v for k, v in values.items()}))


@fuzz(40)
@given(edits=st.lists(byte_edit, min_size=1, max_size=4), big=st.booleans())
def test_fuzz_oc20_lmdb_file_bytes(edits, big):
    """Damage in the LMDB file itself (page headers, tree nodes, overflow pages, truncation): liblmdb trusts what
    it finds there, so without the structure check this crashes the process (SIGBUS) instead of raising."""
    n = 40 if big else 2
    values = {i: pickle_record(oc20_attrs(n, i)) for i in range(6)}
    with workdir() as tmp:
        path = write_lmdb(tmp / "data.lmdb", {**values, "length": pickle.dumps(6)})
        path.write_bytes(damage_bytes(path.read_bytes(), edits))
        check_read(path)


def test_truncated_lmdb_is_one_line_not_a_crash():
    values = {i: pickle_record(oc20_attrs(40, i)) for i in range(20)}
    with workdir() as tmp:
        path = write_lmdb(tmp / "data.lmdb", {**values, "length": pickle.dumps(20)})
        data = path.read_bytes()
        for cut in (len(data) // 2, len(data) - 4096):
            path.write_bytes(data[:cut])
            error, trajs, skipped = check_read(path)
            assert error is not None and "truncated" in str(error) and trajs == []


# --------------------------------------------------------------------------------------------------
# Structures larger than the size buckets
# --------------------------------------------------------------------------------------------------


def test_oversized_structures_are_read_then_refused_by_the_buckets():
    from bptt_jax.pipeline.config import DataConfig
    from bptt_jax.pipeline.data import load_split

    with workdir() as tmp:
        d = tmp / "trajs"
        d.mkdir()
        for i, n in enumerate([3, 513, 3, 3]):
            write(d / f"r{i}.extxyz", si_frames(n), format="extxyz")
        error, trajs, skipped = check_read(d)
        assert error is None and [t.n_atoms for t in trajs] == [3, 513, 3, 3]
        skipped = SkipLog()
        split = load_split(DataConfig(path=str(d), n_test=1), skipped, progress=False)
        assert len(split.train) == 2 and skipped.counts == {"too_large": 1}
        (msg,) = skipped.messages
        assert "r1.extxyz" in msg and "513 atoms" in msg and "dataset.buckets" in msg
        with pytest.raises(DataError, match=r"r1\.extxyz.*513 atoms.*dataset\.buckets"):
            load_split(DataConfig(path=str(d), n_test=1, strict=True), SkipLog(), progress=False)


def test_buckets_that_hold_no_structure_stop_the_run_before_pretraining():
    from bptt_jax.pipeline.config import DataConfig, RunConfig
    from bptt_jax.pipeline.data import load_data

    with workdir() as tmp:
        for i in range(4):
            write(tmp / f"r{i}.extxyz", si_frames(3), format="extxyz")
        cfg = RunConfig(data=DataConfig(path=str(tmp), n_test=1, buckets=(2,)), progress=False)
        with pytest.raises(ValueError) as info:
            load_data(cfg, max_atoms=None)
        msg = str(info.value)
        assert "\n" not in msg and "have 0 train and 0 test" in msg and "too_large: 4" in msg
        assert "dataset.buckets is 2" in msg


# --------------------------------------------------------------------------------------------------
# Hostile pickles: the allow-list unpickler refuses them and runs nothing
# --------------------------------------------------------------------------------------------------

MARKER = "bptt_fuzz_PWNED"


def _touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def hostile_pickles(marker: Path) -> list[tuple[str, bytes, str]]:
    """(name, pickled bytes, the module.name the unpickler must refuse), each of which would create ``marker``."""
    cmd = f"touch {marker}"
    s = pickle.dumps(cmd, protocol=2)[2:-1]  # the string opcode of cmd (protocol 2 framing stripped)
    code = _touch(marker)
    out = [
        # GLOBAL + REDUCE, protocol 0 text
        ("os.system, GLOBAL", f"cos\nsystem\n(S'{cmd}'\ntR.".encode(), "os.system"),
        ("posix.system, GLOBAL", f"cposix\nsystem\n(S'{cmd}'\ntR.".encode(), "posix.system"),
        ("builtins.eval, GLOBAL", f"cbuiltins\neval\n(S\"{code}\"\ntR.".encode(), "builtins.eval"),
        ("__builtin__.eval, GLOBAL", f"c__builtin__\neval\n(S\"{code}\"\ntR.".encode(), "__builtin__.eval"),
        # INST and OBJ build an instance by calling the class: with os.system as the "class"
        ("os.system, INST", f"(S'{cmd}'\nios\nsystem\n.".encode(), "os.system"),
        ("subprocess.Popen, OBJ", b"\x80\x02(csubprocess\nPopen\n" + b"]q\x00(" + s + b"e" + b"o.",
         "subprocess.Popen"),
        # STACK_GLOBAL (protocol 4)
        ("posix.system, STACK_GLOBAL", b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93"
         + b"\x8c" + bytes([len(cmd)]) + cmd.encode() + b"\x94\x85R.", "posix.system"),
        ("subprocess.check_output, STACK_GLOBAL", b"\x80\x04\x8c\nsubprocess\x94\x8c\x0ccheck_output\x94\x93"
         + b"\x8c\x02sh\x8c\x02-c\x8c" + bytes([len(cmd)]) + cmd.encode() + b"\x87\x85R.", "subprocess.check_output"),
        # builtins.__import__("os").system(cmd) and getattr(__import__("os"), "system")(cmd)
        ("builtins.__import__", b"\x80\x04\x8c\x08builtins\x8c\n__import__\x93\x8c\x02os\x85R.",
         "builtins.__import__"),
        ("builtins.getattr", b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93\x8c\x08builtins\x8c\x04eval\x93"
         b"\x8c\x04mro\x86R.", "builtins.getattr"),
    ]
    # The same calls hidden inside a plausible PyG record (a field of the attribute mapping), both layouts.
    with pyg_importable():
        for layout in (1, 2):
            attrs = oc20_attrs(2, 0)
            attrs["sid"] = _Reduce(os.system, (cmd,))
            out.append((f"os.system inside a PyG {layout}.x record", pickle_record(attrs, 4, layout),
                        f"{os.system.__module__}.system"))
        attrs = oc20_attrs(2, 0)
        attrs["y_init"] = _Reduce(eval, (code,))
        out.append(("builtins.eval inside a record, protocol 2", pickle_record(attrs, 2), "__builtin__.eval"))
        attrs = oc20_attrs(2, 0)
        attrs["pos"] = _Reduce(subprocess.check_output, (["sh", "-c", cmd],))
        out.append(("subprocess.check_output as a tensor", pickle_record(attrs, 5), "subprocess.check_output"))
    # Inside a tensor's storage bytes (the torch.save stream the numpy decoder parses with its own unpickler).
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    for name, payload, refused in list(out[:3]):
        storage = head + payload
        value = pickle.dumps(_Reduce(torch.storage._load_from_bytes, (storage,)), protocol=4)
        out.append((f"{name} inside tensor storage bytes", value, refused))
    zipped = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torch.arange(3.0).storage(), zipped)
    out.append(("os.system in a zip storage's data.pkl", _zip_storage_with(zipped.getvalue(), out[0][1]),
                "os.system"))
    return out


def _zip_storage_with(zip_bytes: bytes, payload: bytes) -> bytes:
    """A pickled tensor whose zip ``torch.save`` storage has ``payload`` as its data.pkl."""
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(zip_bytes))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith("data.pkl") else src.read(info)
            dst.writestr(info.filename, data)
    return pickle.dumps(_Reduce(torch.storage._load_from_bytes, (buf.getvalue(),)), protocol=4)


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_hostile_pickles_run_nothing_and_are_refused_in_one_line(tmp_path, monkeypatch):
    from bptt_jax.data.oc20 import unpickle_record

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / MARKER
    cases = hostile_pickles(marker)
    # The payloads are real: plain pickle.loads would create the marker (checked on the first one).
    pickle.loads(cases[0][1])
    assert marker.exists()
    marker.unlink()
    good = pickle_record(oc20_attrs(2, 7))
    for name, payload, refused in cases:
        path = write_lmdb(tmp_path / "data.lmdb", {b"0": good, b"1": payload, b"2": good, b"length": pickle.dumps(3)})
        with pytest.raises(DataError) as info:
            list(read_trajectories(path, strict=True))
        msg = str(info.value)
        assert info.value.kind == "refused_class", (name, msg)
        assert "\n" not in msg and msg.startswith(f"{path}: record 1: ") and refused in msg, (name, msg)
        skipped = SkipLog()
        assert [t.id for t in read_trajectories(path, skipped=skipped)] == ["1007", "1007"], name
        assert skipped.counts == {"refused_class": 1}, name
        assert not marker.exists(), name
        path.unlink()
        # The torch decoder (for storage layouts the numpy one does not know) refuses them too: its storages go
        # through torch.load(weights_only=True), never torch's own pickle-everything _load_from_bytes.
        with pytest.raises(DataError) as info:
            unpickle_record(payload, "f.lmdb", "1", decoder="torch")
        assert info.value.kind in ("refused_class", "unpickle") and "\n" not in str(info.value), name
        assert not marker.exists(), name


@fuzz(40)
@given(data=st.binary(max_size=200), module=st.sampled_from(["os", "posix", "subprocess", "builtins", "sys", "io",
                                                              "shutil", "importlib", "torch", "numpy"]),
       name=st.sampled_from(["system", "Popen", "eval", "exec", "__import__", "getattr", "open", "load",
                             "_load_from_bytes", "rmtree"]))
def test_fuzz_unpickler_never_resolves_other_globals(data, module, name):
    """Random opcode streams, with a GLOBAL of a dangerous name in front: only allow-listed names resolve."""
    from bptt_jax.data.oc20 import RecordUnpickler, unpickle_record

    allowed = RecordUnpickler(b"", "f", 0).allowed
    for payload in (f"c{module}\n{name}\n".encode() + data, data):
        try:
            unpickle_record(payload, "f.lmdb", "0", decoder="numpy")
        except DataError as err:
            assert "\n" not in str(err) and str(err).startswith("f.lmdb: record 0: ")
            if (module, name) not in allowed and payload[:1] == b"c":
                assert err.kind in ("refused_class", "unpickle")


# --------------------------------------------------------------------------------------------------
# The data CLI
# --------------------------------------------------------------------------------------------------


def test_inspect_strict_exits_nonzero_with_one_line(tmp_path, capsys):
    from bptt_jax.data.__main__ import main

    (tmp_path / "a.extxyz").write_text(extxyz_text(2))
    data = mptrj_data(2)
    del data["mp-22"]["mp-22-0-1"]["structure"]["lattice"]
    (tmp_path / "b.json").write_text(json.dumps(data))
    before = sorted(p.name for p in tmp_path.iterdir())
    cmd = [sys.executable, "-m", "bptt_jax.data", "inspect", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd + ["--strict"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {tmp_path / 'b.json'}: record mp-22/mp-22-0-1: missing field 'lattice'\n"
    assert main(["inspect", str(tmp_path)]) == 0  # lenient: counted (in-process: one interpreter start is enough)
    assert "skipped         1 (malformed: 1)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside the inputs

