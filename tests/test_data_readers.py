"""Readers of real data formats: small files written here in each real layout, read back and checked."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import pickle
import shutil
import sys
import types
import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.io import write

from bptt_jax.data import mptrj as mptrj_mod
from bptt_jax.data.readers import (MissingDependency, Summary, detect_format, format_summary, read_trajectories,
                                   summarize)
from bptt_jax.data.trajectory import DataError, SkipLog

A = 5.43  # Si lattice constant, Å


def _one_line(err) -> str:
    text = str(err)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------------
# ASE-readable files
# --------------------------------------------------------------------------------------------------


def _si_frames(n_frames=4, energies=True, forces=True, seed=0, n_atoms=4):
    rng = np.random.default_rng(seed)
    cell = np.diag([A, A, A])
    base = rng.uniform(0, A, (n_atoms, 3))
    frames = []
    for i in range(n_frames):
        atoms = Atoms("Si" * n_atoms if n_atoms else "", positions=base + 0.01 * i, cell=cell * (1 + 0.01 * i),
                      pbc=True)
        atoms.set_tags(np.arange(n_atoms) % 3)
        atoms.set_constraint(FixAtoms(indices=[0]))
        f = rng.normal(size=(n_atoms, 3)) if forces else None
        e = -10.0 - i if energies else None
        if e is not None or f is not None:
            atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
        frames.append(atoms)
    return frames


@pytest.mark.parametrize("name", ["relax.extxyz", "relax.traj"])
def test_ase_file_every_frame(tmp_path, name):
    frames = _si_frames()
    path = tmp_path / name
    write(path, frames)
    (traj,) = list(read_trajectories(path))
    assert traj.n_frames == 4 and traj.n_atoms == 4 and traj.id == "relax"
    for i, atoms in enumerate(frames):
        np.testing.assert_allclose(traj.positions[i], atoms.positions, atol=1e-8)
        np.testing.assert_allclose(traj.cell[i], atoms.cell.array, atol=1e-8)
        np.testing.assert_allclose(traj.forces[i], atoms.calc.results["forces"], atol=1e-8)
    np.testing.assert_allclose(traj.energy, [-10, -11, -12, -13])
    assert traj.fixed.tolist() == [True, False, False, False]
    assert traj.tags.tolist() == [0, 1, 2, 0]
    assert traj.pbc.all() and traj.cell_changes
    np.testing.assert_allclose(traj.masses, frames[0].get_masses())


def test_extxyz_fixed_array_and_no_forces(tmp_path):
    # Our generators write a per-atom "fixed" array; a file without energy or forces is allowed.
    frames = _si_frames(3, energies=False, forces=False)
    for a in frames:
        a.set_constraint()
        a.new_array("fixed", np.array([0, 1, 1, 0]))
    write(tmp_path / "a.extxyz", frames)
    (traj,) = list(read_trajectories(tmp_path / "a.extxyz", strict=True))
    assert traj.forces is None and traj.energy is None
    assert traj.fixed.tolist() == [False, True, True, False]


def test_vasprun_xml_all_ionic_steps(tmp_path):
    def v(rows):
        return "".join(f"    <v> {' '.join(f'{x:.8f}' for x in r)} </v>\n" for r in rows)

    cell = np.eye(3) * A
    fracs = [np.array([[0, 0, 0], [0.25 + 0.01 * (2 - i), 0.25, 0.25]]) for i in range(3)]
    forces = [np.full((2, 3), 0.1 * (2 - i)) for i in range(3)]
    text = """<?xml version="1.0" encoding="ISO-8859-1"?>
<modeling>
 <atominfo>
  <atoms>       2 </atoms>
  <types>       1 </types>
  <array name="atoms" >
   <set>
    <rc><c>Si</c><c>   1</c></rc>
    <rc><c>Si</c><c>   1</c></rc>
   </set>
  </array>
 </atominfo>
 <kpoints>
  <varray name="kpointlist" >
   <v>       0.00000000       0.00000000       0.00000000 </v>
  </varray>
 </kpoints>
"""
    text += f""" <structure name="initialpos" >
  <crystal>
   <varray name="basis" >
{v(cell)}   </varray>
  </crystal>
  <varray name="positions" >
{v(fracs[0])}  </varray>
 </structure>
"""
    for i in range(3):
        energy = f"""   <energy>
    <i name="e_fr_energy">   {-10.1 - i:.8f} </i>
    <i name="e_wo_entrp">    {-10.1 - i:.8f} </i>
    <i name="e_0_energy">    {-10.0 - i:.8f} </i>
   </energy>
