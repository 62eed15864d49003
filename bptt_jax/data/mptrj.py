"""CHGNet's MPtrj JSON (``MPtrj_2022.9_full.json``, 12 GB), streamed one mp-id at a time.

Layout::

    {mp_id: {frame_id: {"structure": <pymatgen Structure.as_dict()>,
                        "uncorrected_total_energy": eV, "corrected_total_energy": eV,
                        "force": [[fx, fy, fz], ...] (eV/Å), "stress": ..., "magmom": ..., ...}}}

``frame_id`` is ``"{task_id}-{calc_id}-{ionic_step}"``; task ids contain dashes themselves ("mp-1234",
"mvc-123"), so the id is split from the right. The frames of one mp-id are grouped into one trajectory
per ``(task_id, calc_id)`` (in order of first appearance), ordered by ionic step; the trajectory id is
``"{mp_id}/{task_id}-{calc_id}"``. Positions are the sites' Cartesian ``xyz`` (Å; fractional ``abc``
times the lattice when ``xyz`` is missing), elements the first species' element with any oxidation
state stripped ("Fe2+" → Fe), the cell is each frame's own lattice (MPtrj relaxations change the cell),
the energy is ``uncorrected_total_energy`` (eV). No pymatgen is needed.

Memory is bounded by one mp-id's frames, not by the file: ``ijson.kvitems(f, "")`` builds one top-level
value at a time (in C with the yajl2_c backend; about 25 MB/s, so the full file takes minutes). A
truncated or malformed file stops the reading of that file with an error naming the mp-id and frame
that were being read and the last complete mp-id; every trajectory complete in the file before that
point has been returned. Bare ``NaN`` / ``Infinity`` tokens (Python's ``json.dump`` writes them; strict
JSON does not allow them) are read as non-finite numbers, and numbers outside yajl's int64 / double range as
floats (``1e400``: inf), so they cost only their own trajectory.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from bptt_jax.data.readers import Frame, MissingDependency, assemble, data_error, element_number
from bptt_jax.data.trajectory import DataError, Trajectory

# ijson's read size (bytes); tests lower it to exercise the truncation diagnostics across many reads.
BUF_SIZE = 64 * 1024

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]]')

# Python's json.dump writes NaN / Infinity / -Infinity, which strict JSON (and yajl) rejects; one such
# token would end the reading of the whole file. Outside strings they become the strings "NaN", ...,
# which float() and numpy turn back into nan/inf, so only that frame fails the finiteness checks.
_NON_STANDARD = re.compile(rb'(?<![A-Za-z0-9_"])-?(?:Infinity|NaN)(?![A-Za-z0-9_"])')
_TRAILING_WORD = re.compile(rb'(?:[,:\[]\s*)?[-+.A-Za-z0-9_"]{0,64}$')
# yajl also stops at a number outside int64 / double ("integer overflow", "numeric (floating point) overflow").
# Then read_mptrj reads the file again with every such number that follows a JSON delimiter made a string too
# (float() reads it: a huge int as its float, 1e400 as inf, which costs its trajectory only). A read never ends
# inside a number of up to 64 characters, nor between it and the delimiter before it (_TRAILING_WORD holds both
# back for the next read). _may_hold_big_number is the cheap test run on every read of that second pass.
_NUMBER = re.compile(rb"([,:\[]\s*)(-?(?:\d{19,}(?:\.\d*)?(?:[eE][-+]?\d+)?|\d+(?:\.\d*)?[eE][+]?\d{3,}))"
                     rb"(?=\s*(?:[,\]}]|\Z))")
# Digits -> "0", "." -> ".", e/E -> "e", "+" dropped, every other byte -> " " (bytes.translate runs in C).
_SHAPE = bytes(48 if 48 <= b <= 57 else b if b == 46 else 101 if b in b"eE" else 32 for b in range(256))
_EXPONENT = re.compile(rb"e000")  # a regex: its scan for "e" is much faster than `in` on zero-heavy text


def _may_hold_big_number(data: bytes) -> bool:
    """Whether ``data`` may hold a number outside yajl's range: an integer part of 19+ digits (not digits after a
    decimal point) or an exponent of 3+ digits (a regex on the text itself is 30x slower on digit-heavy text)."""
    shape = data.translate(_SHAPE, b"+")
    return b" " + b"0" * 19 in shape or _EXPONENT.search(shape) is not None


def _quote_out_of_range(match: re.Match) -> bytes:
    token = match.group(2)
    integer_part = re.split(rb"[.eE]", token.lstrip(b"-"), maxsplit=1)[0]
    if len(integer_part) < 19 and math.isfinite(float(token)):
        return match.group(0)  # in range: yajl reads it
    return match.group(1) + b'"' + token + b'"'


def _ijson():
    try:
        import ijson
    except ImportError:
        raise MissingDependency("reading MPtrj JSON needs ijson: pip install ijson") from None
    return ijson


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


class _RecordingReader:
    """A binary file wrapper that keeps the raw bytes read since about the previous top-level record.

    ``ijson.kvitems`` hands out a top-level record only once it has parsed the *next* key, so when the
    file ends early the last complete record (or more) may still sit unreported inside the parser, and
    the error alone does not tell where reading stopped. The kept bytes answer both without a second
    pass over a 12 GB file (:meth:`scan`). When record *k* is handed out, the latest chunk holds the key
    of record *k + 1*; keeping one chunk more than that on each hand-out keeps that key whole, and bounds
    memory by about two records' raw text.
    """

    def __init__(self, raw, big_numbers: bool = False):
        self.raw, self.big_numbers = raw, big_numbers
        self.chunks: list[bytes] = []
        self.mark = 0
        self._held = b""

    def read(self, n: int = -1) -> bytes:
        buf, self._held = self._held, b""
        while True:
            more = self.raw.read(n)
            buf += more
            if not more:  # end of file: hand out everything
                break
            # A word at the end of the chunk may be a NaN / Infinity or a number cut in two (with the delimiter
            # before it, which _NUMBER needs), or the start of a string holding such a word: finish it with the
            # next chunk.
            tail = _TRAILING_WORD.search(buf, max(len(buf) - 80, 0))
            if tail is None or tail.start() == len(buf):
                break
            if tail.start() > 0:
                buf, self._held = buf[: tail.start()], buf[tail.start():]
                break
        # The substring tests run in C; the regex only when a candidate is present (rarely).
        data = _NON_STANDARD.sub(rb'"\g<0>"', buf) if b"NaN" in buf or b"Infinity" in buf else buf
        if self.big_numbers and _may_hold_big_number(data):
            data = _NUMBER.sub(_quote_out_of_range, data)
        if data:
            self.chunks.append(data)
        return data

    def record_done(self) -> None:
        """A top-level record was handed out: forget what came well before the previous hand-out."""
        drop = max(self.mark - 1, 0)
        del self.chunks[:drop]
        self.mark = max(len(self.chunks) - 1, 0)

    def scan(self, last_reported: Optional[str]) -> tuple[list[tuple[str, str]], Optional[str], Optional[str]]:
        """What follows the last reported record in the kept bytes, for when parsing failed.

        Returns:
          (complete, mp_id, frame_id): the top-level records after ``last_reported`` that are complete in
          the file, as (key, raw JSON text of the value); and the mp-id and frame id being read when the
          bytes ran out or went bad (None when no record was open, or when the position is unknown).
        """
        text = b"".join(self.chunks).decode("utf-8", "replace")
        if last_reported is None:
            pos, depth = 0, 0
        else:
            # The reported record's key anchors the scan at a known depth; as a key it is followed by
            # ':' and '{' (the same id as a value, "mp_id": "...", is not).
            anchor = re.search(re.escape(json.dumps(last_reported)) + r"\s*:\s*\{", text)
            if anchor is None:
                return [], None, None
            pos, depth = anchor.end(), 2
        complete: list[tuple[str, str]] = []
        pending = current = frame_id = None
        start = 0
        for tok in _TOKEN.finditer(text, pos):
            t = tok.group()
            if t in "{[":
                depth += 1
                if depth == 2 and pending is not None:
                    current, start, pending, frame_id = pending, tok.start(), None, None
            elif t in "}]":
                depth -= 1
                if depth == 1 and current is not None:
                    complete.append((current, text[start:tok.end()]))
                    current = frame_id = None
            elif depth in (1, 2) and text[tok.end():tok.end() + 64].lstrip().startswith(":"):
                key = json.loads(t)
                if depth == 1:
                    pending, frame_id = key, None
                elif current is not None:
                    frame_id = key
        return complete, current or pending, frame_id


def looks_like_mptrj(path: Path, max_events: int = 20000) -> bool:
    """Whether a JSON file looks like MPtrj (``{id: {id: {"structure": ...}}}``), from its first events.

    A file that does not parse is claimed (True) so that the reader reports it instead of the directory
    walk ignoring it silently; only a clean parse of something else (e.g. a ``manifest.json``) is False.
    """
    ijson = _ijson()
    depth = 0
    try:
        with _open(Path(path)) as f:
            if not f.read(1):
                return True
            f.seek(0)
            for i, (_, event, value) in enumerate(ijson.parse(f)):
                if event in ("start_map", "start_array"):
                    depth += 1
                elif event in ("end_map", "end_array"):
                    depth -= 1
                elif event == "map_key" and depth == 3 and value == "structure":
                    return True
                if depth == 0 and i > 0 or i >= max_events:
                    return False
                if depth == 1 and event not in ("start_map", "map_key"):
                    return False  # a scalar or list directly under the top level
    except (ijson.JSONError, OSError, EOFError, UnicodeDecodeError):
        return True
    return False


def _frame(path: Path, record: str, frame_id: str, d) -> Frame:
    """One MPtrj frame dict as a :class:`Frame` (positions Å, energy eV, forces eV/Å)."""
    try:
        structure = d["structure"]
        lattice = structure["lattice"]
        cell = np.asarray(lattice["matrix"], np.float64).reshape(3, 3)
        pbc = np.asarray(lattice.get("pbc", (True, True, True)), bool)
        sites = structure["sites"]
        numbers, xyz = [], []
        for i, site in enumerate(sites):
            species = site["species"]
            if len(species) != 1 or abs(float(species[0].get("occu", 1.0)) - 1.0) > 1e-6:
                raise data_error(path, record, f"site {i} is disordered (partial occupancy)", "malformed")
            element = species[0]["element"]
            try:
                numbers.append(element_number(element))
            except KeyError:
                raise data_error(path, record, f"unknown element {element!r} at site {i}",
                                 "unknown_element") from None
            xyz.append(site["xyz"] if "xyz" in site else np.asarray(site["abc"], np.float64) @ cell)
        positions = np.asarray(xyz, np.float64).reshape(len(numbers), 3)
        forces = d.get("force")
        forces = None if forces is None else np.asarray(forces, np.float64).reshape(len(numbers), 3)
        energy = d.get("uncorrected_total_energy")
        energy = None if energy is None else float(energy)
    except DataError:
        raise
    except KeyError as exc:
        raise data_error(path, record, f"missing field {exc}", "malformed") from None
    except (TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        raise data_error(path, record, f"malformed frame ({type(exc).__name__}: {exc})", "malformed") from None
    return Frame(positions, np.asarray(numbers, np.int32), cell, pbc, energy, forces, label=frame_id)


def _trajectories(path: Path, mp_id: str, frames) -> Iterator[Trajectory | DataError]:
    """The (task_id, calc_id) trajectories of one mp-id; bad ones are yielded as DataError values."""
    if not isinstance(frames, dict):
        yield data_error(path, mp_id, f"expected an object of frames, got {type(frames).__name__}", "malformed")
        return
    groups: dict[tuple[str, str], list[tuple[int, str, dict]]] = {}
    for frame_id, frame in frames.items():
        parts = str(frame_id).rsplit("-", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
            yield data_error(path, f"{mp_id}/{frame_id}", "frame id is not '{task_id}-{calc_id}-{ionic_step}'",
                             "malformed")
            continue
        groups.setdefault((parts[0], parts[1]), []).append((int(parts[2]), frame_id, frame))
    for (task_id, calc_id), items in groups.items():
        items.sort(key=lambda t: t[0])
        record = f"{mp_id}/{task_id}-{calc_id}"
        try:
            parsed = [_frame(path, f"{mp_id}/{fid}", fid, fr) for _, fid, fr in items]
            yield assemble(path, record, parsed, traj_id=record)
        except DataError as err:
            yield err
        except Exception as exc:  # noqa: BLE001 (a damaged record costs that record, not the rest of the file)
            yield data_error(path, record, f"malformed record ({type(exc).__name__}: {exc})", "malformed")


class _Pass:
    """How far one parse of the file got: records handed out, the last mp-id, and how it ended."""

    def __init__(self):
        self.n_records, self.last = 0, None
        self.failure: Optional[DataError] = None
        self.out_of_range = False  # yajl stopped at a number outside int64 / double


def _parse(path: Path, ijson, state: _Pass, big_numbers: bool, skip: int) -> Iterator[Trajectory | DataError]:
    """One pass over the file, yielding the trajectories of the records after the first ``skip``."""
    with _open(path) as raw:
        reader = _RecordingReader(raw, big_numbers)
        try:
            if not raw.read(1):
                raise data_error(path, None, "empty file", "empty")
            raw.seek(0)
            records = ijson.kvitems(reader, "", use_float=True, buf_size=BUF_SIZE)
            while True:
                try:
                    mp_id, frames = next(records)
                except StopIteration:
                    break
                reader.record_done()
                state.n_records += 1
                state.last = mp_id
                if state.n_records > skip:
                    yield from _trajectories(path, mp_id, frames)
        except ijson.JSONError as exc:
            if not big_numbers and "overflow" in str(exc):
                state.out_of_range = True
                return
            truncated = "premature EOF" in str(exc)
            complete, mp_id, frame_id = reader.scan(state.last)
            # Records the parser finished but had not handed out yet are complete in the file: keep them.
            for key, value in complete:
                try:
                    frames = json.loads(value)
                except ValueError:
                    break
                state.n_records += 1
                state.last = key
                if state.n_records > skip:
                    yield from _trajectories(path, key, frames)
            what = ("truncated JSON (premature end of file)" if truncated
                    else f"invalid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            last = state.last
            if mp_id is not None:
                where = f"while reading mp_id {mp_id!r}" + (f", frame {frame_id!r}" if frame_id else "")
                record = f"{mp_id}/{frame_id}" if frame_id else mp_id
            else:
                where = "after the last complete record" if last is not None else "before the first record"
                record = None
            where += f"; last complete mp_id {last!r}" if last is not None else "; no complete mp_id"
            state.failure = data_error(path, record, f"{what} {where}", "truncated" if truncated else "malformed")
        except (EOFError, gzip.BadGzipFile) as exc:
            state.failure = data_error(path, None, f"corrupt compressed file after mp_id {state.last!r} ({exc})",
                                       "truncated")


def read_mptrj(path: Path) -> Iterator[Trajectory | DataError]:
    """Stream the trajectories of an MPtrj JSON (``.json`` or ``.json.gz``) file.

    Yields:
      :class:`Trajectory` records, and bad trajectories as :class:`DataError` values (the caller skips
      or raises them).

    Raises:
      DataError: the file is empty (``empty``), truncated (``truncated``) or not valid JSON
        (``malformed``); trajectories before the failure have been yielded already.
    """
    ijson = _ijson()
    path = Path(path)
    state = _Pass()
    yield from _parse(path, ijson, state, big_numbers=False, skip=0)
    if state.out_of_range:
        # Read again with such numbers as strings, from the record after those handed out: the rewrite costs
        # about a quarter of the parse's time, so only a file that needs it pays for it.
        done, state = state.n_records, _Pass()
        yield from _parse(path, ijson, state, big_numbers=True, skip=done)
    if state.failure is not None:
        raise state.failure
    if state.n_records == 0:
        raise data_error(path, None, "no MPtrj records (expected {mp_id: {frame_id: frame}})", "empty")
