"""The champion/challenger counts folded over the predictions and feedback logs, one record at a time, and kept.

The predictions log grows for as long as a box serves (~1 GB a day of camera time), and its rollout page, ``/decide``
and the fleet's evidence each ask for the comparison. A `LogFold` reads each log once: every later `LogFold.update`
reads only the lines appended since, and its `LogFold.report` equals a fold of both logs from their first line
(`deploy.edge.rollout.stats.compare`, which is a fresh fold read once).

What a fold keeps: per arm its counts, bounded latencies (`Latencies`) and its labelled answers (an operator
labels a sample); the shadow pairs still waiting for their other answer (`_Pairs`); every label; and the answers of
the last `LABEL_WINDOW` unlabelled frames, which a later label joins. Each update reads the new labels first, then
the new predictions (a label is written after its frame's answer, so a label and its answer read in one update
always join). A label for a frame whose answers the fold no longer holds all of cannot be joined: one that left
the window before the update, one answered again after it left (the last `EVICTED_KEPT` to leave are remembered
by hash), one with more than `PER_FRAME` answers. The fold then reads both logs again from the first line (what
every report cost before) and goes on from there; so does a log that was replaced, truncated or rewritten (its
inode, length, first and last-read 4 kB). Records are joined on (camera, server frame id).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.edge.rollout.latency import Latencies
from deploy.edge.rollout.logs import JsonlReader
from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION
from spt_core.portable.metrics import wilson_interval
from spt_core.portable.operating_point import OperatingPoint, flat_rates

PAIR_WINDOW = 16_384  # frames waiting for their other arm's answer (`_Pairs`): 400 s of 4 cameras at 10 frames/s
LABEL_WINDOW = 16_384  # unlabelled frames whose answers a later label still joins (~0.6 kB each: ~9 MB)
EVICTED_KEPT = 65_536  # frames that left the window, remembered (hashes, two generations) so that one answered again
PER_FRAME = 8  # answers held per frame (a box writes at most 3: served, shadow, fallback error)
PARTIAL = ("partial",)  # heads a frame's held answers when some of them were not held: its label re-reads

Key = tuple[str, str]  # (camera_id, frame_id)
Answer = tuple[Any, Any]  # the served (class, decision): what `OperatingPoint.decision_of` reads


def mcnemar(b: int, c: int) -> dict[str, Any]:
    """Paired test on discordant frames: b = only the champion right, c = only the challenger right.

    Exact two-sided binomial test (b ~ Bin(b + c, 1/2)) up to 1000 discordant pairs, chi-square with continuity
    correction above (the exact sum's big integers get slow, and the two agree there).
    """
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "p_value": 1.0, "method": "exact"}
    if n <= 1000:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
        return {"b": b, "c": c, "p_value": min(1.0, 2 * tail / 2**n), "method": "exact"}
    stat = (abs(b - c) - 1) ** 2 / n
    return {"b": b, "c": c, "statistic": stat, "p_value": math.erfc(math.sqrt(stat / 2)), "method": "chi2-cc"}


def _key(record: dict[str, Any]) -> Key:
    return sys.intern(str(record.get("camera_id"))), str(record.get("frame_id"))


def _defect_stats(labelled: list[tuple[Answer, str]], op: OperatingPoint) -> dict[str, Any]:
    """Defect recall, escape rate and overkill of the served decisions (`OperatingPoint.decision_of`); without a
    good class every rate is None and every count 0."""
    labels = [t for _, t in labelled]
    decisions = [op.decision_of({"class": c, "decision": d}) for (c, d), _ in labelled]
    flat = flat_rates(op.rates(labels, decisions) if op.ok_class is not None else op.rates([], [], []))
    caught = flat["defects"] - flat["escaped"]  # a defect rejected by the threshold leaves the line
    recall = {"defect_recall": caught / flat["defects"] if flat["defects"] else None,
              "defect_recall_ci95": wilson_interval(caught, flat["defects"])}  # fmt: skip
    return {"defects": flat.pop("defects"), **recall, **flat}


@dataclass
class _Arm:
    """One arm's running counts: no record is kept, only each labelled answer (with its frame, so that the last
    label of the frame counts) and the latencies (`Latencies`, bounded)."""

    versions: set[str] = field(default_factory=set)
    requests: int = 0
    errors: int = 0
    served: int = 0
    latencies: Latencies = field(default_factory=Latencies)
    labelled: list[tuple[Key, Answer]] = field(default_factory=list)

    def add(self, r: dict[str, Any]) -> None:
        self.requests += 1
        self.versions.add(str(r.get("model_version")))
        if r.get("error"):
            self.errors += 1
            return
        self.served += bool(r.get("served", True))
        if "latency_ms" in r:
            self.latencies.add(float(r["latency_ms"]))

    def stats(self, op: OperatingPoint, labels: dict[Key, str]) -> dict[str, Any]:
        labelled = [(answer, labels[key]) for key, answer in self.labelled]
        correct = sum(c == t for (c, _), t in labelled)
        per_class: dict[str, list[int]] = {}
        for (c, _), t in labelled:
            per_class.setdefault(t, [0, 0])[0] += c == t
            per_class[t][1] += 1
        good = self.requests - self.errors
        return {
            "versions": sorted(self.versions),
            "requests": self.requests,
            "served": self.served,
            "shadow": good - self.served,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "labelled": len(labelled),
            "correct": correct,
            "accuracy": correct / len(labelled) if labelled else None,
            "accuracy_ci95": wilson_interval(correct, len(labelled)),
            **_defect_stats(labelled, op),
            "recall_per_class": {k: v[0] / v[1] for k, v in sorted(per_class.items())},
            "latency_ms": self.latencies.quantiles(),
        }


@dataclass
class _Pairs:
    """Frames both arms answered (the champion's served answer, the challenger's shadow one), counted when the
    second answer comes. A frame waits for it among the last `PAIR_WINDOW` waiting frames (a shadow answer follows
    its frame within seconds; a canary's champion-only frames never complete), so memory stays bounded however long
    the log. Server-issued frame ids are unique on a box; a frame id seen again after its pair was counted (a
    replayed log) starts a new pair."""

    waiting: OrderedDict = field(default_factory=OrderedDict)
    frames: int = 0
    agree: int = 0
    labelled: list[tuple[Key, Any, Any]] = field(default_factory=list)  # (frame, champion's class, challenger's)

    def add(self, key: Key, role: str, cls: Any) -> tuple[Any, Any] | None:
        """The frame's (champion, challenger) classes when this answer completes its pair, else None."""
        answers = self.waiting.setdefault(key, {})
        answers[role] = cls  # a repeated answer before the other arm's: the last one counts
        if len(answers) == 2:
            v = self.waiting.pop(key)
            self.frames += 1
            self.agree += v[CHAMPION] == v[CHALLENGER]
            return v[CHAMPION], v[CHALLENGER]
        if len(self.waiting) > PAIR_WINDOW:
            self.waiting.popitem(last=False)  # its other answer never came within the window
        return None

    def result(self, labels: dict[Key, str]) -> dict[str, Any] | None:
        if not self.frames:
            return None
        only_champion = only_challenger = 0
        for key, cp, ch in self.labelled:
            right_cp, right_ch = cp == labels[key], ch == labels[key]
            only_champion += right_cp and not right_ch
            only_challenger += right_ch and not right_cp
        out = {"frames": self.frames, "labelled": len(self.labelled), "agreement": self.agree / self.frames}
        return out | mcnemar(only_champion, only_challenger)


HEAD = 4096  # bytes of a log's start compared at each update: a log rewritten in place is read again


def _identity(path: Path) -> tuple[int, int, bytes, int] | None:
    """(device, inode, first `HEAD` bytes, size) of a log, from one open and one stat; None while it does not
    exist."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return st.st_dev, st.st_ino, f.read(HEAD), st.st_size
    except FileNotFoundError:
        return None


class LogFold:
    """The comparison of the (role, version)s in `versions` (a version of None: any) over two logs, kept between
    reports (module docstring). `whole_lines`: leave a last line without its newline (a record being written) for
    the next update; a one-off fold reads it. `window` 0: no unlabelled answer is kept (a fold read once, never
    updated, has no later label to join). Thread-safe: one update at a time."""

    def __init__(self, pred_log: Path, feedback_log: Path, versions: dict[str, str | None], *,
                 whole_lines: bool = True, window: int | None = None, read: bool = True) -> None:  # fmt: skip
        self.paths = Path(pred_log), Path(feedback_log)
        self.versions, self.whole_lines = versions, whole_lines
        self.window = LABEL_WINDOW if window is None else window
        self.lock = threading.Lock()
        self.restarts = -1  # folds started again from the first line (a late label, a replaced log)
        self.started = read
        if read:
            self._reset()

    def _reset(self) -> None:
        self.labels: dict[Key, str] = {}
        self.overall = {CHAMPION: _Arm(), CHALLENGER: _Arm()}
        self.per_camera: dict[str, dict[str, _Arm]] = {}
        self.pairs = _Pairs()
        self.unlabelled: OrderedDict[Key, list[tuple]] = OrderedDict()  # answers a later label may join
        self.forgot = self.stale = False  # the window dropped answers; a label came that may have been theirs
        self.orphans: set[Key] = set()  # this update's labels whose answer is not held (yet)
        self._arms: dict[tuple[str, str], tuple[_Arm, _Arm]] = {}  # (role, camera) -> (overall, camera) arms
        self._answers: dict[Answer, Answer] = {}  # one object per distinct answer: the window holds references
        self.evicted: list[set[int]] = [set(), set()]  # hashes of frames that left the window: newer, older
        self.readers = [JsonlReader(p, whole_lines=self.whole_lines) for p in self.paths]
        self.ids = [_identity(p) for p in self.paths]
        self.tails = [b"", b""]  # the last bytes read of each log: a log rewritten in place ends otherwise
        self.counts = {"predictions": 0, "feedback": 0, "skipped_lines": 0}
        self.restarts += 1
        self._catch_up()

    def update(self) -> LogFold:
        """Read what both logs gained since the last update; start again from the first line when that cannot be
        exact (a label for an answer the window dropped, a replaced log)."""
        with self.lock:
            if not self.started or any(self._replaced(i) for i in (0, 1)):
                self.started = True
                self._reset()
            else:
                self._catch_up()
                if self.stale:
                    self._reset()
        return self

    def _catch_up(self) -> None:
        """The new labels first: each joins the answers the fold holds, or those of the new predictions, read
        next (a label is written after its frame's answer, so its answer is in the log by then). A label that
        found neither is for a frame never answered, or one the window dropped before this update: only a fold
        from the first line can tell."""
        forgot, self.orphans = self.forgot, set()
        self._read(1)
        self._read(0)
        self.stale = forgot and bool(self.orphans)

    def _replaced(self, i: int) -> bool:
        """The log is another file than the one read, shorter than what was read, or begins or ends (where the
        last read stopped) otherwise."""
        ident, was = _identity(self.paths[i]), self.ids[i]
        self.ids[i] = ident
        if was is None or ident is None:  # it did not exist when read (nothing was), or it has gone
            return was is not None
        head = min(len(was[2]), len(ident[2]))
        return (ident[:2] != was[:2] or ident[3] < self.readers[i].offset
                or ident[2][:head] != was[2][:head] or self._tail(i) != self.tails[i])  # fmt: skip

    def _tail(self, i: int) -> bytes:
        end = self.readers[i].offset
        try:
            with open(self.paths[i], "rb") as f:
                f.seek(max(0, end - HEAD))
                return f.read(min(end, HEAD))
        except FileNotFoundError:
            return b""

    def _read(self, i: int) -> None:
        reader = self.readers[i]
        feed = self._label if i else self._prediction
        for record in reader:
            feed(record)
        self.tails[i] = self._tail(i)
        self.counts["feedback" if i else "predictions"] += reader.records
        self.counts["skipped_lines"] += reader.skipped

    def _shared(self, answer: Answer) -> Answer:
        try:
            got = self._answers.get(answer)
            if got is None and len(self._answers) < 4096:  # a line has a few classes x 2 decisions
                got = self._answers[answer] = answer
            return got or answer
        except TypeError:  # a class that is not a plain value (a hostile log): kept as it is
            return answer

    def _waiting(self, key: Key) -> list[tuple]:
        """The unlabelled answers of a frame (a new entry may push the oldest frame out of the window). A frame
        answered again after it left the window starts with `PARTIAL`: its earlier answers are not held."""
        if not self.window:
            self.forgot = True
            return []
        entries = self.unlabelled.get(key)
        if entries is None:
            entries = self.unlabelled[key] = [PARTIAL] if self._was_evicted(key) else []
            if len(self.unlabelled) > self.window:
                old, _ = self.unlabelled.popitem(last=False)
                self.forgot = True
                newer = self.evicted[0]
                newer.add(hash(old))
                if len(newer) >= EVICTED_KEPT:  # the older generation is forgotten: bounded memory
                    self.evicted = [set(), newer]
        elif len(entries) >= PER_FRAME and entries[0] is not PARTIAL:
            entries[:] = [PARTIAL]  # bounded per frame too; its label will read again
            self.forgot = True
        return entries

    def _was_evicted(self, key: Key) -> bool:
        h = hash(key)
        return h in self.evicted[0] or h in self.evicted[1]

    def _hold(self, entries: list[tuple], entry: tuple) -> None:
        if not entries or entries[0] is not PARTIAL:
            entries.append(entry)

    def _prediction(self, r: dict[str, Any]) -> None:
        key, role = _key(r), r.get("role")
        if key in self.orphans and not self._was_evicted(key):  # its label was read first, in this update
            self.orphans.discard(key)
        want = self.versions.get(role) if role in self.versions else False
        if want is False or (want is not None and str(r.get("model_version")) != want):
            if key not in self.labels:
                self._waiting(key)  # seen: a label for it later has nothing to join, and needs no new fold
            return
        arms = self._arms.get((role, key[0]))
        if arms is None:
            cam = self.per_camera.setdefault(key[0], {CHAMPION: _Arm(), CHALLENGER: _Arm()})
            arms = self._arms[(role, key[0])] = (self.overall[role], cam[role])
        for arm in arms:
            arm.add(r)
        labelled = key in self.labels
        entries = None if labelled else self._waiting(key)
        if r.get("error"):
            return
        answer = self._shared((r.get("class"), r.get("decision")))
        if labelled:
            for arm in arms:
                arm.labelled.append((key, answer))
        else:
            self._hold(entries, ("arm", arms, answer))  # type: ignore[arg-type]
        # a pair is the champion's served answer and the challenger's shadow answer on the same frame: shadow mode
        paired_side = (role == CHAMPION and r.get("served", True)) or (role == CHALLENGER and r.get("shadow"))
        if paired_side and "frame_id" in r and (done := self.pairs.add(key, role, answer[0])) is not None:
            if labelled:
                self.pairs.labelled.append((key, *done))
            else:
                self._hold(entries, ("pair", *done))  # type: ignore[arg-type]

    def _label(self, r: dict[str, Any]) -> None:
        if "frame_id" not in r or "label" not in r:
            return
        key = _key(r)
        known = key in self.labels
        self.labels[key] = str(r["label"])  # the last label of a frame counts
        if known:
            return
        entries = self.unlabelled.pop(key, None)
        if entries is None or (entries and entries[0] is PARTIAL):  # its answers are in this update's predictions
            self.orphans.add(key)  # (they join as read), or not all held (a fold from the first line will)
            return
        for kind, a, b in entries:
            if kind == "arm":
                for arm in a:
                    arm.labelled.append((key, b))
            else:
                self.pairs.labelled.append((key, a, b))

    def report(self, op: OperatingPoint) -> dict[str, Any]:
        """`deploy.edge.rollout.stats.compare`'s report of what the fold has read."""
        with self.lock:
            return {
                "versions": dict(self.versions),
                "ok_class": op.ok_class,
                "overall": {role: arm.stats(op, self.labels) for role, arm in self.overall.items()},
                "per_camera": {
                    cam: {role: arm.stats(op, self.labels) for role, arm in arms.items() if arm.requests}
                    for cam, arms in sorted(self.per_camera.items())
                },
                "paired": self.pairs.result(self.labels),
                "log": dict(self.counts),
            }
