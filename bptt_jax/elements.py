"""Elemental descriptors: a fixed, normalised feature vector per atomic number.

Columns: Z/100, period/7, group/18, f-block flag, covalent radius/2 Å, atomic mass/250 amu,
valence electrons/8 (s and p shells outside the last noble gas; d/f electrons excluded).
Row 0 (padding) is all zeros.
"""

from __future__ import annotations

import numpy as np
from ase.data import atomic_masses, covalent_radii

N_ELEMENTS = 119  # rows 0..118
_PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)
DESCRIPTOR_NAMES = ("Z", "period", "group", "f_block", "covalent_radius", "mass", "valence")


def period_group(z: int) -> tuple[int, int, bool]:
    """Period, IUPAC group (3 for lanthanides/actinides) and f-block flag of element ``z`` (1..118)."""
    if not 1 <= z <= 118:
        raise ValueError(f"atomic number {z} out of range 1..118")
    period = next(p for p, end in enumerate(_PERIOD_ENDS, start=1) if z <= end)
    start = 0 if period == 1 else _PERIOD_ENDS[period - 2]
    pos = z - start  # 1-based position in the period
    if period == 1:
        return period, (1 if pos == 1 else 18), False
    if period in (2, 3):
        return period, (pos if pos <= 2 else pos + 10), False
    if period in (4, 5):
        return period, pos, False
    # Periods 6 and 7: s (2), f (14, counted as group 3), then d and p groups 4..18.
    if pos <= 2:
        return period, pos, False
    if pos <= 16:
        return period, 3, True
    return period, pos - 14, False


def _valence(period: int, group: int, f_block: bool) -> int:
    if f_block:
        return 2
    if group <= 2:
        return group
    if group >= 13:
        return group - 10 if not (period == 1) else 2
    return 2  # transition metals: the outer s pair


def descriptor_table() -> np.ndarray:
    """(119, 7) float table of normalised descriptors, row = atomic number."""
    table = np.zeros((N_ELEMENTS, len(DESCRIPTOR_NAMES)), np.float64)
    for z in range(1, N_ELEMENTS):
        period, group, f_block = period_group(z)
        table[z] = (z / 100.0, period / 7.0, group / 18.0, float(f_block), covalent_radii[z] / 2.0,
                    atomic_masses[z] / 250.0, _valence(period, group, f_block) / 8.0)
    return table
