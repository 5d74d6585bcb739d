"""Reading a prepared dataset (`metaportrait prepare` output; layout in docs/contracts.md).

`PreparedDataset` lists the finished clips from ``manifest.jsonl``; each `PreparedClip` memory-maps its
arrays on first use, so opening a dataset of gigabytes costs nothing until frames are read. The training
sampler builds on this; `split_by_identity` keeps every clip of a person on one side of a split.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaportrait.data.landmarks import NUM_LANDMARKS
from metaportrait.errors import InputError

MANIFEST = "manifest.jsonl"  # one JSON object per finished clip
SKIPPED = "skipped.jsonl"  # {"source_video", "reason"} per video that did not become a clip
CLIPS = "clips"  # clips/<clip>/{frames,landmarks,present}.npy
MANIFEST_KEYS = ("clip", "identity", "source_video", "frames", "fps", "size", "crop")
_ARRAYS = ("frames", "landmarks", "present")


@dataclass(frozen=True)
class PreparedClip:
    """One clip of a prepared dataset: its manifest entry and lazily memory-mapped arrays.

    Arrays (read-only memory maps, opened on first access and checked against the manifest):
        frames: ``uint8`` ``(T, S, S, 3)`` RGB face crops.
        landmarks: ``float32`` ``(T, 478, 2)`` ``(x, y)`` in crop pixels.
        present: ``bool`` ``(T,)``; False where the face was lost (landmarks then repeat the last good ones).
    """

    folder: Path
    clip: str
    identity: str
    source_video: str
    frame_count: int  # T
    fps: float
    size: int  # S
    crop: tuple[float, float, float]  # [x0, y0, side] of the crop in source-video pixels
    # Frames usable for pairs: indices in [first_frame, stop_frame) (None: to the end); `part` narrows them, e.g. to
    # keep a held-out tail of a clip out of training. The arrays always hold the whole clip.
    first_frame: int = 0
    stop_frame: int | None = None

    @functools.cached_property
    def frames(self) -> np.ndarray:
        """``uint8`` ``(T, S, S, 3)`` RGB frames (memory-mapped)."""
        return self._load("frames.npy", np.uint8, (self.frame_count, self.size, self.size, 3))

    @functools.cached_property
    def landmarks(self) -> np.ndarray:
        """``float32`` ``(T, 478, 2)`` landmark coordinates in crop pixels (memory-mapped)."""
        return self._load("landmarks.npy", np.float32, (self.frame_count, NUM_LANDMARKS, 2))

    @functools.cached_property
    def present(self) -> np.ndarray:
        """``bool`` ``(T,)``: whether the face was found in each frame."""
        return self._load("present.npy", np.bool_, (self.frame_count,))

    @property
    def usable_frames(self) -> np.ndarray:
        """Indices of the frames with a face within [first_frame, stop_frame), ``int64`` ``(N,)``."""
        indices = np.flatnonzero(self.present)
        stop = self.frame_count if self.stop_frame is None else self.stop_frame
        return indices[(indices >= self.first_frame) & (indices < stop)]

    def part(self, first_frame: int, stop_frame: int) -> PreparedClip:
        """The same clip with only frames ``first_frame <= i < stop_frame`` usable (indices stay the clip's)."""
        if not 0 <= first_frame <= stop_frame <= self.frame_count:
            raise ValueError(f"frame range [{first_frame}, {stop_frame}) is not within the {self.frame_count} frames")
        return dataclasses.replace(self, first_frame=first_frame, stop_frame=stop_frame)

    def __getstate__(self) -> dict:
        # Pickling (e.g. to DataLoader workers) must not copy the memory-mapped arrays; workers map them again.
        return {key: value for key, value in self.__dict__.items() if key not in _ARRAYS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _load(self, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        path = self.folder / name
        if not path.is_file():
            raise InputError(path, "missing from the prepared clip")
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as error:
            raise InputError(path, f"not a readable .npy file ({error})") from None
        if array.dtype != dtype or array.shape != shape:
            raise InputError(path, f"expected {np.dtype(dtype)} {shape}, found {array.dtype} {array.shape}")
        return array


class PreparedDataset(Sequence[PreparedClip]):
    """The finished clips of a prepared dataset folder, in manifest order.

    Raises:
        InputError: no ``manifest.jsonl``, a malformed or duplicated manifest line, or a listed clip folder
            that does not exist.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise InputError(manifest, "not found (is this a `metaportrait prepare` output folder?)")
        self.clips: list[PreparedClip] = []
        seen: set[str] = set()
        for number, entry in enumerate(read_jsonl(manifest), start=1):
            clip = _clip_from_entry(self.root, entry, manifest, number)
            if clip.clip in seen:
                raise InputError(manifest, f"line {number}: clip {clip.clip!r} is listed twice")
            seen.add(clip.clip)
            self.clips.append(clip)
        self._by_name = {clip.clip: clip for clip in self.clips}

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index):
        return self.clips[index]

    def __iter__(self) -> Iterator[PreparedClip]:
        return iter(self.clips)

    def clip(self, name: str) -> PreparedClip:
        """The clip with this id; ``KeyError`` listing a few valid ids if there is none."""
        if name not in self._by_name:
            raise KeyError(f"no clip {name!r} in {self.root}; e.g. {sorted(self._by_name)[:5]}")
        return self._by_name[name]

    @property
    def identities(self) -> dict[str, list[PreparedClip]]:
        """Identity -> its clips, identities sorted by name."""
        return group_by_identity(self.clips)

    @property
    def total_frames(self) -> int:
        """Number of frames over all clips (with or without a face)."""
        return sum(clip.frame_count for clip in self.clips)


def group_by_identity(clips: Iterable[PreparedClip]) -> dict[str, list[PreparedClip]]:
    """Identity -> list of its clips (input order kept within an identity), identities sorted by name."""
    groups: dict[str, list[PreparedClip]] = {}
    for clip in clips:
        groups.setdefault(clip.identity, []).append(clip)
    return dict(sorted(groups.items()))


def parse_identities(value: str | Path) -> tuple[str, ...]:
    """Identity names from a file (one per line, ``#`` starts a comment) or a comma-separated list.

    Raises:
        InputError: no name is given.
    """
    path = Path(value)
    if path.is_file():
        names = [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        names = [name.strip() for name in str(value).split(",")]
    names = [name for name in names if name]
    if not names:
        raise InputError(value, "no identity names given")
    return tuple(names)


def split_by_identity(
    clips: Iterable[PreparedClip], val_identities: Iterable[str]
) -> tuple[list[PreparedClip], list[PreparedClip]]:
    """Split clips into (train, val) so that no identity is on both sides.

    Args:
        clips: the clips to split (e.g. a `PreparedDataset`).
        val_identities: identities whose clips all go to validation.

    Raises:
        ValueError: a validation identity has no clip (a typo would otherwise give an empty split silently).
    """
    clips = list(clips)
    val_set = set(val_identities)
    unknown = val_set - {clip.identity for clip in clips}
    if unknown:
        raise ValueError(f"validation identities with no clip: {sorted(unknown)}")
    train = [clip for clip in clips if clip.identity not in val_set]
    val = [clip for clip in clips if clip.identity in val_set]
    return train, val


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file, one per non-empty line ([] if the file does not exist)."""
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise InputError(path, f"line {number} is not JSON ({error.msg})") from None
    return entries


def _clip_from_entry(root: Path, entry: dict, manifest: Path, number: int) -> PreparedClip:
    missing = [key for key in MANIFEST_KEYS if key not in entry]
    if missing:
        raise InputError(manifest, f"line {number}: missing keys {missing}")
    folder = root / CLIPS / entry["clip"]
    if not folder.is_dir():
        raise InputError(folder, "clip folder listed in the manifest does not exist")
    x0, y0, side = entry["crop"]
    return PreparedClip(
        folder=folder,
        clip=entry["clip"],
        identity=entry["identity"],
        source_video=entry["source_video"],
        frame_count=int(entry["frames"]),
        fps=float(entry["fps"]),
        size=int(entry["size"]),
        crop=(float(x0), float(y0), float(side)),
    )