"""
        text += f""" <calculation>
  <scstep>
{energy}  </scstep>
  <structure>
   <crystal>
    <varray name="basis" >
{v(cell)}    </varray>
   </crystal>
   <varray name="positions" >
{v(fracs[i])}   </varray>
  </structure>
  <varray name="forces" >
{v(forces[i])}  </varray>
{energy} </calculation>
"""
    text += "</modeling>\n"
    path = tmp_path / "vasprun.xml"
    path.write_text(text)
    assert detect_format(path) == "ase"
    (traj,) = list(read_trajectories(path, strict=True))
    assert traj.n_frames == 3 and traj.numbers.tolist() == [14, 14]
    np.testing.assert_allclose(traj.positions, np.stack(fracs) @ cell, atol=1e-6)
    np.testing.assert_allclose(traj.forces, np.stack(forces), atol=1e-6)
    np.testing.assert_allclose(traj.energy, [-10.0, -11.0, -12.0])  # energy(sigma -> 0)


def _write_text(path, text):
    path.write_text(text)
    return path


GOOD_XYZ = """2
Lattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="T T T"
Si 0 0 0 0.1 0 0
Si 1 1 1 -0.1 0 0
2
Lattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3:forces:R:3 energy=-2.0 pbc="T T T"
Si 0 0 0 0.0 0 0
Si 1.1 1 1 0.0 0 0
"""


@pytest.mark.parametrize("case,kind,record", [
    ("malformed", "malformed", "frame 2"),
    ("nan", "non_finite", None),
    ("unknown_element", "unknown_element", "frame 0"),
    ("empty", "empty", None),
    ("mixed_forces", "inconsistent_forces", None),
])
def test_bad_extxyz(tmp_path, case, kind, record):
    header = 'Lattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3 pbc="T T T"'
    text = {
        "malformed": GOOD_XYZ + f"3\n{header}\nSi 0 0 0\nSi 1 1 1\n",  # promises 3 atoms, has 2
        "nan": GOOD_XYZ.replace("Si 1.1 1 1", "Si 1.1 nan 1"),
        "unknown_element": f"2\n{header}\nXx 0 0 0\nSi 1 1 1\n",
        "empty": "",
        "mixed_forces": GOOD_XYZ + f"2\n{header}\nSi 0 0 0\nSi 1 1 1\n",
    }[case]
    bad = _write_text(tmp_path / "b_bad.extxyz", text)
    _write_text(tmp_path / "a_good.extxyz", GOOD_XYZ)
    _write_text(tmp_path / "c_good.extxyz", GOOD_XYZ)
    with pytest.raises(DataError) as info:
        list(read_trajectories(bad, strict=True))
    msg = _one_line(info.value)
    assert info.value.kind == kind and str(bad) in msg
    if record:
        assert f"record {record}" in msg
    # Non-strict: the bad file is counted, the good files before and after it are still read.
    skipped = SkipLog()
    trajs = list(read_trajectories(tmp_path, skipped=skipped))
    assert [t.id for t in trajs] == ["a_good", "c_good"]
    assert skipped.counts == {kind: 1} and str(bad) in skipped.messages[0]


def test_changing_atom_count_is_skipped_even_when_strict(tmp_path):
    header = 'Lattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3 pbc="T T T"'
    path = _write_text(tmp_path / "grow.extxyz", f"1\n{header}\nSi 0 0 0\n2\n{header}\nSi 0 0 0\nSi 1 1 1\n")
    for strict in (False, True):
        skipped = SkipLog()
        assert list(read_trajectories(path, strict=strict, skipped=skipped)) == []
        assert skipped.counts == {"changing_atoms": 1}


# --------------------------------------------------------------------------------------------------
# MPtrj JSON
# --------------------------------------------------------------------------------------------------


def _structure(symbols, xyz, cell):
    cell = np.asarray(cell, float)
    xyz = np.asarray(xyz, float)
    frac = np.linalg.solve(cell.T, xyz.T).T
    return {
        "@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
        "lattice": {"matrix": cell.tolist(), "pbc": [True, True, True], "a": float(cell[0, 0])},
        "sites": [{"species": [{"element": s, "occu": 1}], "abc": f.tolist(), "xyz": x.tolist(), "label": s,
                   "properties": {"magmom": 0.0}} for s, f, x in zip(symbols, frac, xyz)],
    }


def _mp_frame(symbols, xyz, cell, energy, forces, mp_id):
    n = len(symbols)
    return {"structure": _structure(symbols, xyz, cell), "uncorrected_total_energy": energy,
            "corrected_total_energy": energy - 1.0, "energy_per_atom": energy / n, "ef_per_atom": -0.1,
            "e_per_atom_relaxed": -1.0, "ef_per_atom_relaxed": -0.2, "force": np.asarray(forces).tolist(),
            "stress": [[0.0] * 3] * 3, "magmom": None, "bandgap": 0.0, "mp_id": mp_id}


def _mptrj_data():
    """Two mp-ids; tasks with dashes, several calcs, shuffled ionic steps, a changing cell and atom count."""
    rng = np.random.default_rng(3)
    data, expect = {}, {}

    def traj(mp_id, task, calc, steps, symbols, cell_scale=0.0, n_atoms_change=False):
        frames = {}
        base = rng.uniform(0, 4, (len(symbols), 3))
        for step in steps:
            syms = symbols + (["O"] if n_atoms_change and step == steps[-1] else [])
            xyz = np.vstack([base + 0.01 * step, rng.uniform(0, 4, (len(syms) - len(symbols), 3))])
            cell = np.diag([4.0, 4.0, 4.0]) * (1 + cell_scale * step)
            forces = rng.normal(size=(len(syms), 3))
            frames[f"{task}-{calc}-{step}"] = _mp_frame(syms, xyz, cell, -5.0 - step, forces, mp_id)
        data.setdefault(mp_id, {}).update(frames)
        expect[f"{mp_id}/{task}-{calc}"] = frames

    traj("mp-1", "mp-1", 0, [2, 0, 1], ["Si", "Si"])
    traj("mp-1", "mp-1", 1, [1, 0, 3, 2], ["Si", "Si"])
    traj("mp-1", "mp-77", 0, [0, 1, 2], ["Si", "Si"], cell_scale=0.02)
    traj("mp-2", "mvc-5", 0, [0, 1, 2], ["Fe2+", "O2-"], n_atoms_change=True)
    traj("mp-2", "mp-2", 4, [1, 0, 2], ["Fe2+", "O2-"])
    return data, expect


def _check_mptrj(trajs, expect):
    assert [t.id for t in trajs] == ["mp-1/mp-1-0", "mp-1/mp-1-1", "mp-1/mp-77-0", "mp-2/mp-2-4"]
    for t in trajs:
        frames = expect[t.id]
        steps = sorted(frames, key=lambda k: int(k.rsplit("-", 1)[1]))
        assert t.n_frames == len(steps)
        for i, key in enumerate(steps):
            fr = frames[key]
            np.testing.assert_allclose(t.positions[i], [s["xyz"] for s in fr["structure"]["sites"]])
            np.testing.assert_allclose(t.forces[i], fr["force"])
            np.testing.assert_allclose(t.cell[i], fr["structure"]["lattice"]["matrix"])
            assert t.energy[i] == fr["uncorrected_total_energy"]
    assert [t.cell_changes for t in trajs] == [False, False, True, False]
    assert trajs[-1].numbers.tolist() == [26, 8]  # oxidation states stripped
    np.testing.assert_allclose(trajs[0].energy, [-5, -6, -7])  # ordered by ionic step


@pytest.mark.parametrize("gz", [False, True])
def test_mptrj(tmp_path, gz):
    data, expect = _mptrj_data()
    text = json.dumps(data).encode()
    path = tmp_path / ("MPtrj.json.gz" if gz else "MPtrj.json")
    path.write_bytes(gzip.compress(text) if gz else text)
    assert detect_format(path) == "mptrj"
    skipped = SkipLog()
    trajs = list(read_trajectories(path, skipped=skipped))
    _check_mptrj(trajs, expect)
    assert skipped.counts == {"changing_atoms": 1} and "mp-2/mvc-5-0" in skipped.messages[0]
    assert len(list(read_trajectories(path, limit=2))) == 2


def test_mptrj_fmt_override_and_manifest_ignored(tmp_path):
    data, expect = _mptrj_data()
    odd = tmp_path / "sub" / "mptrj.dat"
    odd.parent.mkdir()
    odd.write_text(json.dumps(data))
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x", "n": 3, "trajectories": []}))
    with pytest.raises(DataError, match="unsupported"):
        list(read_trajectories(odd))
    _check_mptrj(list(read_trajectories(odd, fmt="mptrj")), expect)
    # A directory: the manifest is not MPtrj and the .dat file is not picked up without a format.
    assert list(read_trajectories(tmp_path)) == []


def test_mptrj_unknown_element_skips_one_trajectory(tmp_path):
    data, expect = _mptrj_data()
    data["mp-1"]["mp-1-1-3"]["structure"]["sites"][1]["species"][0]["element"] = "Xx"
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        list(read_trajectories(path, strict=True))
    assert info.value.kind == "unknown_element"
    assert f"{path}: record mp-1/mp-1-1-3: unknown element 'Xx'" in _one_line(info.value)
    skipped = SkipLog()
    ids = [t.id for t in read_trajectories(path, skipped=skipped)]
    assert ids == ["mp-1/mp-1-0", "mp-1/mp-77-0", "mp-2/mp-2-4"]  # before and after the bad one
    assert skipped.counts == {"unknown_element": 1, "changing_atoms": 1}


@pytest.mark.parametrize("buf_size", [7, 65536])
def test_mptrj_nan_coordinates(tmp_path, monkeypatch, buf_size):
    # Python's json.dump writes bare NaN, which strict JSON parsers reject: only that trajectory goes.
    monkeypatch.setattr(mptrj_mod, "BUF_SIZE", buf_size)
    data, _ = _mptrj_data()
    data["mp-1"]["mp-1-1-2"]["structure"]["sites"][0]["xyz"][1] = float("nan")
    data["mp-2"]["mp-2-4-0"]["magmom"] = [float("nan"), float("-inf")]  # ignored field
    data["mp-2"]["mp-2-4-0"]["structure"]["sites"][0]["label"] = "NaN"  # a string stays a string
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    assert "NaN" in path.read_text()
    skipped = SkipLog()
    assert [t.id for t in read_trajectories(path, skipped=skipped)] == ["mp-1/mp-1-0", "mp-1/mp-77-0", "mp-2/mp-2-4"]
    assert skipped.counts == {"non_finite": 1, "changing_atoms": 1}
    with pytest.raises(DataError, match=r"record mp-1/mp-1-1: non-finite coordinates"):
        list(read_trajectories(path, strict=True))


def test_mptrj_truncated(tmp_path):
    data, _ = _mptrj_data()
    text = json.dumps(data)
    cut = text.index('"mp-2-4-0"') + 200  # inside the second mp-id's frame "mp-2-4-0"
    path = tmp_path / "MPtrj_cut.json"
    path.write_text(text[:cut])
    with pytest.raises(DataError) as info:
        list(read_trajectories(path, strict=True))
    msg = _one_line(info.value)
    assert info.value.kind == "truncated"
    assert str(path) in msg and "'mp-2'" in msg and "'mp-2-4-0'" in msg and "last complete mp_id 'mp-1'" in msg
    skipped = SkipLog()
    trajs = list(read_trajectories(path, skipped=skipped))
    assert [t.id for t in trajs] == ["mp-1/mp-1-0", "mp-1/mp-1-1", "mp-1/mp-77-0"]  # finished work is kept
    assert skipped.counts == {"truncated": 1}


def test_mptrj_truncated_far_into_a_big_file(tmp_path, monkeypatch):
    # Tiny reads make the parser cross many read boundaries, as in the 12 GB file.
    monkeypatch.setattr(mptrj_mod, "BUF_SIZE", 97)
    rng = np.random.default_rng(0)
    data = {}
    for k in range(40):
        mp_id = f"mp-{1000 + k}"
        data[mp_id] = {f"mp-{5000 + k}-0-{s}": _mp_frame(["Si", "Si"], rng.uniform(0, 4, (2, 3)), np.eye(3) * 4,
                                                           -1.0 - s, np.zeros((2, 3)), mp_id) for s in range(3)}
    text = json.dumps(data)
    path = tmp_path / "big.json"
    path.write_text(text[: text.index('"mp-5031-0-2"') + 150])
    skipped = SkipLog()
    trajs = list(read_trajectories(path, skipped=skipped))
    assert len(trajs) == 31 and trajs[-1].id == "mp-1030/mp-5030-0"
    (msg,) = skipped.messages
    assert "while reading mp_id 'mp-1031', frame 'mp-5031-0-2'" in msg and "last complete mp_id 'mp-1030'" in msg
    # Truncated between two records: the parser has not handed out mp-1031 yet (ijson reports a record
    # once it sees the next key), but it is complete in the file and is kept.
    for cut in (text.index('"mp-1032"'), text.index('"mp-1032"') + 5):
        path.write_text(text[:cut])
        skipped = SkipLog()
        trajs = list(read_trajectories(path, skipped=skipped))
        assert len(trajs) == 32 and trajs[-1].id == "mp-1031/mp-5031-0"
        assert skipped.messages[0].endswith("after the last complete record; last complete mp_id 'mp-1031'")


@pytest.mark.parametrize("content,kind", [("", "empty"), ("{}", "empty"), ('{"mp-1": {"mp-1-0-0": ]}', "malformed")])
def test_mptrj_empty_or_malformed(tmp_path, content, kind):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        list(read_trajectories(path, strict=True))
    assert info.value.kind == kind and str(path) in _one_line(info.value)


# --------------------------------------------------------------------------------------------------
# OC20 S2EF extxyz chunks
# --------------------------------------------------------------------------------------------------


def _s2ef_chunk(tmp_path, stem="0", compress=False):
    """Frames of two systems interleaved and out of order, with the companion txt."""
    rng = np.random.default_rng(1)
    rows, frames, expect = [], [], {}
    plan = [("random111", 45, -1.5), ("random222", 3, -2.0), ("random111", 2, -1.5), ("random222", 0, -2.0),
            ("random111", 17, -1.5)]
    for sid, number, ref in plan:
        atoms = Atoms("Cu2O", positions=rng.uniform(0, 6, (3, 3)), cell=np.eye(3) * 6, pbc=True)
        atoms.set_tags([0, 1, 2])
        atoms.new_array("fixed", np.array([1, 0, 0]))
        forces = rng.normal(size=(3, 3))
        energy = float(rng.normal())
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
        rows.append(f"{sid},frame{number},{ref}")
        expect.setdefault(sid, []).append((number, atoms.positions.copy(), forces, energy - ref))
    xyz = tmp_path / f"{stem}.extxyz"
    write(xyz, frames, format="extxyz")
    txt_text = "\n".join(rows) + "\n"
    if compress:
        xyz.with_name(f"{stem}.extxyz.xz").write_bytes(lzma.compress(xyz.read_bytes()))
        xyz.unlink()
        (tmp_path / f"{stem}.txt.xz").write_bytes(lzma.compress(txt_text.encode()))
        return tmp_path / f"{stem}.extxyz.xz", expect
    (tmp_path / f"{stem}.txt").write_text(txt_text)
    return xyz, expect


@pytest.mark.parametrize("compress", [False, True])
def test_s2ef_chunk(tmp_path, compress):
    path, expect = _s2ef_chunk(tmp_path, compress=compress)
    assert detect_format(path) == "s2ef"
    trajs = list(read_trajectories(tmp_path, strict=True))
    assert [t.id for t in trajs] == ["random111", "random222"]  # order of first appearance
    for t in trajs:
        items = sorted(expect[t.id], key=lambda x: x[0])  # ordered by frame number
        np.testing.assert_allclose(t.positions, [p for _, p, _, _ in items], atol=1e-8)
        np.testing.assert_allclose(t.forces, [f for _, _, f, _ in items], atol=1e-8)
        np.testing.assert_allclose(t.energy, [e for _, _, _, e in items], atol=1e-8)  # minus reference
        assert t.tags.tolist() == [0, 1, 2] and t.fixed.tolist() == [True, False, False]
    assert [t.n_frames for t in trajs] == [3, 2]
    # Forcing "ase" reads the chunk as one plain trajectory file.
    (whole,) = list(read_trajectories(tmp_path, fmt="ase", strict=True))
    assert whole.n_frames == 5


def test_s2ef_bad_frame_keeps_complete_systems(tmp_path):
    path, _ = _s2ef_chunk(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    # Break the last frame (random111's): random222's frames all come before it and survive.
    lines[-1] = "Cu 1 2\n"
    path.write_text("".join(lines))
    skipped = SkipLog()
    trajs = list(read_trajectories(path, skipped=skipped))
    assert [t.id for t in trajs] == ["random222"]
    assert skipped.counts == {"malformed": 1} and "frame 4" in skipped.messages[0]
    with pytest.raises(DataError):
        list(read_trajectories(path, strict=True))


# --------------------------------------------------------------------------------------------------
# ASE databases
# --------------------------------------------------------------------------------------------------


def test_ase_db_grouping(tmp_path):
    import ase.db

    path = tmp_path / "relax.db"
    db = ase.db.connect(path)
    frames = _si_frames(4, seed=5)
    # traj "a": inserted out of order, ordered by ionic_step; "b" by its string frame key;
    # mp_id + calc_id groups; a row with no keys is its own trajectory.
    for step in (2, 0, 3, 1):
        db.write(frames[step], traj_id="a", ionic_step=step)
    db.write(frames[0], key_value_pairs={"sid": 7, "frame": "frame10"})
    db.write(frames[1], key_value_pairs={"sid": 7, "frame": "frame2"})
    db.write(frames[2])
    db.write(frames[3], mp_id="mp-9", calc_id=1, step=5)
    db.write(frames[1], mp_id="mp-9", calc_id=1, step=4)
    trajs = list(read_trajectories(path, strict=True))
    assert [t.id for t in trajs] == ["a", "7", "row7", "mp-9/1"]
    a = trajs[0]
    np.testing.assert_allclose(a.positions, [f.positions for f in frames], atol=1e-10)
    np.testing.assert_allclose(a.energy, [-10, -11, -12, -13])
    np.testing.assert_allclose(a.forces, [f.calc.results["forces"] for f in frames])
    assert a.fixed.tolist() == [True, False, False, False] and a.tags.tolist() == [0, 1, 2, 0]
    np.testing.assert_allclose(trajs[1].energy, [-11, -10])
    assert trajs[2].n_frames == 1
    np.testing.assert_allclose(trajs[3].energy, [-11, -13])


# --------------------------------------------------------------------------------------------------
# OC20 LMDB
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def pyg(monkeypatch):
    """Classes registered under torch_geometric's real module paths, so pickles look like the real files."""
    names = ["torch_geometric", "torch_geometric.data", "torch_geometric.data.data", "torch_geometric.data.storage"]
    mods = {name: types.ModuleType(name) for name in names}

    def make(module, name):
        cls = type(name, (), {})
        cls.__module__, cls.__qualname__ = module, name
        setattr(mods[module], name, cls)
        return cls

    ns = types.SimpleNamespace(
        Data=make("torch_geometric.data.data", "Data"),
        DataEdgeAttr=make("torch_geometric.data.data", "DataEdgeAttr"),
        DataTensorAttr=make("torch_geometric.data.data", "DataTensorAttr"),
        GlobalStorage=make("torch_geometric.data.storage", "GlobalStorage"),
    )
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return ns


