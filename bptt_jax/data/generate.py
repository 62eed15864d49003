"""Offline ground truth: relaxation trajectories made with real, published potentials.

The paper's datasets (Si point defects, MPtrj, OC20) cannot be downloaded here, so three generators
produce data of the same kinds, recorded frame by frame the way a DFT relaxation is (every ionic step,
with forces and energy):

- ``si_defects``: diamond-Si supercells (2×2×2 = 64 sites; ``preset=large``: 3×3×3 = 216) with
  vacancies, self-interstitials (tetrahedral, hexagonal, ⟨110⟩ split), substitutions (C, Ge) and small
  complexes, rattled, relaxed with FIRE to fmax 0.01 eV/Å with the Tersoff (1989) Si/C/Ge potential
  (``potential=sw``: Stillinger–Weber, pure-Si defect kinds only).
- ``catalysts``: OC20-like fcc(111)/(100)/(211) slabs of Cu, Ag, Au, Ni, Pd, Pt, Al with O, H, N, C,
  OH, CO, CH, NH, CH2, NH2 adsorbates, ≥ 10 Å vacuum, relaxed with ASE's EMT and BFGS to fmax 0.05 eV/Å
  (at most 200 steps). 3×3 surface cells of 4 layers (36 metal atoms; ``preset=large``: 4×4), the top 2
  layers free and rattled by 0.15 Å, the rest fixed (OC20 tags 0/1/2; on (211) a layer is one terrace, three
  (211) planes). The adsorbate starts 1.6-2.6 Å above its site (above most EMT minima), shifted 0.25 Å
  off the site and tilted up to 35°, so relaxing matters: the best constant step with EMT's own forces
  brings the slabs 71% closer (Avg Dq) to the relaxed ones than not relaxing, on 40 of them (21% with the
  earlier 2×2 slabs, (211) slabs freed by plane, 0.05 Å rattle and adsorbates anywhere in the cell).
- ``pure_crystals``: MPtrj-like bulk cells (8 to ~100 atoms) of EMT metals and ordered/random alloys (fcc,
  bcc, hcp, L1_2, L1_0, B2, random fcc), strained (|ε| ≤ 5%) and rattled (0.15 Å), positions relaxed in
  the fixed cell with FIRE to fmax 0.02 eV/Å.

Each trajectory is one extxyz file (every frame; energy, forces, ``tags`` and ``fixed`` arrays); the
directory's ``manifest.json`` records generator, parameters, seed, counts and package versions.
Trajectory ``i`` depends only on (generator, parameters, seed, i): the same seed gives the same files,
whatever the number of workers (relaxations run with one BLAS thread, see :func:`single_threaded_blas`), and
an interrupted run resumes where it stopped: every file (trajectories, manifest) is written under a temporary name
and renamed, so a killed generation leaves none half written (and the next one removes its temporary files).
:mod:`bptt_jax.oracle` relaxes a generated test split with the generating potential's own forces under the
library's constant-step rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc100, fcc111, fcc211
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.data import atomic_numbers, reference_states

from bptt_jax.files import atomic_path, remove_stale, write_text_atomic

MANIFEST = "manifest.json"

# ---------------------------------------------------------------------------------------------------
# Parameters


@dataclasses.dataclass(frozen=True)
class SiDefectParams:
    n: int = 240
    repeat: int = 2  # conventional cells per side: 2 -> 64 sites, 3 -> 216
    potential: str = "tersoff"  # "tersoff" (Si/C/Ge) or "sw" (Si only)
    rattle: float = 0.08  # Å, Gaussian on every atom
    defect_rattle: float = 0.25  # Å, extra on atoms near the defect
    fmax: float = 0.01  # eV/Å
    max_steps: int = 400
    kinds: tuple[str, ...] = ("vacancy", "divacancy", "interstitial_tetrahedral", "interstitial_hexagonal",
                              "interstitial_split110", "substitution", "vacancy_substitution",
                              "substitution_pair", "interstitial_substitution")
    dopants: tuple[str, ...] = ("C", "Ge")


@dataclasses.dataclass(frozen=True)
class CatalystParams:
    n: int = 200
    metals: tuple[str, ...] = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
    facets: tuple[str, ...] = ("111", "100", "211")
    adsorbates: tuple[str, ...] = ("O", "H", "N", "C", "OH", "CO", "CH", "NH", "CH2", "NH2")
    size: tuple[int, int, int] = (3, 3, 4)  # surface repeats and layers (211: 3 atoms across the terrace)
    free_layers: int = 2  # top layers that relax; the rest are fixed (OC20 tag 0). 211: a layer is a terrace
    vacuum: float = 10.0  # Å on each side
    rattle: float = 0.15  # Å, Gaussian on the free slab atoms
    height: tuple[float, float] = (1.6, 2.6)  # Å above the top layer, uniform (EMT minima: ~0.8-2.1 Å)
    lateral: float = 0.25  # Å, Gaussian in-plane shift of the adsorbate away from its site
    tilt: float = 35.0  # degrees, largest random tilt of a molecular adsorbate
    adsorbate_rattle: float = 0.05  # Å, Gaussian on adsorbate atoms
    fmax: float = 0.05
    max_steps: int = 200
    optimizer: str = "BFGS"


@dataclasses.dataclass(frozen=True)
class CrystalParams:
    n: int = 400
    elements: tuple[str, ...] = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
    lattices: tuple[str, ...] = ("fcc", "bcc", "hcp", "L1_2", "L1_0", "B2", "random_fcc")
    max_atoms: int = 100
    min_atoms: int = 8  # smaller cells are repeated up to this (a 1-atom cell has nothing to relax)
    strain: float = 0.05  # max |ε| of a random symmetric strain
    rattle: float = 0.15  # Å, Gaussian on every atom
    fmax: float = 0.02
    max_steps: int = 300


PARAMS: dict[str, type] = {"si_defects": SiDefectParams, "catalysts": CatalystParams,
                           "pure_crystals": CrystalParams}

# Presets: "default" keeps the default training job near 10 minutes on 2 cores; "large" for real runs.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "si_defects": {"tiny": dict(n=6, max_steps=60, fmax=0.05), "default": {}, "large": dict(n=1500, repeat=3)},
    "catalysts": {"tiny": dict(n=6, max_steps=40, size=(2, 2, 3)), "default": {},
                  "large": dict(n=2000, size=(4, 4, 4))},
    "pure_crystals": {"tiny": dict(n=8, max_atoms=16, max_steps=60), "default": {},
                      "large": dict(n=5000)},
}


def make_params(name: str, preset: str = "default", **overrides: Any):
    """Generator parameters from a preset and overrides (unknown names are an error)."""
    if name not in PARAMS:
        raise ValueError(f"unknown generator {name!r}; choose from {sorted(PARAMS)}")
    if preset not in PRESETS[name]:
        raise ValueError(f"unknown preset {preset!r} for {name}; choose from {sorted(PRESETS[name])}")
    fields = {f.name for f in dataclasses.fields(PARAMS[name])}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {name}; known: {sorted(fields)}")
    values = {**PRESETS[name][preset], **{k: v for k, v in overrides.items() if v is not None}}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return PARAMS[name](**values)


# ---------------------------------------------------------------------------------------------------
# Relaxation with frame recording


@contextlib.contextmanager
def single_threaded_blas():
    """numpy's BLAS on one thread inside the block (``threadpoolctl``).

    ASE's BFGS diagonalises the 3N×3N Hessian every step. On matrices that small, threads buy nothing and cost
    a lot when the cores are busy: ``eigh`` of a 114×114 matrix took 2 ms on one thread and 220 ms on two
    (a 2-core machine running another job), which made BFGS 5-7× slower. One thread also makes the results
    independent of the machine's core count.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def relax_and_record(atoms: Atoms, fmax: float, max_steps: int, optimizer: str = "FIRE") -> list[Atoms]:
    """Relax ``atoms`` (with its calculator) and return every frame, each with energy and raw
    (unconstrained) forces attached as a SinglePointCalculator."""
    from ase import optimize

    frames: list[Atoms] = []

    def record():
        snap = atoms.copy()
        snap.calc = SinglePointCalculator(snap, energy=atoms.get_potential_energy(),
                                          forces=atoms.get_forces(apply_constraint=False))
        frames.append(snap)

    opt = getattr(optimize, optimizer)(atoms, logfile=None)
    opt.attach(record, interval=1)
    with single_threaded_blas():
        opt.run(fmax=fmax, steps=max_steps)
    return frames


