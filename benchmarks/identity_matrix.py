"""Identity-distance matrix of the real photos in shared/data: same person (mirror, or same identity) vs different.

Run ``python benchmarks/identity_matrix.py [--matrix] [--dlib] [--calibrate]``; prints a JSON summary.

* Images: ``sources/*`` and ``sources_vox1_frames/*`` of the shared data. Identities come from the
  ``identity:`` note of ``MANIFEST.tsv``, without the parenthesised remark ("stock woman A (smiling)" and
  "stock woman A (sad)" are one person).
* Same-person pairs: every image against its own left-right mirror (its landmarks measured on the mirror),
  plus pairs of different images of one identity. Different-person pairs: every pair of distinct identities.
* ``--dlib``: also run dlib's own pipeline (HOG detector, 5-point predictor, chip, C++ network) on the same
  images, and report how far our embeddings are from dlib's and dlib's own same/different counts.
* ``--calibrate``: where MediaPipe's five alignment points fall, on average, in dlib's own chips (the source
  of `metaportrait.models.identity.MEDIAPIPE_FIVE_POINT_TEMPLATE`).
* ``--matrix``: also print the full distance matrix (tab-separated, original images only).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

SHARED = Path(os.environ.get("METAPORTRAIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
FOLDERS = ("sources", "sources_vox1_frames")


class Photo(NamedTuple):
    name: str  # path relative to the data folder
    identity: str
    image: np.ndarray  # uint8 (H, W, 3)


def load_photos(data_dir: Path = SHARED / "data") -> list[Photo]:
    """The photos of `FOLDERS` with their MANIFEST identity (lower case, parenthesised remark removed)."""
    from metaportrait.io.image import read_image

    with open(data_dir / "MANIFEST.tsv", newline="") as handle:
        notes = {row["file"]: row["notes"] for row in csv.DictReader(handle, delimiter="\t")}
    photos = []
    for folder in FOLDERS:
        for path in sorted((data_dir / folder).iterdir()):
            name = f"{folder}/{path.name}"
            match = re.search(r"identity:\s*([^;]+)", notes.get(name, ""))
            if match is None:
                raise ValueError(f"{name}: no 'identity:' note in MANIFEST.tsv")
            identity = re.sub(r"\s*\(.*?\)", "", match.group(1)).strip().lower()
            photos.append(Photo(name, identity, read_image(path)))
    return photos


def _embed(encoder, face_mesh, image: np.ndarray) -> np.ndarray | None:
    """(128,) embedding of the face in ``image``, or None if MediaPipe finds no face."""
    from metaportrait.io.image import to_tensor

    landmarks = face_mesh(image)
    if landmarks is None:
        return None
    with torch.no_grad():
        return encoder.embed(to_tensor(np.array(image)), torch.from_numpy(landmarks)[None])[0].numpy()


def _summary(distances: list[float]) -> dict:
    values = np.asarray(distances)
    return {"min": round(float(values.min()), 3), "median": round(float(np.median(values)), 3),
            "max": round(float(values.max()), 3)}


def _pair_counts(names, identities, embeddings, mirrors, threshold) -> dict:
    """Same/different-person counts from (N, D) embeddings and (N, D) mirror embeddings (None to skip)."""
    same_mirror = [float(np.linalg.norm(e - m)) for e, m in zip(embeddings, mirrors) if m is not None]
    same_identity, different, errors = [], [], []
    for i, j in itertools.combinations(range(len(names)), 2):
        distance = float(np.linalg.norm(embeddings[i] - embeddings[j]))
        if identities[i] == identities[j]:
            same_identity.append(distance)
            if distance >= threshold:
                errors.append({"pair": [names[i], names[j]], "same_person": True, "distance": round(distance, 3)})
        else:
            different.append(distance)
            if distance < threshold:
                errors.append({"pair": [names[i], names[j]], "same_person": False, "distance": round(distance, 3)})
    for name, embedding, mirror in zip(names, embeddings, mirrors):
        if mirror is not None and np.linalg.norm(embedding - mirror) >= threshold:
            errors.append({"pair": [name, name + " (mirror)"], "same_person": True,
                           "distance": round(float(np.linalg.norm(embedding - mirror)), 3)})
    result = {
        "mirror_pairs": len(same_mirror),
        "mirror_pairs_below_threshold": sum(d < threshold for d in same_mirror),
        "same_identity_pairs": len(same_identity),
        "same_identity_pairs_below_threshold": sum(d < threshold for d in same_identity),
        "different_pairs": len(different),
        "different_pairs_above_threshold": sum(d >= threshold for d in different),
        "errors": errors,
    }
    if same_mirror:
        result["mirror_distance"] = _summary(same_mirror)
    if same_identity:
        result["same_identity_distance"] = [round(d, 3) for d in same_identity]
    if different:
        result["different_distance"] = _summary(different)
    return result


def identity_matrix(photos: list[Photo], with_dlib: bool = False) -> dict:
    """Embed every photo and its mirror; count same-person pairs below and different-person pairs above 0.6."""
    from metaportrait.data.landmarks import FaceMeshTracker
    from metaportrait.models.identity import DLIB_SAME_PERSON_THRESHOLD, IdentityEncoder

    encoder = IdentityEncoder.from_dlib()
    names, identities, embeddings, mirrors, no_face = [], [], [], [], []
    with FaceMeshTracker(static_image_mode=True) as face_mesh:  # one graph for all photos
        for photo in photos:
            embedding = _embed(encoder, face_mesh, photo.image)
            if embedding is None:
                no_face.append(photo.name)
                continue
            mirror_embedding = _embed(encoder, face_mesh, photo.image[:, ::-1].copy())
            if mirror_embedding is None:
                no_face.append(photo.name + " (mirror)")
            names.append(photo.name)
            identities.append(photo.identity)
            embeddings.append(embedding)
            mirrors.append(mirror_embedding)
    result = {
        "images": len(photos),
        "identities": len(set(p.identity for p in photos)),
        "faces_found": len(names),
        "no_face": no_face,
        "threshold": DLIB_SAME_PERSON_THRESHOLD,
        "ours": _pair_counts(names, identities, np.stack(embeddings), mirrors, DLIB_SAME_PERSON_THRESHOLD),
        "names": names,
        "matrix": np.linalg.norm(np.stack(embeddings)[:, None] - np.stack(embeddings)[None], axis=-1).round(3),
    }
    if with_dlib:
        result["dlib"] = _dlib_reference(photos, dict(zip(names, embeddings)), DLIB_SAME_PERSON_THRESHOLD)
    return result


def _dlib_pipeline():
    """dlib's own pipeline: image -> (descriptor (128,), five points (5, 2) with pixel centres at integers)."""
    import dlib

    from metaportrait.models.identity import dlib_face_model_path, dlib_five_point_predictor_path

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_five_point_predictor_path()))
    recognizer = dlib.face_recognition_model_v1(str(dlib_face_model_path()))

    def describe(image: np.ndarray):
        boxes, scores, _ = detector.run(image, 1)
        if len(boxes) == 0:
            return None
        shape = predictor(image, boxes[int(np.argmax(scores))])  # best box (upsampling adds weak false positives)
        descriptor = np.array(recognizer.compute_face_descriptor(dlib.get_face_chip(image, shape, 150, 0.25)))
        points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
        return descriptor, points

    return describe