def _oc20_attrs(torch, seed, n=5, with_y=True, dtype=None):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=g) * 8
    attrs = {
        "pos": pos, "pos_relaxed": pos + 0.1 * torch.rand(n, 3, generator=g),
        "cell": (torch.eye(3) * 8).reshape(1, 3, 3), "atomic_numbers": torch.tensor([29.0] * (n - 2) + [8.0, 1.0]),
        "natoms": n, "tags": torch.tensor([0] * (n - 3) + [1, 2, 2]),
        "fixed": torch.tensor([1.0] * (n - 3) + [0.0, 0.0, 0.0]), "sid": 1000 + seed,
        "force": torch.rand(n, 3, generator=g), "edge_index": torch.zeros(2, 0, dtype=torch.long),
    }
    if with_y:
        attrs.update(y_init=float(seed) + 0.5, y_relaxed=float(seed) - 0.25)
    return attrs


def _pyg1(pyg, attrs):
    data = pyg.Data()
    data.__dict__.update({"x": None, "edge_attr": None, "__num_nodes__": None, **attrs})
    return data


def _pyg2(pyg, attrs):
    data, store = pyg.Data(), pyg.GlobalStorage()
    store.__dict__.update(_mapping=dict(attrs), _parent=data)
    data.__dict__.update(_store=store, _edge_attr_cls=pyg.DataEdgeAttr, _tensor_attr_cls=pyg.DataTensorAttr)
    return data


