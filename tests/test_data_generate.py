import json
import subprocess
import sys

import numpy as np
import pytest

from bptt_jax.data import read_trajectories
from bptt_jax.data.generate import (SiDefectParams, build_catalyst, build_crystal, build_si_defect, generate,
                                    make_params)


def _read_all(path):
    return list(read_trajectories(path))


def test_si_defect_builders_make_the_right_defects():
    rng = np.random.default_rng(0)
    expected = {"vacancy": 63, "divacancy": 62, "interstitial_tetrahedral": 65, "interstitial_hexagonal": 65,
                "interstitial_split110": 65, "substitution": 64, "vacancy_substitution": 63,
                "substitution_pair": 64, "interstitial_substitution": 65}
    for kind, n in expected.items():
        atoms, info = build_si_defect(SiDefectParams(kinds=(kind,)), rng)
        assert len(atoms) == n and info["kind"] == kind
        if "substitution" in kind:
            assert set(atoms.get_chemical_symbols()) - {"Si"}
        # No two atoms closer than a physical bond after the rattle (the relaxation must be sane).
        d = atoms.get_all_distances(mic=True)[np.triu_indices(len(atoms), 1)]
        assert d.min() > 1.0, kind
    # Stillinger-Weber covers Si only: substitutions are left out.
    for seed in range(10):
        atoms, info = build_si_defect(SiDefectParams(potential="sw"), np.random.default_rng(seed))
        assert set(atoms.get_chemical_symbols()) == {"Si"}


def test_si_defects_generation_is_deterministic_and_cached(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    m1 = generate("si_defects", a, preset="tiny", n=3, seed=7, progress=False)
    generate("si_defects", b, preset="tiny", n=3, seed=7, progress=False, workers=2)
    for rec in m1["trajectories"]:
        assert (a / rec["file"]).read_bytes() == (b / rec["file"]).read_bytes()
    assert m1["complete"] and m1["counts"]["trajectories"] == 3
    assert {"ase", "numpy", "jax"} <= set(m1["versions"])
    # Re-running reuses the files; a larger n extends the set.
    mtime = (a / m1["trajectories"][0]["file"]).stat().st_mtime_ns
    generate("si_defects", a, preset="tiny", n=3, seed=7, progress=False)
    m2 = generate("si_defects", a, preset="tiny", n=4, seed=7, progress=False)
    assert (a / m1["trajectories"][0]["file"]).stat().st_mtime_ns == mtime
    assert m2["counts"]["trajectories"] == 4
    with pytest.raises(ValueError, match="seed differs"):
        generate("si_defects", a, preset="tiny", n=4, seed=8, progress=False)
    trajs = _read_all(a)
    assert len(trajs) == 4
    t = trajs[0]
    assert t.forces is not None and t.energy is not None and t.n_frames >= 3
    assert np.all(np.diff(t.energy[[0, -1]]) < 0)  # a relaxation lowers the energy
    assert t.pbc.all() and not t.cell_changes


def test_catalyst_defaults_free_two_layers_of_a_3x3_slab():
    p = make_params("catalysts")
    facets = set()
    for i in range(24):
        atoms, info = build_catalyst(p, np.random.default_rng([0, i]))
        facets.add(info["facet"])
        tags, z = atoms.get_tags(), atoms.positions[:, 2]
        assert len(atoms) <= 40, info
        # 3x3 surface, 4 layers (211: terraces of three (211) planes), the top 2 free: 18 free, 18 fixed.
        assert (tags == 1).sum() == 18 and (tags == 0).sum() == 18, info
        assert z[tags == 1].min() > z[tags == 0].max()
        # The adsorbate starts above the surface, and nothing overlaps after the rattle.
        assert z[tags == 2][0] - z[tags == 1].max() > 1.0, info
        d = atoms.get_all_distances(mic=True)[np.triu_indices(len(atoms), 1)]
        assert d.min() > 0.8, info
    assert facets == {"111", "100", "211"}


def test_crystal_defaults_are_big_enough_and_not_overlapping():
    p = make_params("pure_crystals")
    for i in range(40):
        atoms, info = build_crystal(p, np.random.default_rng([0, i]))
        assert p.min_atoms <= len(atoms) <= p.max_atoms, info  # no 1-atom cell: nothing to relax there
        d = atoms.get_all_distances(mic=True)[np.triu_indices(len(atoms), 1)]
        assert d.min() > 1.6, info  # nearest neighbours are 2.5-2.9 Å apart in these metals


def test_catalysts_have_fixed_subsurface_and_oc20_tags(tmp_path):
    m = generate("catalysts", tmp_path, preset="tiny", n=3, seed=1, progress=False)
    assert m["counts"]["atoms_max"] <= 21  # the tiny preset stays tiny (2x2x3; a 211 slab has 18 atoms)
    for t in _read_all(tmp_path):
        assert list(t.pbc) == [True, True, False]
        assert set(np.unique(t.tags)) == {0, 1, 2}
        np.testing.assert_array_equal(t.fixed, t.tags == 0)
        # Fixed atoms never move; there is ≥ 10 Å of vacuum above the top atom.
        assert np.abs(t.positions[:, t.fixed] - t.positions[0, t.fixed]).max() == 0
        top = t.positions[0, :, 2].max()
        assert t.cell[0, 2, 2] - top >= 9.5
        adsorbate = set(t.numbers[t.tags == 2]) <= {1, 6, 7, 8}
        assert adsorbate


def test_pure_crystals_relax_positions_in_a_fixed_cell(tmp_path):
    m = generate("pure_crystals", tmp_path, preset="tiny", n=4, seed=2, progress=False)
    assert m["counts"]["atoms_max"] <= 16
    for t in _read_all(tmp_path):
        assert t.pbc.all() and not t.cell_changes
        f_last = np.linalg.norm(t.forces[-1], axis=1).max()
        assert f_last <= 0.02 + 1e-9 or t.n_frames == make_params("pure_crystals", "tiny").max_steps + 1


def test_make_params_errors():
    with pytest.raises(ValueError, match="unknown generator"):
        make_params("qm9")
    with pytest.raises(ValueError, match="unknown preset"):
        make_params("si_defects", "huge")
    with pytest.raises(ValueError, match="unknown parameter"):
        make_params("si_defects", bogus=1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bptt_jax.data", *args], capture_output=True, text=True)


def test_cli_generate_inspect_and_errors(tmp_path):
    out = tmp_path / "cat"
    r = _cli("generate", "catalysts", "--out", str(out), "--preset", "tiny", "--n", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "2 trajectories" in r.stdout
    assert json.loads((out / "manifest.json").read_text())["generator"] == "catalysts"
    r = _cli("inspect", str(out))
    assert r.returncode == 0 and "2 (ase: 2)" in r.stdout and "elements" in r.stdout
    # A bad file: one line on stderr naming it, no traceback, non-zero exit in strict mode.
    bad = tmp_path / "bad.extxyz"
    bad.write_text("3\nLattice=\"1 0 0 0 1 0 0 0 1\" Properties=species:S:1:pos:R:3\nSi 0 0 0\nSi 1 1\n")
    r = _cli("inspect", str(bad), "--strict")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "bad.extxyz" in r.stderr
    r = _cli("generate", "catalysts", "--out", str(out), "--preset", "tiny", "--n", "2", "--seed", "5", "--quiet")
    assert r.returncode == 2 and "different dataset" in r.stderr and "Traceback" not in r.stderr