def _layers(z: np.ndarray, tol: float = 0.3) -> np.ndarray:
    """Layer index per atom counted from the top (0 = top), grouping z within ``tol`` Å."""
    order = np.argsort(-z)
    layer = np.zeros(len(z), int)
    current, last = 0, z[order[0]]
    for idx in order:
        if last - z[idx] > tol:
            current += 1
            last = z[idx]
        layer[idx] = current
    return layer


# ---------------------------------------------------------------------------------------------------
# Catalysts


_ADSORBATES: dict[str, list[tuple[str, tuple[float, float, float]]]] = {
    # Binding atom first at the origin; others relative to it (Å).
    "O": [("O", (0, 0, 0))], "H": [("H", (0, 0, 0))], "N": [("N", (0, 0, 0))], "C": [("C", (0, 0, 0))],
    "OH": [("O", (0, 0, 0)), ("H", (0, 0, 0.97))],
    "CO": [("C", (0, 0, 0)), ("O", (0, 0, 1.15))],
    "CH": [("C", (0, 0, 0)), ("H", (0, 0, 1.09))],
    "NH": [("N", (0, 0, 0)), ("H", (0, 0, 1.02))],
    "CH2": [("C", (0, 0, 0)), ("H", (0.89, 0, 0.63)), ("H", (-0.89, 0, 0.63))],
    "NH2": [("N", (0, 0, 0)), ("H", (0.82, 0, 0.58)), ("H", (-0.82, 0, 0.58))],
}