def _write_lmdb(path, values, length=True):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(str(i).encode(), value)
        if length:
            txn.put(b"length", pickle.dumps(len(values), protocol=4))
    env.sync()
    env.close()
    return path


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_oc20_lmdb_both_pyg_layouts(tmp_path, pyg):
    torch = pytest.importorskip("torch")
    attrs = [_oc20_attrs(torch, s) for s in range(4)]
    attrs[1]["pos"] = attrs[1]["pos"].t().contiguous().t()  # a strided (transposed) tensor
    attrs[2]["sid"] = torch.tensor([1002])
    # PyG 1.x (2020 OC20 files) and 2.x layouts, under every pickle protocol writers have used.
    values = [pickle.dumps(_pyg1(pyg, attrs[0]), protocol=4), pickle.dumps(_pyg2(pyg, attrs[1]), protocol=5),
              pickle.dumps(_pyg2(pyg, attrs[2]), protocol=2), pickle.dumps(_pyg1(pyg, attrs[3]), protocol=1)]
    lmdb_dir = tmp_path / "is2re"
    lmdb_dir.mkdir()
    path = _write_lmdb(lmdb_dir / "data.lmdb", values)
    assert detect_format(path) == "oc20_lmdb"
    trajs = list(read_trajectories(lmdb_dir, strict=True))  # a folder of .lmdb files
    assert [t.id for t in trajs] == ["1000", "1001", "1002", "1003"]
    for t, a in zip(trajs, attrs):
        assert t.endpoints_only and t.n_frames == 2 and t.pbc.all() and t.forces is None
        np.testing.assert_allclose(t.positions[0], a["pos"].numpy(), rtol=1e-6)
        np.testing.assert_allclose(t.positions[1], a["pos_relaxed"].numpy(), rtol=1e-6)
        np.testing.assert_allclose(t.cell[0], np.eye(3) * 8)
        assert t.numbers.tolist() == [29, 29, 29, 8, 1]
        assert t.tags.tolist() == [0, 0, 1, 2, 2] and t.fixed.tolist() == [True, True, False, False, False]
        np.testing.assert_allclose(t.energy, [a["y_init"], a["y_relaxed"]])
    # The torch decoder (for layouts the numpy one does not know) gives the same records.
    from bptt_jax.data.oc20 import read_oc20_lmdb

    for a, b in zip(trajs, read_oc20_lmdb(path, decoder="torch")):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.tags, b.tags)


