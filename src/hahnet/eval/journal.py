"""Attack rows saved as they finish, and the batches of the row in progress as each
finishes, so that a long evaluation that is stopped resumes where it stopped instead of
starting again (training resumes from its last epoch the same way). A row is reused only
when everything that made it is the same: the model's weights, the attacked images, the
settings, the norm and the row's own inputs (each folded into a digest); a batch, only
within the same row and the same attack call (its images, stages, budget and batch
index); anything else is computed afresh."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Collection, TypeVar

from torch import nn

from hahnet.config import same_json
from hahnet.io import write_text  # atomic: a row cut off mid-write is never read back
from hahnet.eval.base import tensor_digest
from hahnet.eval.results import (AttackResult, EpsSweep, attack_from_dict, jsonable,
                                 sweep_from_dict)

FORMAT = "hahnet-journal-1"
T = TypeVar("T", AttackResult, EpsSweep)
_DECODE: dict[str, Callable[[dict[str, Any]], Any]] = {"attack": attack_from_dict,
                                                       "sweep": sweep_from_dict,
                                                       "batch": dict}


def model_digest(model: nn.Module) -> str:
    """A hex digest of every parameter and buffer (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_digest(value).encode())
    return h.hexdigest()


class BatchJournal:
    """The finished batches of one attack row (a BatchStore: ``worst_case`` saves each
    batch's outcome here), kept in ``directory`` until the row itself is saved. Every
    process writes its own batches (under torchrun each attacks its own), so a row
    stopped midway loses at most the batches in flight."""

    def __init__(self, directory: Path, key: dict[str, Any]) -> None:
        self.directory = directory
        self.key = key

    def recall(self, call: dict[str, Any], index: int,
               compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Batch ``index`` of the attack ``call`` (what identifies it within the row), a
        JSON object, and True if it was saved before; else computed, saved and False."""
        key = json.loads(json.dumps(jsonable({**self.key, "call": call, "batch": index})))
        path = self.directory / f"{_digest(key)}.json"
        saved = _read(path, key)
        if saved is not None:
            return saved, True
        value = compute()
        _write(path, "batch", key, value)
        return value, False

    def clear(self) -> None:
        """Remove the saved batches (their row is saved)."""
        shutil.rmtree(self.directory, ignore_errors=True)


class Journal:
    """Rows of one evaluation kept in ``directory`` (one JSON file each; the batches of
    unfinished rows under ``batches/``). ``Journal(None)`` keeps nothing; ``write=False``
    reads saved rows but adds none (the other processes under torchrun: rank 0 writes).
    ``on_resume(label)`` hears of each row reused ("APGD Linf")."""

    def __init__(self, directory: str | Path | None, write: bool = True,
                 on_resume: Callable[[str], None] | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self.write = write
        self.on_resume = on_resume

    def recall(self, row: str, key: dict[str, Any],
               compute: Callable[[BatchJournal | None], T]) -> T:
        """The saved ``row`` made with ``key`` if there is one, else ``compute(batches)``,
        saved; ``batches`` keeps the row's finished batches meanwhile (None: no journal)."""
        if self.directory is None:
            return compute(None)
        key = json.loads(json.dumps(jsonable({**key, "row": row})))
        digest = _digest(key)
        path = self.directory / f"{digest}.json"
        saved = _read(path, key)
        if saved is not None:
            if self.on_resume is not None:
                self.on_resume(" ".join(str(v) for v in (row, key.get("norm")) if v))
            return saved
        batches = BatchJournal(self.directory / "batches" / digest, key)
        value = compute(batches)
        if self.write:
            _write(path, "attack" if isinstance(value, AttackResult) else "sweep", key,
                   jsonable(asdict(value)))
            batches.clear()
        return value

    def clear(self) -> None:
        """Remove the saved rows (the evaluation finished and wrote its report)."""
        if self.directory is None or not self.write or not self.directory.is_dir():
            return
        for path in self.directory.glob("*.json"):
            path.unlink(missing_ok=True)
        for path in self.directory.glob("*.tmp"):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.directory / "batches", ignore_errors=True)
        try:
            self.directory.rmdir()
        except OSError:  # something else lives there: leave it
            pass

    def keep_only(self, rows: Collection[str]) -> None:
        """Remove the saved rows but those named in ``rows`` (what another evaluation sharing
        this folder can reuse); batches of unfinished rows stay (their row may be running)."""
        if self.directory is None or not self.write or not self.directory.is_dir():
            return
        for path in self.directory.glob("*.json"):
            try:
                row = json.loads(path.read_text(encoding="utf-8"))["key"]["row"]
            except (OSError, ValueError, KeyError, TypeError):
                row = None
            if row not in rows:
                path.unlink(missing_ok=True)

    def saved_rows(self, owns: Owns | None = None) -> int:
        """How many rows are saved (of any evaluation, or of those ``owns`` accepts)."""
        return sum(1 for _, _, batch in self._saved(owns) if not batch)

    def saved_batches(self, owns: Owns | None = None) -> int:
        """How many batches of unfinished rows are saved (``owns``: as ``saved_rows``)."""
        return sum(1 for _, _, batch in self._saved(owns) if batch)

    def saved_summary(self, owns: Owns | None = None) -> str:
        """What is saved, in words ("2 attack row(s) + 3 batch(es)"); "" when nothing.
        ``owns(key)`` picks one evaluation's rows out of a folder that several share."""
        saved = self._saved(owns)
        batches = sum(1 for _, _, batch in saved if batch)
        rows = len(saved) - batches
        parts = ([f"{rows} attack row(s)"] if rows else []) + (
            [f"{batches} batch(es) of an unfinished row"] if batches else [])
        return " + ".join(parts)

    def saved_seconds(self, owns: Owns | None = None) -> dict[str, float]:
        """The compute time the saved rows and batches took (what resuming saves), per
        norm (rows without one under ""); ``owns``: as ``saved_summary``."""
        total: dict[str, float] = {}
        for key, seconds, _ in self._saved(owns):
            norm = str(key.get("norm") or "")
            total[norm] = total.get(norm, 0.0) + seconds
        return total

    def _saved(self, owns: Owns | None) -> list[tuple[dict[str, Any], float, bool]]:
        """(key, seconds, is a batch) of every readable saved row and batch that ``owns``
        accepts (None: all), each file read once."""
        if self.directory is None or not self.directory.is_dir():
            return []
        out = []
        for batch, pattern in ((False, "*.json"), (True, "batches/*/*.json")):
            for path in self.directory.glob(pattern):
                try:
                    document = json.loads(path.read_text(encoding="utf-8"))
                    key, value = dict(document["key"]), document["value"]
                    if owns is None or owns(key):
                        out.append((key, float(value.get("seconds", 0.0)), batch))
                except (OSError, ValueError, KeyError, TypeError):
                    pass
        return out


Owns = Callable[[dict[str, Any]], bool]  # owns(key): whether a saved row is one's own


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _write(path: Path, kind: str, key: dict[str, Any], value: Any) -> None:
    write_text(path, json.dumps({"format": FORMAT, "kind": kind, "key": key, "value": value},
                                allow_nan=False))


def _read(path: Path, key: dict[str, Any]) -> Any:
    """The row (or batch) saved at ``path`` for ``key``; None when absent, unreadable or
    another key's."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != FORMAT or not same_json(document.get("key"), key):
            return None
        return _DECODE[document["kind"]](document["value"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


Recall = Callable[..., Any]  # recall(row, compute, **extra): a row, saved or computed


def recaller(journal: Journal | None, key: dict[str, Any]) -> Recall:
    """``recall(row, compute, **extra)`` for the rows of one model, image set and settings
    (``key``); ``extra`` adds a row's own inputs (e.g. its transfer sources) to the key;
    ``compute(batches)`` gets the row's BatchJournal. Without a journal it simply computes
    (``batches`` None)."""
    def recall(row: str, compute: Callable[[BatchJournal | None], T], **extra: Any) -> T:
        if journal is None:
            return compute(None)
        return journal.recall(row, {**key, **extra}, compute)
    return recall
