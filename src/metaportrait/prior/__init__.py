"""The training-free mesh-warp prior that the generator refines, with one entry point: `build_prior`.

For a source face and a driving face, given by their landmarks, the prior is

- a backward sampling grid that moves the source face onto the driving landmarks, piecewise affine along the
  face mesh (the generator's ``prior_grid``, and the "mesh-warp" evaluation baseline);
- for models with ``ModelConfig.prior_masks``, the masks that say where to trust that grid and where to
  synthesise (the generator's ``prior_masks``): the driving face, the part of the mouth opening and of closing
  eyelids the source cannot supply, the mouth template (teeth, cavity) and the eyelid band.

Modules, each importing only modules listed above it::

    topology.py   the fixed triangulation of MediaPipe's 478-point face mesh
    geometry.py   the landmark check, triangle areas, polygon coverage
    mouth.py      the mouth fills (`MouthFill`, the upper-lip split line) and the mouth template
    eyelids.py    the eyelid band and the lid fill
    masks.py      `face_mask`, `prior_masks`
    warp.py       `mesh_warp_grid`, `apply_grid`, `mesh_warp_image`

::

    from metaportrait.prior import build_prior

    prior = build_prior(source_landmarks, driving_landmarks, 256, model_config)
    prior.grid   # float32 (256, 256, 2)
    prior.masks  # float32 (model_config.prior_mask_channels(), 256, 256), or None
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from metaportrait.prior.masks import prior_masks
from metaportrait.prior.mouth import MOUTH_FILLS, MouthFill
from metaportrait.prior.warp import apply_grid, mesh_warp_grid

if TYPE_CHECKING:
    from metaportrait.config import ModelConfig


@dataclass(frozen=True)
class PriorOptions:
    """What the prior holds and how it fills mouth and eyes; `for_model` gives a model's, the defaults are the
    plain mesh-warp baseline (grid only, mouth stretched, whole frame)."""

    mouth: MouthFill = "stretch"  # how grid and masks fill a driving mouth opening (ModelConfig.prior_mouth)
    eyelid_fill: bool = False  # the grid fills closing eyes' lids from above (ModelConfig.prior_eyelid_fill)
    face_masked: bool = False  # the grid is the identity outside the faces (ModelConfig.prior_face_masked)
    masks: bool = False  # also the prior masks (ModelConfig.prior_masks)
    template: bool = False  # masks also hold the mouth template, channels 2-3 (RefineConfig.mouth_template)
    eyelids: bool = False  # the masks' synthesis channel also covers the eyelid band (ModelConfig.prior_eyelids)
    eyelid_channel: bool = False  # masks also hold the eyelid band alone, last (RefineConfig.eyelid_band)

    def __post_init__(self):
        if self.mouth not in MOUTH_FILLS:
            raise ValueError(f"mouth must be one of {MOUTH_FILLS}, got {self.mouth!r}")
        for name in ("template", "eyelids", "eyelid_channel"):
            if getattr(self, name) and not self.masks:
                raise ValueError(f"{name} needs masks (it is part of the prior masks)")
        if self.eyelid_channel and not self.eyelids:
            raise ValueError("eyelid_channel needs eyelids (the band is synthesised where it is given)")

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> PriorOptions:
        """The prior a model with a mesh prior (``cfg.use_mesh_prior``) takes."""
        if not cfg.use_mesh_prior:
            raise ValueError("this model has no mesh prior (ModelConfig.use_mesh_prior is False)")
        return cls(
            mouth=cfg.prior_mouth,
            eyelid_fill=cfg.prior_eyelid_fill,
            face_masked=cfg.prior_face_masked,
            masks=cfg.prior_masks,
            template=cfg.refine.mouth_template,
            eyelids=cfg.prior_eyelids,
            eyelid_channel=cfg.refine.eyelid_band,
        )


@dataclass(frozen=True)
class Prior:
    """The mesh prior of one (source, driving) pair on an ``S`` x ``S`` frame.

    Attributes:
        grid: ``float32`` ``(S, S, 2)`` backward sampling grid, ``(x, y)`` in ``grid_sample``'s ``[-1, 1]``
            ``align_corners=False`` convention: for each output pixel, where to read the source. Values may leave
            ``[-1, 1]`` where the driving face reaches past the image of the source face.
        masks: ``float32`` ``(C, S, S)`` in ``[0, 1]``, or None without `PriorOptions.masks`. Channel 0 the driving
            face (trust the grid), 1 what must be synthesised (the mouth opening the source cannot supply, with
            ``eyelids`` also the eyelid band), then with ``template`` the mouth template (2: teeth, 3: cavity),
            then with ``eyelid_channel`` the eyelid band alone; ``C`` is ``ModelConfig.prior_mask_channels()``.
    """

    grid: np.ndarray
    masks: np.ndarray | None

    def warp(self, image: np.ndarray) -> np.ndarray:
        """The source ``image`` (``uint8`` ``(H, W, 3)`` RGB) warped by `grid`: ``uint8`` ``(S, S, 3)``."""
        return apply_grid(image, self.grid)


def build_prior(
    source_landmarks: np.ndarray,
    driving_landmarks: np.ndarray,
    size: int,
    config: ModelConfig | PriorOptions,
) -> Prior:
    """The mesh prior that moves the source face onto the driving landmarks, as a model (or the baseline) takes it.

    Args:
        source_landmarks, driving_landmarks: ``(478, 2)`` MediaPipe pixel coordinates in one ``size`` x ``size``
            frame (landmarks of another frame size must be scaled to it first).
        size: side of the grid and masks in pixels.
        config: a model with a mesh prior (its `PriorOptions.for_model`), or the options themselves.
    """
    options = config if isinstance(config, PriorOptions) else PriorOptions.for_model(config)
    grid = mesh_warp_grid(source_landmarks, driving_landmarks, size, size, face_masked=options.face_masked,
                          mouth=options.mouth, eyelids=options.eyelid_fill)  # fmt: skip
    masks = None
    if options.masks:
        masks = prior_masks(source_landmarks, driving_landmarks, size, size, options.mouth, options.template,
                            options.eyelids, options.eyelid_channel)  # fmt: skip
    return Prior(grid, masks)