_SITES = {"111": ("ontop", "bridge", "fcc", "hcp"), "100": ("ontop", "bridge", "hollow"),
          "211": ("ontop", "bridge")}  # 211: on and between the step-edge atoms


def build_catalyst(p: CatalystParams, rng: np.random.Generator) -> tuple[Atoms, dict[str, Any]]:
    metal = str(rng.choice(p.metals))
    facet = str(rng.choice(p.facets))
    ads = str(rng.choice(p.adsorbates))
    nx, ny, nl = p.size
    a = reference_states[atomic_numbers[metal]]["a"]
    if facet == "111":
        slab = fcc111(metal, size=(nx, ny, nl), a=a, vacuum=p.vacuum)
    elif facet == "100":
        slab = fcc100(metal, size=(nx, ny, nl), a=a, vacuum=p.vacuum)
    else:
        slab = fcc211(metal, size=(3, max(ny, 2), max(nl, 3)), a=a, vacuum=p.vacuum)
    layer = _layers(slab.positions[:, 2])
    if facet == "211":  # three (211) planes make one terrace-wide layer, as ase.build.fcc211 counts them
        layer = layer // 3
    n_slab = len(slab)
    site = str(rng.choice(_SITES[facet]))
    height = float(rng.uniform(*p.height))
    mol = Atoms([s for s, _ in _ADSORBATES[ads]], positions=[xyz for _, xyz in _ADSORBATES[ads]])
    # A random tilt, so the relaxation has work to do.
    mol.rotate(float(rng.uniform(0, p.tilt)), (float(rng.normal()), float(rng.normal()), 0.0), center=(0, 0, 0))
    shift = rng.normal(0.0, p.lateral, 2)
    if facet == "211":
        # A step-edge atom (the highest plane) near the middle of the row; bridge: halfway to the next one.
        edge = np.flatnonzero(_layers(slab.positions[:, 2]) == 0)
        xy = slab.positions[edge[len(edge) // 2], :2].copy()
        if site == "bridge":
            xy += 0.5 * np.asarray(slab.cell)[1, :2] / max(ny, 2)
        add_adsorbate(slab, mol, height, position=tuple(xy + shift))
    else:  # the site in the middle unit cell of the surface
        info = slab.info["adsorbate_info"]
        xy = (np.asarray(info["sites"][site]) + ((nx - 1) // 2, (ny - 1) // 2)) @ np.asarray(info["cell"])
        add_adsorbate(slab, mol, height, position=tuple(xy + shift))
    tags = np.zeros(len(slab), int)
    tags[:n_slab] = np.where(layer < p.free_layers, 1, 0)
    tags[n_slab:] = 2
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.positions[tags == 1] += rng.normal(0.0, p.rattle, (int((tags == 1).sum()), 3))
    slab.positions[tags == 2] += rng.normal(0.0, p.adsorbate_rattle, (int((tags == 2).sum()), 3))
    slab.center(vacuum=p.vacuum, axis=2)
    slab.info.pop("adsorbate_info", None)  # ASE bookkeeping; not a property of the structure
    return slab, {"metal": metal, "facet": facet, "adsorbate": ads, "site": site}


# ---------------------------------------------------------------------------------------------------
# Pure crystals


def _fcc_a(symbols: list[str]) -> float:
    return float(np.mean([reference_states[atomic_numbers[s]]["a"] for s in symbols]))


def build_crystal(p: CrystalParams, rng: np.random.Generator) -> tuple[Atoms, dict[str, Any]]:
    lattice = str(rng.choice(p.lattices))
    el = [str(x) for x in rng.choice(p.elements, size=2, replace=False)]
    a_fcc = _fcc_a(el if lattice in ("L1_2", "L1_0", "B2", "random_fcc") else el[:1])
    if lattice == "fcc":
        atoms = bulk(el[0], "fcc", a=a_fcc, cubic=bool(rng.random() < 0.5))
    elif lattice == "bcc":
        atoms = bulk(el[0], "bcc", a=a_fcc / 2 ** (1 / 3), cubic=bool(rng.random() < 0.5))
    elif lattice == "hcp":
        atoms = bulk(el[0], "hcp", a=a_fcc / np.sqrt(2), c=a_fcc / np.sqrt(2) * np.sqrt(8 / 3))
    elif lattice == "L1_2":  # A3B, Cu3Au-type
        atoms = Atoms([el[1], el[0], el[0], el[0]],
                      scaled_positions=[(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                      cell=np.eye(3) * a_fcc, pbc=True)
    elif lattice == "L1_0":  # AB, CuAu-type (tetragonal)
        atoms = Atoms([el[0], el[0], el[1], el[1]],
                      scaled_positions=[(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                      cell=np.diag([a_fcc, a_fcc, a_fcc * float(rng.uniform(0.92, 1.0))]), pbc=True)
    elif lattice == "B2":  # CsCl-type
        a = a_fcc / 2 ** (1 / 3)
        atoms = Atoms([el[0], el[1]], scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5)], cell=np.eye(3) * a, pbc=True)
    elif lattice == "random_fcc":
        atoms = bulk(el[0], "fcc", a=a_fcc, cubic=True)
    else:
        raise ValueError(f"unknown lattice {lattice!r}")
    # Supercell: random repeats within max_atoms.
    reps = [1, 1, 1]
    for axis in rng.permutation(3):
        while len(atoms) * np.prod(reps) * 2 <= p.max_atoms and rng.random() < 0.6:
            reps[axis] += 1
    while len(atoms) * np.prod(reps) < p.min_atoms:
        reps[int(np.argmin(reps))] += 1
    atoms = atoms.repeat(reps)
    if lattice == "random_fcc":
        x = float(rng.uniform(0.15, 0.5))
        syms = np.where(rng.random(len(atoms)) < x, el[1], el[0])
        atoms.set_chemical_symbols(list(syms))
    eps = rng.uniform(-p.strain, p.strain, (3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + eps), scale_atoms=True)
    atoms.positions += rng.normal(0.0, p.rattle, atoms.positions.shape)
    return atoms, {"lattice": lattice, "elements": sorted(set(atoms.get_chemical_symbols())),
                   "repeat": reps}


# ---------------------------------------------------------------------------------------------------
# Si defects


def _diamond_si(repeat: int) -> Atoms:
    return bulk("Si", "diamond", a=_SI_A, cubic=True).repeat((repeat,) * 3)


_SI_A = 5.431  # Å, diamond-Si lattice constant used for every supercell


def _interstitial_site(kind: str, atoms: Atoms, repeat: int) -> tuple[np.ndarray, Optional[int]]:
    """Where an added Si atom goes for an interstitial kind (in the central conventional cell), and for
    the ⟨110⟩ split the lattice atom that shares its site (moved in place here).

    Diamond atoms sit at fcc + {0, (¼,¼,¼)}a; tetrahedral voids at fcc + {(½,½,½), (¾,¾,¾)}a, hexagonal
    voids halfway between two tetrahedral ones, at (⅝,⅝,⅝)a.
    """
    origin = np.full(3, (repeat // 2) * _SI_A)
    if kind == "interstitial_tetrahedral":
        return origin + _SI_A * np.array([0.5, 0.5, 0.5]), None
    if kind == "interstitial_hexagonal":
        return origin + _SI_A * np.array([0.625, 0.625, 0.625]), None
    if kind == "interstitial_split110":
        r0 = origin + _SI_A * np.array([0.25, 0.25, 0.25])
        host = int(np.argmin(np.linalg.norm(atoms.positions - r0, axis=1)))
        d = np.array([1.0, 1.0, 0.0]) / np.sqrt(2) * 1.2  # the pair is ~2.4 Å apart, centred on the site
        atoms.positions[host] = r0 - d
        return r0 + d, host
    raise ValueError(f"unknown interstitial kind {kind!r}")


def build_si_defect(p: SiDefectParams, rng: np.random.Generator) -> tuple[Atoms, dict[str, Any]]:
    kinds = list(p.kinds)
    if p.potential == "sw":  # SW is Si-only: no substitutions
        kinds = [k for k in kinds if "substitution" not in k]
    kind = str(rng.choice(kinds))
    atoms = _diamond_si(p.repeat)
    center = np.asarray(atoms.cell).sum(axis=0) / 2
    dist = np.linalg.norm(atoms.positions - center, axis=1)
    order = np.argsort(dist + rng.uniform(0, 0.5, len(dist)))  # near the centre, a bit random
    site = int(order[0])
    nn = [int(j) for j in np.argsort(np.linalg.norm(atoms.positions - atoms.positions[site], axis=1))[1:5]]
    dopant = str(rng.choice(p.dopants))
    info: dict[str, Any] = {"kind": kind}
    defect_center = atoms.positions[site].copy()
    if kind == "vacancy":
        del atoms[site]
    elif kind == "divacancy":
        del atoms[sorted([site, nn[0]], reverse=True)]
    elif kind.startswith("interstitial_") and kind != "interstitial_substitution":
        pos, _ = _interstitial_site(kind, atoms, p.repeat)
        atoms += Atoms("Si", positions=[pos])
        defect_center = pos
    elif kind == "substitution":
        atoms[site].symbol = dopant
        info["dopant"] = dopant
    elif kind == "vacancy_substitution":
        atoms[nn[0]].symbol = dopant
        del atoms[site]
        info["dopant"] = dopant
    elif kind == "substitution_pair":
        atoms[site].symbol = dopant
        atoms[nn[int(rng.integers(4))]].symbol = str(rng.choice(p.dopants))
        info["dopant"] = dopant
    elif kind == "interstitial_substitution":
        pos, _ = _interstitial_site("interstitial_tetrahedral", atoms, p.repeat)
        atoms[site].symbol = dopant
        atoms += Atoms(dopant if dopant == "C" else "Si", positions=[pos])
        info["dopant"] = dopant
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    atoms.positions += rng.normal(0.0, p.rattle, atoms.positions.shape)
    near = np.linalg.norm(atoms.positions - defect_center, axis=1) < 4.0
    atoms.positions[near] += rng.normal(0.0, p.defect_rattle, (int(near.sum()), 3))
    atoms.wrap()
    return atoms, info


# ---------------------------------------------------------------------------------------------------
# Driver


def generator_calculator(name: str, params, oracle: Optional[str] = None):
    """A fresh ASE calculator of generator ``name`` with ``params`` (``oracle="chgnet"``: CHGNet instead)."""
    if oracle == "chgnet":
        try:
            from chgnet.model.dynamics import CHGNetCalculator
        except ImportError as err:
            raise RuntimeError("--oracle chgnet needs the 'oracle' extra: pip install -e .[oracle]") from err
        return CHGNetCalculator(use_device="cpu")
    if oracle not in (None, "", "default"):
        raise ValueError(f"unknown oracle {oracle!r}; expected chgnet or none")
    if name == "si_defects":
        from bptt_jax.potentials import get_calculator

        return get_calculator(params.potential)
    from ase.calculators.emt import EMT

    return EMT()


_BUILDERS: dict[str, Callable] = {"si_defects": build_si_defect, "catalysts": build_catalyst,
                                  "pure_crystals": build_crystal}
_OPTIMIZER = {"si_defects": "FIRE", "catalysts": None, "pure_crystals": "FIRE"}

def generate_one(name: str, params, seed: int, index: int, out_dir: str, oracle: Optional[str] = None) -> dict:
    """Build, relax and write trajectory ``index``; returns a small record for the manifest."""
    rng = np.random.default_rng([seed, index])
    atoms, info = _BUILDERS[name](params, rng)
    # A fresh calculator per trajectory: its neighbour-list padding then depends on this structure only,
    # so results are bitwise the same whatever ran before in this worker (compiled code is shared).
    atoms.calc = generator_calculator(name, params, oracle)
    optimizer = _OPTIMIZER[name] or params.optimizer
    frames = relax_and_record(atoms, params.fmax, params.max_steps, optimizer)
    traj_id = f"{name}_{index:05d}"
    fixed = np.zeros(len(atoms), bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = True
    for f in frames:
        f.info.update({"traj_id": traj_id, "generator": name, **{k: json.dumps(v) if not isinstance(v, str) else v
                                                                 for k, v in info.items()}})
        f.new_array("fixed", fixed.copy())
    path = Path(out_dir) / f"{traj_id}.extxyz"
    from ase.io import write

    # This process's own temporary name: a worker left running by a killed generation may still write it.
    with atomic_path(path) as tmp:  # a file that exists is complete
        write(tmp, frames, format="extxyz")
    fmax = float(np.max(np.linalg.norm(frames[-1].get_forces()[~fixed], axis=1))) if (~fixed).any() else 0.0
    return {"file": path.name, "frames": len(frames), "atoms": len(atoms), "converged": fmax <= params.fmax,
            **info}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("bptt-jax", "ase", "numpy", "jax", "jaxlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _params_dict(params) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(params)))


def generate(name: str, out_dir: str | os.PathLike, *, preset: str = "default", seed: int = 0,
             workers: int = 1, oracle: Optional[str] = None, progress: bool = True, force: bool = False,
             **overrides: Any) -> dict[str, Any]:
    """Generate (or reuse) a dataset; returns the manifest.

    Re-running with the same generator, parameters and seed reuses the files present and generates only
    the missing ones; a directory holding a different dataset is refused unless ``force``.
    """
    params = make_params(name, preset, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    remove_stale(out)
    previous: dict[str, dict] = {}
    # Trajectory i depends on everything but n: a larger n extends a dataset, a smaller one is a prefix.
    identity = {k: v for k, v in _params_dict(params).items() if k != "n"}
    wanted = {"generator": name, "params": identity, "seed": int(seed), "oracle": oracle or "default"}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError as err:
            reason = str(err).splitlines()[0]
            raise ValueError(f"{manifest_path}: unreadable ({reason}); remove it or the directory") from None
        same = all(old.get(k) == v for k, v in wanted.items())
        if same:
            previous = {r["file"]: r for r in old.get("trajectories", [])}
        if (same and old.get("complete") and old.get("n") == params.n
                and all((out / r["file"]).exists() for r in old["trajectories"])):
            return old
        if not same:
            if not force:
                diff = [k for k, v in wanted.items() if old.get(k) != v]
                raise ValueError(f"{out} holds a different dataset ({', '.join(diff)} "
                                 f"{'differs' if len(diff) == 1 else 'differ'}); "
                                 f"use another --out or --force")
            for stale in out.glob(f"{name}_*.extxyz"):
                stale.unlink()
    manifest = {**wanted, "n": params.n, "complete": False, "versions": _versions(), "trajectories": []}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1))

    records: dict[int, dict] = {}
    todo = []
    for i in range(params.n):
        if (out / f"{name}_{i:05d}.extxyz").exists():
            records[i] = None  # done earlier; summarised below from the file
        else:
            todo.append(i)
    t0 = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(total=params.n, initial=params.n - len(todo), desc=f"generate {name}", unit="traj",
               disable=not progress)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(generate_one, name, params, seed, i, str(out), oracle): i for i in todo}
            from concurrent.futures import as_completed

            for fut in as_completed(futures):
                records[futures[fut]] = fut.result()
                bar.update()
    else:
        for i in todo:
            records[i] = generate_one(name, params, seed, i, str(out), oracle)
            bar.update()
    bar.close()
    for i, rec in list(records.items()):
        if rec is None and f"{name}_{i:05d}.extxyz" in previous:
            records[i] = previous[f"{name}_{i:05d}.extxyz"]
        elif rec is None:
            from ase.io import iread

            path = out / f"{name}_{i:05d}.extxyz"
            n_frames, n_atoms = 0, 0
            for atoms in iread(path, index=":"):
                n_frames, n_atoms = n_frames + 1, len(atoms)
            records[i] = {"file": path.name, "frames": n_frames, "atoms": n_atoms}
    trajs = [records[i] for i in range(params.n)]
    frames = [r["frames"] for r in trajs]
    manifest.update({
        "complete": True,
        "counts": {"trajectories": len(trajs), "frames": int(sum(frames)),
                   "frames_min": int(min(frames)), "frames_max": int(max(frames)),
                   "atoms_min": int(min(r["atoms"] for r in trajs)),
                   "atoms_max": int(max(r["atoms"] for r in trajs)),
                   "not_converged": int(sum(1 for r in trajs if r.get("converged") is False))},
        "wall_s": round(time.time() - t0, 2),
        "trajectories": trajs,
    })
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
    return manifest