def test_oc20_numpy_decoder_needs_no_torch(tmp_path, pyg, monkeypatch):
    torch = pytest.importorskip("torch")
    from bptt_jax.data.oc20 import load_storage, unpickle_record

    value = pickle.dumps(_pyg2(pyg, _oc20_attrs(torch, 0, with_y=False)), protocol=4)
    t = torch.arange(6, dtype=torch.float64)
    zipped = io.BytesIO()
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what pickles hold
        warnings.simplefilter("ignore")
        torch.save(t.storage(), zipped)  # the zip layout
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now fails
    rec = unpickle_record(value, "f.lmdb", "0", decoder="numpy")
    assert rec.attributes()["tags"].dtype == np.int64
    np.testing.assert_array_equal(load_storage(zipped.getvalue()), np.arange(6.0))
    with pytest.raises(MissingDependency) as info:
        unpickle_record(value, "f.lmdb", "0", decoder="torch")
    assert "bptt-jax[lmdb]" in _one_line(info.value)


def test_oc20_unknown_storage_layout_falls_back_to_torch(tmp_path, pyg, monkeypatch):
    torch = pytest.importorskip("torch")
    from bptt_jax.data import oc20

    def unknown_layout(b):
        raise oc20.NeedTorch("pretend this is the pre-2018 tar layout")

    monkeypatch.setitem(oc20._NUMPY_DECODER, ("torch.storage", "_load_from_bytes"), unknown_layout)
    attrs = _oc20_attrs(torch, 4)
    path = _write_lmdb(tmp_path / "data.lmdb", [pickle.dumps(_pyg2(pyg, attrs), protocol=4)])
    (traj,) = list(read_trajectories(path, strict=True))
    np.testing.assert_allclose(traj.positions[1], attrs["pos_relaxed"].numpy(), rtol=1e-6)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependency, match=r"bptt-jax\[lmdb\]"):  # never silently skipped
        list(read_trajectories(path))