def _dlib_reference(photos: list[Photo], ours: dict[str, np.ndarray], threshold: float) -> dict:
    describe = _dlib_pipeline()
    names, identities, embeddings, mirrors, gaps, no_face = [], [], [], [], [], []
    for photo in photos:
        found = describe(photo.image)
        if found is None:
            no_face.append(photo.name)
            continue
        mirror = describe(photo.image[:, ::-1].copy())
        names.append(photo.name)
        identities.append(photo.identity)
        embeddings.append(found[0])
        mirrors.append(None if mirror is None else mirror[0])
        if photo.name in ours:
            gaps.append(float(np.linalg.norm(ours[photo.name] - found[0])))
    return {
        "faces_found": len(names),
        "no_face": no_face,
        "distance_ours_to_dlib": _summary(gaps) | {"mean": round(float(np.mean(gaps)), 3), "images": len(gaps)},
        "dlib_pairs": _pair_counts(names, identities, np.stack(embeddings), mirrors, threshold),
    }


def calibrate(photos: list[Photo]) -> dict:
    """Mean position of MediaPipe's five alignment points in dlib's chips, in [0, 1] template coordinates."""
    from metaportrait.data.landmarks import FaceMeshTracker
    from metaportrait.models.identity import (
        CHIP_PADDING,
        CHIP_SIZE,
        MEDIAPIPE_FIVE_POINTS,
        chip_template,
        fit_similarity,
    )

    describe = _dlib_pipeline()
    template = chip_template().double()  # dlib's template in chip pixels
    positions = []
    with FaceMeshTracker(static_image_mode=True) as face_mesh:
        found_by_both = [(describe(p.image), face_mesh(p.image)) for p in photos]
    for found, landmarks in found_by_both:
        if found is None or landmarks is None:
            continue
        # image -> chip similarity from dlib's own points, applied to MediaPipe's points
        to_chip = fit_similarity(torch.from_numpy(found[1])[None], template[None])[0].numpy()
        mediapipe = landmarks[list(MEDIAPIPE_FIVE_POINTS)].astype(np.float64) - 0.5  # centres at integers
        positions.append(mediapipe @ to_chip[:, :2].T + to_chip[:, 2])
    mean = np.mean(positions, axis=0) / CHIP_SIZE * (1 + 2 * CHIP_PADDING) - CHIP_PADDING
    spread = np.std(positions, axis=0)
    return {"photos": len(positions), "template": mean.round(4).tolist(), "std_chip_px": spread.round(2).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data", help="shared data folder (with MANIFEST.tsv)")
    parser.add_argument("--matrix", action="store_true", help="also print the full distance matrix")
    parser.add_argument("--dlib", action="store_true", help="compare with dlib's own pipeline")
    parser.add_argument("--calibrate", action="store_true", help="measure the MediaPipe alignment template")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    photos = load_photos(args.data)
    if args.calibrate:
        print(json.dumps(calibrate(photos), indent=2))
        return
    result = identity_matrix(photos, with_dlib=args.dlib)
    names, matrix = result.pop("names"), result.pop("matrix")
    print(json.dumps(result, indent=2))
    if args.matrix:
        print("\t" + "\t".join(Path(n).stem for n in names))
        for name, row in zip(names, matrix):
            print(Path(name).stem + "\t" + "\t".join(f"{v:.3f}" for v in row))


if __name__ == "__main__":
    main()
