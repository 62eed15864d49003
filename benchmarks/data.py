"""Benchmark structures: rattled diamond-Si supercells (numpy only: no JAX or torch import, so a
benchmark process pays only for the framework it measures)."""

from __future__ import annotations

import numpy as np

SI_A = 5.431  # Å, diamond-Si lattice constant


def si_cell(n_atoms: int):
    """The cubic diamond-Si supercell with ``n_atoms`` = 8·k³ atoms (8, 64, 216, 512, ...) as ``ase.Atoms``."""
    from ase.build import bulk

    k = round((n_atoms / 8) ** (1 / 3))
    if 8 * k ** 3 != n_atoms:
        raise ValueError(f"n_atoms={n_atoms} is not 8·k³ (a cubic diamond supercell): use 8, 64, 216, 512, ...")
    return bulk("Si", "diamond", a=SI_A, cubic=True).repeat((k, k, k))


def si_structures(n_structures: int, n_atoms: int, sigma: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """``n_structures`` rattled copies (Gaussian, ``sigma`` Å) of the ``n_atoms`` diamond-Si supercell.

    Returns numpy arrays (float64 positions in Å): ``positions`` (S, N, 3), ``target`` (S, N, 3) (the
    unrattled lattice), ``numbers`` (S, N), ``masses`` (S, N) amu, ``cell`` (S, 3, 3), ``pbc`` (S, 3),
    ``fixed`` (S, N) (all False).
    """
    atoms = si_cell(n_atoms)
    rng = np.random.default_rng(seed)
    ideal = atoms.get_positions()
    pos = ideal[None] + rng.normal(0.0, sigma, (n_structures,) + ideal.shape)
    tile = lambda a: np.repeat(np.asarray(a)[None], n_structures, axis=0)  # noqa: E731
    return {"positions": pos, "target": tile(ideal), "numbers": tile(atoms.get_atomic_numbers()).astype(np.int32),
            "masses": tile(atoms.get_masses()), "cell": tile(np.asarray(atoms.get_cell())),
            "pbc": tile(atoms.get_pbc()), "fixed": np.zeros((n_structures, n_atoms), bool)}


def si_atoms_list(n_structures: int, n_atoms: int, sigma: float = 0.1, seed: int = 0):
    """The same structures as :func:`si_structures`, as a list of ``ase.Atoms``."""
    atoms = si_cell(n_atoms)
    data = si_structures(n_structures, n_atoms, sigma, seed)
    out = []
    for i in range(n_structures):
        a = atoms.copy()
        a.set_positions(data["positions"][i])
        out.append(a)
    return out