@pytest.mark.parametrize("evil,refused", [
    (b"cos\nsystem\n(S'touch PWNED'\ntR.", "os.system"),
    (None, "builtins.eval"),
    (b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93\x8c\x0btouch PWNED\x94\x85R.", "posix.system"),
])
def test_oc20_refuses_other_classes(tmp_path, pyg, monkeypatch, evil, refused):
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    if evil is None:
        evil = pickle.dumps(_Evil(eval, ("open('PWNED', 'w')",)), protocol=4)
    good = [pickle.dumps(_pyg2(pyg, _oc20_attrs(torch, s)), protocol=4) for s in range(2)]
    path = _write_lmdb(tmp_path / "data.lmdb", [good[0], evil, good[1]])
    with pytest.raises(DataError) as info:
        list(read_trajectories(path, strict=True))
    msg = _one_line(info.value)
    assert info.value.kind == "refused_class" and str(path) in msg and "record 1" in msg and refused in msg
    skipped = SkipLog()
    assert [t.id for t in read_trajectories(path, skipped=skipped)] == ["1000", "1001"]
    assert skipped.counts == {"refused_class": 1}
    assert not (tmp_path / "PWNED").exists()


def test_oc20_refuses_classes_inside_tensor_storage(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    # A storage's torch.save bytes are a pickle stream too; a crafted one must not run anything either.
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    storage_bytes = head + b"cos\nsystem\n(S'touch PWNED'\ntR."
    value = pickle.dumps(_Evil(torch.storage._load_from_bytes, (storage_bytes,)), protocol=4)
    path = _write_lmdb(tmp_path / "data.lmdb", [value])
    with pytest.raises(DataError) as info:
        list(read_trajectories(path, strict=True))
    assert info.value.kind == "refused_class" and "os.system inside a tensor storage" in _one_line(info.value)
    assert not (tmp_path / "PWNED").exists()


def test_oc20_bad_records(tmp_path, pyg):
    torch = pytest.importorskip("torch")
    good = pickle.dumps(_pyg2(pyg, _oc20_attrs(torch, 0)), protocol=4)
    no_relaxed = _oc20_attrs(torch, 1)
    del no_relaxed["pos_relaxed"]
    nan = _oc20_attrs(torch, 2)
    nan["pos"][1, 1] = float("nan")
    values = [good, good[: len(good) // 2], pickle.dumps(_pyg2(pyg, no_relaxed), protocol=4),
              pickle.dumps(_pyg1(pyg, nan), protocol=4), b"not a pickle", good]
    path = _write_lmdb(tmp_path / "x.lmdb", values, length=False)  # no "length": digit keys in order
    skipped = SkipLog()
    trajs = list(read_trajectories(path, skipped=skipped))
    assert [t.id for t in trajs] == ["1000", "1000"]
    assert skipped.counts == {"unpickle": 2, "missing_field": 1, "non_finite": 1}
    assert all("\n" not in m for m in skipped.messages)
    with pytest.raises(DataError, match=r"x\.lmdb: record 1: cannot unpickle"):
        list(read_trajectories(path, strict=True))


def test_oc20_not_an_lmdb(tmp_path):
    pytest.importorskip("lmdb")
    path = tmp_path / "broken.lmdb"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError) as info:
        list(read_trajectories(path, strict=True))
    assert str(path) in _one_line(info.value)


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def test_summarize_mixed_directory(tmp_path):
    data, _ = _mptrj_data()
    (tmp_path / "mptrj").mkdir()
    (tmp_path / "mptrj" / "part.json").write_text(json.dumps(data))
    (tmp_path / "xyz").mkdir()
    write(tmp_path / "xyz" / "si.extxyz", _si_frames(3))
    _write_text(tmp_path / "xyz" / "zz_bad.extxyz", "")
    (tmp_path / "notes.md").write_text("ignored")
    s = summarize(tmp_path)
    assert isinstance(s, Summary)
    assert s.trajectories == 5 and s.formats == {"mptrj": 4, "ase": 1} and s.files_read == 3
    assert s.frames == 3 + 4 + 3 + 3 + 3 and s.frames_min == 3 and s.frames_max == 4
    assert s.atoms_min == 2 and s.atoms_max == 4
    assert s.elements == ["Fe", "O", "Si"]
    assert s.cell_changes == 2 and s.endpoints_only == 0 and s.usable == 5
    assert s.skipped.counts == {"changing_atoms": 1, "empty": 1}
    text = format_summary(s)
    assert "trajectories    5 (ase: 1, mptrj: 4)" in text and "Fe O Si" in text
    assert "skipped         2 (changing_atoms: 1, empty: 1)" in text and "zz_bad.extxyz" in text
    with pytest.raises(DataError, match="empty file"):
        summarize(tmp_path, strict=True)
    only_ase = summarize(tmp_path, fmt="ase")
    assert only_ase.trajectories == 1 and only_ase.files_read == 2


def test_inspect_cli(tmp_path, capsys):
    from bptt_jax.data.__main__ import main

    write(tmp_path / "si.extxyz", _si_frames(3))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "trajectories    1 (ase: 1)" in out
    shutil.copy(tmp_path / "si.extxyz", tmp_path / "b.extxyz")
    (tmp_path / "c.extxyz").write_text("")
    assert main(["inspect", str(tmp_path), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c.extxyz" in err
