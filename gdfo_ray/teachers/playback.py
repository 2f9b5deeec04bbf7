"""A black box's answers, recorded once and played back: students compared on one paid trajectory.

A run with ``model.record_answers=PATH`` writes every answer its teacher gave to
``PATH`` (``.npz``). A run with ``model.teacher=PATH`` then asks that recording
instead of the teacher: the same prompts get the same logits, bit for bit, and a
prompt the recording never saw is an error rather than a guess. Replaying the
recorded search exactly (the same seeds and search settings; gdfo with
``harmonize.gate=off``, whose student rides along without steering) costs no call
and measures any student on the teacher's real answers (``benchmarks/fidelity.py``).

Free of torch and Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from gdfo_ray.config import RECORDING_SUFFIX
from gdfo_ray.exceptions import TeacherError
from gdfo_ray.teachers.base import BaseTeacher, TeacherInfo


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    h = hashlib.sha1(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()


class Recorder:
    """Wraps a teacher (or a pool of them) and keeps what it answered; :meth:`save` writes it.

    Everything else is passed through, so the driver cannot tell it from the teacher it wraps.
    """

    def __init__(self, teacher: Any, path: str):
        self.teacher, self.path = teacher, path
        self._info: Optional[TeacherInfo] = None
        self._arrays: dict[str, np.ndarray] = {}
        if os.path.exists(path):  # a resumed run adds to what it recorded before its crash
            with np.load(path) as f:
                self._arrays = {k: f[k] for k in f.files if k != "info"}

    def describe(self) -> TeacherInfo:
        self._info = self.teacher.describe()
        return self._info

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        out = np.asarray(self.teacher.embed_tokens(ids))
        self._arrays[f"embed_{_digest(np.asarray(ids, dtype=np.int64))}"] = out
        return out

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray,
              call_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        logits = np.asarray(self.teacher.query(prompts, split, example_ids, call_ids))
        ids = np.asarray(example_ids, dtype=np.int64)
        for prompt, answer in zip(np.asarray(prompts), logits):
            key = f"{split}_{_digest(prompt)}"
            # A prompt asked again (a dev score) keeps every row seen; rows are kept sorted by id, for the lookup.
            known = dict(zip(self._arrays.get(key + "_ids", np.empty(0, np.int64)).tolist(),
                             self._arrays.get(key + "_logits", ())))
            known.update(zip(ids.tolist(), answer))
            order = sorted(known)
            self._arrays[key + "_ids"] = np.asarray(order, dtype=np.int64)
            self._arrays[key + "_logits"] = np.stack([known[i] for i in order])
        return logits

    def __getattr__(self, name: str) -> Any:  # loss_and_grad, stats, ...: the wrapped teacher's
        if name == "teacher":
            raise AttributeError(name)
        return getattr(self.teacher, name)

    def save(self) -> None:
        """Write the recording (atomically: a crash leaves the previous one)."""
        if self._info is None:
            return
        info = json.dumps(dataclasses.asdict(self._info))
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tmp = self.path + ".tmp.npz"
        np.savez_compressed(tmp, info=np.frombuffer(info.encode(), dtype=np.uint8), **self._arrays)
        os.replace(tmp, self.path)


class PlaybackTeacher(BaseTeacher):
    """The teacher a recording stands for: its answers, and an error for any prompt it did not see."""

    def __init__(self, path: str, n_classes: Optional[int] = None):
        if not os.path.isfile(path):
            raise TeacherError(f"model.teacher={path!r} names a recording of answers ({RECORDING_SUFFIX}), but there "
                               "is no such file. Record one with model.record_answers=PATH on a run against the teacher.")
        self.path = path
        with np.load(path) as f:
            self._arrays = {k: f[k] for k in f.files}
        fields = json.loads(self._arrays.pop("info").tobytes().decode())
        if fields.get("layer_std") is not None:
            fields["layer_std"] = tuple(fields["layer_std"])
        self.info = TeacherInfo(**fields)
        if n_classes is not None and n_classes != self.info.n_classes:
            raise TeacherError(f"The recording {path} answers {self.info.n_classes} classes, but the task has "
                               f"{n_classes}: it was recorded on another task.")

    def describe(self) -> TeacherInfo:
        return self.info

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        key = f"embed_{_digest(np.asarray(ids, dtype=np.int64))}"
        if key not in self._arrays:
            raise TeacherError(f"The recording {self.path} holds no embeddings for these {len(ids)} tokens: the "
                               "replay builds its prompt space otherwise than the recorded run (prompt.* settings).")
        return self._arrays[key]

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray,
              call_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        ids = np.asarray(example_ids, dtype=np.int64)
        out = []
        for prompt in np.asarray(prompts):
            key = f"{split}_{_digest(prompt)}"
            known = self._arrays.get(key + "_ids")
            if known is None:
                raise TeacherError(
                    f"The recording {self.path} never saw this prompt on {split}: the run left the recorded "
                    "trajectory. A replay must repeat the recorded search exactly: the same seed, task and "
                    "prompt and search settings, and a method whose student does not steer it (bbt, or gdfo "
                    "with harmonize.gate=off).")
            where = np.searchsorted(known, ids)
            if np.any(where >= len(known)) or np.any(known[np.minimum(where, len(known) - 1)] != ids):
                raise TeacherError(f"The recording {self.path} holds this prompt on {split}, but not on every "
                                   "example asked for (another task.max_test_examples or split?).")
            out.append(self._arrays[key + "_logits"][where])
        return np.stack(out)
