"""`metaportrait identity`: identity distance between the faces of two images (dlib's face ResNet, ported).

Example::

    metaportrait identity portrait.jpg frame_0042.png
    {"distance": 0.412, "cosine_distance": 0.0391, "same_person": true, "threshold": 0.6}

Each image's face is found with MediaPipe Face Mesh (one face per image: the first one MediaPipe finds),
aligned as dlib aligns faces, and embedded with dlib's 128-d ResNet. ``distance`` is Euclidean
(dlib's convention: the same person below 0.6); ``cosine_distance`` is ``1 - cos``, the form of
MetaPortrait's ID loss. These numbers are not comparable with ArcFace CSIM.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.io.image import read_image, to_tensor
from metaportrait.models.identity import (
    DLIB_SAME_PERSON_THRESHOLD,
    IdentityEncoder,
    cosine_distance,
    identity_distance,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image_a", type=Path, metavar="IMAGE_A", help="first image (jpg, png, webp, bmp)")
    parser.add_argument("image_b", type=Path, metavar="IMAGE_B", help="second image")


def embed_image_file(path: Path, encoder: IdentityEncoder) -> torch.Tensor:
    """(1, 128) identity embedding of the face in an image file.

    Raises:
        InputError: unreadable image; NoFaceError (an InputError) if no face is found.
    """
    image = read_image(path)
    landmarks = torch.from_numpy(landmarks_of_image(image, path))[None]  # (1, 478, 2)
    with torch.no_grad():
        return encoder.embed(to_tensor(image), landmarks)


def run(args: argparse.Namespace) -> int:
    for path in (args.image_a, args.image_b):  # a bad file fails in a moment, before the encoder loads
        read_image(path)
    encoder = IdentityEncoder.from_dlib()
    a = embed_image_file(args.image_a, encoder)
    b = embed_image_file(args.image_b, encoder)
    distance = identity_distance(a, b).item()
    result = {
        "distance": round(distance, 6),
        "cosine_distance": round(cosine_distance(a, b).item(), 6),
        "same_person": distance < DLIB_SAME_PERSON_THRESHOLD,
        "threshold": DLIB_SAME_PERSON_THRESHOLD,
    }
    print(json.dumps(result))
    return 0
