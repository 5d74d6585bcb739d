"""Motion on dense landmarks: cross-identity motion transfer and expression / head-pose edits.

Pure NumPy, no model. Every function takes and returns MediaPipe Face Mesh landmarks, ``float32``
``(..., 478, 2)``, ``(x, y)`` in pixels of one image (in the pipeline: the ``image_size`` face crop).

* :func:`relative_motion` moves the *source* face the way the driver moves relative to the driver's first
  (reference) frame, so the output keeps the source's face shape (FOMM's "relative" keypoints, on landmarks).
* :func:`absolute_motion` uses the driver's landmarks as they are; the output takes the driver's face shape.
* :func:`edit_landmarks` opens / closes eyes and mouth and turns the head (yaw, pitch, roll).

2-D similarities are handled as complex numbers: a point is ``z = x + iy`` and a similarity is
``z -> a * z + b`` with complex ``a`` (scale ``|a|``, rotation ``arg a``) and ``b`` (translation). This keeps
the Procrustes fit, composition and inversion to one line each, and never produces a reflection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_LANDMARKS = 478

# --- MediaPipe Face Mesh index sets (from mediapipe.python.solutions.face_mesh_connections) ---------------------
# "Right"/"left" are the subject's: the right eye is on the image's left side in a frontal photo.
RIGHT_EYE_OUTER, RIGHT_EYE_INNER = 33, 133
LEFT_EYE_INNER, LEFT_EYE_OUTER = 362, 263
# Upper- and lower-lid contour points facing each other, from the outer to the inner corner.
RIGHT_EYE_LID_PAIRS = ((246, 7), (161, 163), (160, 144), (159, 145), (158, 153), (157, 154), (173, 155))
LEFT_EYE_LID_PAIRS = ((466, 249), (388, 390), (387, 373), (386, 374), (385, 380), (384, 381), (398, 382))
RIGHT_IRIS = (468, 469, 470, 471, 472)  # centre first
LEFT_IRIS = (473, 474, 475, 476, 477)
# Lip contours, corner to corner (61 -> 291 outer, 78 -> 308 inner).
LIPS_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
MOUTH_CORNERS = (61, 291, 78, 308)
INNER_LIP_UPPER_CENTRE, INNER_LIP_LOWER_CENTRE = 13, 14
NOSE_TIP = 1
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
# Points that move with the skull but not with expression (upper face outline, nose, eye corners): the rigid
# head pose is fitted on these only, so an open jaw or raised brows are not mistaken for head motion.
RIGID_POINTS = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 93, 234, 127, 162, 21, 54, 103, 67, 109,
                168, 6, 197, 195, 5, 4, 1, 2, 98, 327, 33, 133, 362, 263)

# Where closing lids meet, as a fraction of the way from the lower to the upper lid: in a blink the upper lid
# travels most of the distance.
LID_MEET = 0.3
# Pseudo-depth model for yaw / pitch (see _pseudo_depth): ellipsoid depth and nose bump, in face half-widths.
ELLIPSOID_DEPTH = 0.9
NOSE_BUMP_HEIGHT = 0.3
NOSE_BUMP_WIDTH = 0.3
# Orthographic rotation of a generic depth is a fair approximation only for moderate angles.
MAX_YAW_PITCH_DEGREES = 45.0
SCORE_CHUNK = 1024  # driving frames measured at once by `neutral_scores` (memory flat in clip length)


def _check_landmarks(lmk: np.ndarray, name: str) -> np.ndarray:
    lmk = np.asarray(lmk)
    if lmk.ndim < 2 or lmk.shape[-2:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"{name} must have shape (..., {NUM_LANDMARKS}, 2), got {lmk.shape}")
    if not np.all(np.isfinite(lmk)):
        raise ValueError(f"{name} holds non-finite values")
    return lmk.astype(np.float64)


def _complex(points: np.ndarray) -> np.ndarray:
    """(..., N, 2) float -> (..., N) complex."""
    return points[..., 0] + 1j * points[..., 1]


def _real(points: np.ndarray) -> np.ndarray:
    """(..., N) complex -> (..., N, 2) float32."""
    return np.stack([points.real, points.imag], axis=-1).astype(np.float32)


def fit_similarity(src: np.ndarray, dst: np.ndarray, indices: tuple[int, ...] = RIGID_POINTS
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Procrustes / Umeyama without reflection) mapping ``src`` onto ``dst``.

    Args:
        src: ``(..., 478, 2)`` landmarks.
        dst: ``(..., 478, 2)`` landmarks (broadcast against ``src``).
        indices: the points the fit uses (default: :data:`RIGID_POINTS`).

    Returns:
        ``(a, b)`` complex arrays of the broadcast batch shape: ``dst ≈ a * src + b`` with points as complex
        numbers; ``|a|`` is the scale and ``angle(a)`` the rotation in radians (positive is clockwise on screen, since
        pixel y points down).
    """
    z_src = _complex(_check_landmarks(src, "src")[..., indices, :])
    z_dst = _complex(_check_landmarks(dst, "dst")[..., indices, :])
    mean_src = z_src.mean(axis=-1, keepdims=True)
    mean_dst = z_dst.mean(axis=-1, keepdims=True)
    centred_src = z_src - mean_src
    # Minimising sum |a * s - d|^2 over complex a has the closed form a = <s, d> / <s, s>.
    a = (np.conj(centred_src) * (z_dst - mean_dst)).sum(axis=-1) / (np.abs(centred_src) ** 2).sum(axis=-1)
    b = mean_dst[..., 0] - a * mean_src[..., 0]
    return a, b


def relative_motion(source_lmk: np.ndarray, driving_lmk: np.ndarray, driving_reference: np.ndarray) -> np.ndarray:
    """Transfer the driver's motion relative to its reference frame onto the source face.

    Per driving frame ``D``, with reference ``R`` and source ``S`` (all in pixels):

    1. Head pose: the similarity ``M`` with ``D ≈ M(R)``, fitted on :data:`RIGID_POINTS`.
    2. Expression: the non-rigid residual ``M⁻¹(D) - R`` (the frame in the reference's pose minus the reference).
    3. The similarity ``A`` with ``S ≈ A(R)`` maps the residual into the source's size and in-plane rotation, so
       a driver filmed closer to the camera does not exaggerate the expression: ``E = S + a_A * (M⁻¹(D) - R)``.
    4. The pose change is applied to ``E`` in the source's frame: ``A ∘ M ∘ A⁻¹``.

    Identical driving and reference frames give the source unchanged; a driving frame that is the reference
    rotated by θ gives the source rotated by θ (about the source point that corresponds to the rotation centre).

    Args:
        source_lmk: ``(478, 2)`` source landmarks.
        driving_lmk: ``(T, 478, 2)`` or ``(478, 2)`` driving landmarks, same coordinate frame as the reference.
        driving_reference: ``(478, 2)`` the driver's reference (first) frame.

    Returns:
        ``float32`` target landmarks shaped like ``driving_lmk``, in the source's pixel coordinates.
    """
    source = _check_landmarks(source_lmk, "source_lmk")
    driving = _check_landmarks(driving_lmk, "driving_lmk")
    reference = _check_landmarks(driving_reference, "driving_reference")
    if source.ndim != 2 or reference.ndim != 2 or driving.ndim not in (2, 3):
        raise ValueError("source_lmk and driving_reference must be (478, 2); driving_lmk (478, 2) or (T, 478, 2)")

    residual, pose = _residual_and_pose(source, driving, reference)
    return _real(_posed(_complex(source) + residual, pose))


def _residual_and_pose(source: np.ndarray, driving: np.ndarray, reference: np.ndarray
                       ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Steps 1-3 of `relative_motion` on checked float64 landmarks: the expression residual ``a_A (M⁻¹(D) - R)``
    in the source's frame (complex, ``driving``'s batch shape x 478) and the similarities step 4 needs."""
    pose_a, pose_b = fit_similarity(reference, driving)  # (T,) or (): D ≈ a R + b
    src_a, src_b = fit_similarity(reference, source)  # (): S ≈ a R + b
    # Driving frame brought back into the reference's pose: M⁻¹(D) = (D - b) / a.
    normalised = (_complex(driving) - pose_b[..., None]) / pose_a[..., None]
    return src_a * (normalised - _complex(reference)), (pose_a, pose_b, src_a, src_b)


def _posed(expression: np.ndarray, pose: tuple[np.ndarray, ...]) -> np.ndarray:
    """Step 4 of `relative_motion`: the driver's pose change applied to complex ``expression`` points."""
    pose_a, pose_b, src_a, src_b = pose
    # A ∘ M ∘ A⁻¹ (y) = m (y - b_A) + a_A c + b_A for M(z) = m z + c; 2-D rotations commute.
    return pose_a[..., None] * (expression - src_b) + src_a * pose_b[..., None] + src_b


def absolute_motion(driving_lmk: np.ndarray, driving_size: int, target_size: int) -> np.ndarray:
    """The driver's landmarks as they are, rescaled from the driver's crop to the source crop.

    Args:
        driving_lmk: ``(..., 478, 2)`` landmarks in pixels of the driver's ``driving_size`` square crop.
        driving_size: side of the driver's crop in pixels.
        target_size: side of the source crop in pixels.

    Returns:
        ``float32`` ``(..., 478, 2)`` in pixels of the source crop. The face shape is the driver's.
    """
    if driving_size <= 0 or target_size <= 0:
        raise ValueError(f"crop sizes must be positive, got {driving_size} and {target_size}")
    return (_check_landmarks(driving_lmk, "driving_lmk") * (target_size / driving_size)).astype(np.float32)


@dataclass(frozen=True)
class FaceFrame:
    """A face-aligned 2-D frame: ``origin`` plus axes ``across`` (eye to eye) and ``down`` (forehead to chin).

    ``half_width`` / ``half_height`` are the face outline's extents along the axes, in pixels.
    """

    origin: np.ndarray  # (2,)
    across: np.ndarray  # (2,) unit
    down: np.ndarray  # (2,) unit
    half_width: float
    half_height: float

    @classmethod
    def of(cls, lmk: np.ndarray) -> "FaceFrame":
        """The frame of one face, ``lmk`` ``(478, 2)`` float64."""
        across = lmk[LEFT_EYE_OUTER] - lmk[RIGHT_EYE_OUTER]
        across = across / np.linalg.norm(across)
        down = np.array([-across[1], across[0]])  # +90° in y-down pixels: (1, 0) -> (0, 1)
        oval = lmk[list(FACE_OVAL)]
        origin = oval.mean(axis=0)
        half_width = float(np.abs((oval - origin) @ across).max())
        half_height = float(np.abs((oval - origin) @ down).max())
        return cls(origin, across, down, half_width, half_height)

    def to_local(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) pixels -> (N, 2) (across, down) coordinates about the origin."""
        offset = points - self.origin
        return np.stack([offset @ self.across, offset @ self.down], axis=-1)

    def to_pixels(self, local: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_local`."""
        return self.origin + local[..., :1] * self.across + local[..., 1:] * self.down


def _pseudo_depth(lmk: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """A generic depth (towards the camera, pixels) per landmark, since our landmarks are 2-D.

    The face is modelled as the front half of an ellipsoid whose silhouette is the face outline (outline points
    get depth 0) with depth ``ELLIPSOID_DEPTH`` half-widths at the centre, plus a Gaussian bump for the nose.
    Proportions follow a typical adult head (half-width ≈ 7.5 cm, cheek surface ≈ 7 cm in front of the
    ear plane, nose tip ≈ 2 cm further). Only used to approximate small yaw / pitch rotations.
    """
    local = frame.to_local(lmk)
    radial = 1.0 - (local[:, 0] / frame.half_width) ** 2 - (local[:, 1] / frame.half_height) ** 2
    depth = ELLIPSOID_DEPTH * frame.half_width * np.sqrt(np.clip(radial, 0.0, 1.0))
    nose_distance2 = ((local - local[NOSE_TIP]) ** 2).sum(axis=-1) / (NOSE_BUMP_WIDTH * frame.half_width) ** 2
    return depth + NOSE_BUMP_HEIGHT * frame.half_width * np.exp(-0.5 * nose_distance2)


def _set_eye_openness(lmk: np.ndarray, factor: float, lid_pairs, iris, corners) -> None:
    """Scale one eye's lid gap by ``factor`` in place (``lmk`` (478, 2) float64)."""
    outer, inner = lmk[corners[0]], lmk[corners[1]]
    axis = (inner - outer) / np.linalg.norm(inner - outer)
    normal = np.array([-axis[1], axis[0]])
    for upper, lower in lid_pairs:
        meet = lmk[lower] + LID_MEET * (lmk[upper] - lmk[lower])
        lmk[upper] = meet + factor * (lmk[upper] - meet)
        lmk[lower] = meet + factor * (lmk[lower] - meet)
    # The iris is squashed towards the closed-lid line, never stretched: a wider eye shows more white, not a
    # taller iris. The middle lid pair was already moved, so recompute its meeting line from the new lids.
    upper, lower = lid_pairs[len(lid_pairs) // 2]
    meet = lmk[lower] + LID_MEET * (lmk[upper] - lmk[lower])
    squash = 1.0 - min(factor, 1.0)
    offsets = (lmk[list(iris)] - meet) @ normal
    lmk[list(iris)] -= squash * offsets[:, None] * normal


def _point_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule; points (N, 2), polygon (M, 2) -> (N,) bool."""
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (crosses & (x < x_cross)).sum(axis=1) % 2 == 1


def jaw_weights(lmk: np.ndarray) -> np.ndarray:
    """How much each landmark follows the lower jaw when the mouth opens, in ``[0, 1]``; ``lmk`` (478, 2).

    The lower lip (its contours and every point inside them) moves fully, the upper lip not at all, the mouth
    corners half-way. Other points move if they are below the mouth-corner line, ramping in over one lower-lip
    thickness, and less towards the sides of the face (the jaw hinges near the ears).
    """
    frame = FaceFrame.of(lmk)
    local = frame.to_local(lmk)
    corner_level = local[list(MOUTH_CORNERS), 1].mean()
    lip_thickness = max(local[17, 1] - corner_level, 1e-3 * frame.half_height)  # 17: bottom of the lower lip
    vertical = np.clip((local[:, 1] - corner_level) / lip_thickness, 0.0, 1.0)
    lower_lip = np.concatenate([lmk[list(LIPS_OUTER_LOWER)], lmk[list(LIPS_INNER_LOWER)][::-1]])
    upper_lip = np.concatenate([lmk[list(LIPS_OUTER_UPPER)], lmk[list(LIPS_INNER_UPPER)][::-1]])
    vertical[_point_in_polygon(lmk, lower_lip)] = 1.0
    vertical[_point_in_polygon(lmk, upper_lip)] = 0.0
    vertical[list(LIPS_OUTER_UPPER + LIPS_INNER_UPPER)] = 0.0
    # After the polygon tests: on a closed mouth the upper lip's polygon can take in lower-lip contour points.
    vertical[list(LIPS_OUTER_LOWER + LIPS_INNER_LOWER)] = 1.0
    vertical[list(MOUTH_CORNERS)] = 0.5
    mouth_centre = local[list(MOUTH_CORNERS), 0].mean()
    lateral = np.clip(1.0 - ((local[:, 0] - mouth_centre) / frame.half_width) ** 2, 0.0, 1.0)
    return vertical * lateral


def mouth_openness(lmk: np.ndarray) -> np.ndarray:
    """Inner-lip gap at the centre divided by the mouth width (corner to corner); ``(..., 478, 2)`` -> ``(...)``.

    About 0 for a closed mouth, 0.2–0.3 when talking, 0.6 and more for a wide-open jaw. The same measure is
    the target of ``edit_landmarks(mouth=...)``.
    """
    lmk = _check_landmarks(lmk, "lmk")
    gap = np.linalg.norm(lmk[..., INNER_LIP_LOWER_CENTRE, :] - lmk[..., INNER_LIP_UPPER_CENTRE, :], axis=-1)
    width = np.linalg.norm(lmk[..., 291, :] - lmk[..., 61, :], axis=-1)
    return gap / width


def eye_openness(lmk: np.ndarray) -> np.ndarray:
    """Mean lid gap of both eyes divided by the mean eye width; ``(..., 478, 2)`` -> ``(...)``; about 0.3 open."""
    lmk = _check_landmarks(lmk, "lmk")
    gaps = [np.linalg.norm(lmk[..., u, :] - lmk[..., d, :], axis=-1) for u, d in ((159, 145), (386, 374))]
    widths = [np.linalg.norm(lmk[..., RIGHT_EYE_OUTER, :] - lmk[..., RIGHT_EYE_INNER, :], axis=-1),
              np.linalg.norm(lmk[..., LEFT_EYE_OUTER, :] - lmk[..., LEFT_EYE_INNER, :], axis=-1)]
    return (gaps[0] + gaps[1]) / (widths[0] + widths[1])


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    """3x3 rotation of (across, down, towards-camera) vectors: yaw about ``down``, then pitch about ``across``."""
    y, p = np.radians(yaw), np.radians(pitch)
    # Positive yaw moves the nose (depth > 0) towards +across (image right in a frontal photo).
    yaw_matrix = np.array([[np.cos(y), 0.0, np.sin(y)], [0.0, 1.0, 0.0], [-np.sin(y), 0.0, np.cos(y)]])
    # Positive pitch moves the nose towards +down: a nod.
    pitch_matrix = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(p), np.sin(p)], [0.0, -np.sin(p), np.cos(p)]])
    return pitch_matrix @ yaw_matrix


def edit_landmarks(lmk: np.ndarray, eyes: float | None = None, mouth: float | None = None,
                   yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Change the expression and head pose of landmarks.

    Args:
        lmk: ``(478, 2)`` or ``(T, 478, 2)`` landmarks in pixels; each face is edited on its own.
        eyes: eye-openness factor: 1 leaves the eyes as they are, 0 closes them, 1.3 opens them wider. Upper and
            lower lid points move towards / away from where the lids meet (``LID_MEET`` of the gap above the
            lower lid); the iris is squashed towards that line when closing.
        mouth: target mouth openness (inner-lip gap / mouth width, see :func:`mouth_openness`): 0 closes the mouth,
            0.3 is talking, 0.6 opens the jaw. The lower lip and jaw move along the face's down axis, weighted by
            :func:`jaw_weights`; the upper lip stays.
        yaw: head turn in degrees; positive moves the nose towards the image's right (for an upright face).
        pitch: head nod in degrees; positive moves the nose down. Yaw and pitch rotate a generic pseudo-depth
            (:func:`_pseudo_depth`; MediaPipe's own z is not part of our landmarks) and project orthographically,
            which is an approximation; limited to ±45°.
        roll: in-plane rotation in degrees, exact; positive turns the face clockwise on screen.
            All rotations are about the centre of the face outline.

    Returns:
        ``float32`` landmarks of the same shape.
    """
    points = _check_landmarks(lmk, "lmk")
    if eyes is not None and eyes < 0:
        raise ValueError(f"eyes must be >= 0 (1 = unchanged, 0 = closed), got {eyes}")
    if mouth is not None and mouth < 0:
        raise ValueError(f"mouth must be >= 0 (0 = closed, 0.6 = open jaw), got {mouth}")
    for name, angle in ("yaw", yaw), ("pitch", pitch):
        if abs(angle) > MAX_YAW_PITCH_DEGREES:
            raise ValueError(f"{name} must be within ±{MAX_YAW_PITCH_DEGREES:g} degrees, got {angle}")
    if points.ndim == 3:
        return np.stack([edit_landmarks(face, eyes, mouth, yaw, pitch, roll) for face in points])
    if points.ndim != 2:
        raise ValueError(f"lmk must be (478, 2) or (T, 478, 2), got {points.shape}")

    out = points.copy()
    frame = FaceFrame.of(points)
    # 1. Expression, in the face's own shape.
    if eyes is not None:
        _set_eye_openness(out, eyes, RIGHT_EYE_LID_PAIRS, RIGHT_IRIS, (RIGHT_EYE_OUTER, RIGHT_EYE_INNER))
        _set_eye_openness(out, eyes, LEFT_EYE_LID_PAIRS, LEFT_IRIS, (LEFT_EYE_INNER, LEFT_EYE_OUTER))
    if mouth is not None:
        weights = jaw_weights(out)
        width = np.linalg.norm(out[291] - out[61])
        gap = (out[INNER_LIP_LOWER_CENTRE] - out[INNER_LIP_UPPER_CENTRE]) @ frame.down
        # Divide by the lower-lip centre's own weight so that the measured openness hits the target exactly.
        shift = (mouth * width - gap) / weights[INNER_LIP_LOWER_CENTRE]
        out += (shift * weights)[:, None] * frame.down
    # 2. Head pose: yaw and pitch on the pseudo-depth, then the exact in-plane roll.
    if yaw or pitch:
        local = frame.to_local(out)
        depth = _pseudo_depth(points, frame)  # depth of the unedited face: edits above are small in depth
        rotated = np.concatenate([local, depth[:, None]], axis=-1) @ _rotation(yaw, pitch).T
        out = frame.to_pixels(rotated[:, :2])
    if roll:
        turn = np.exp(1j * np.radians(roll))  # y-down pixels: positive angle is clockwise on screen
        centre = complex(*frame.origin)
        out = _real((_complex(out) - centre) * turn + centre).astype(np.float64)
    return out.astype(np.float32)


@dataclass(frozen=True)
class Controls:
    """User expression / pose controls applied to every target frame (see :func:`edit_landmarks`)."""

    eyes: float | None = None
    mouth: float | None = None
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0

    @property
    def is_identity(self) -> bool:
        """True when applying the controls changes nothing."""
        return self.eyes in (None, 1.0) and self.mouth is None and not (self.yaw or self.pitch or self.roll)

    def apply(self, lmk: np.ndarray) -> np.ndarray:
        """``edit_landmarks(lmk, **controls)``; ``(478, 2)`` or ``(T, 478, 2)`` float32."""
        if self.is_identity:
            return np.asarray(lmk, dtype=np.float32)
        return edit_landmarks(lmk, self.eyes, self.mouth, self.yaw, self.pitch, self.roll)


# --- Retargeting: the default motion transfer ---------------------------------------------------------------
#
# `relative_motion` adds the driver's landmark offsets from one reference frame to the source. Two things break it on
# real clips: a reference that is mid-expression (a driver who starts with an open mouth gives a closed-mouth residual
# that pushes the portrait's lips into each other), and residuals in the driver's pixels that ignore how far the
# portrait's own lips and lids are apart. `retarget_motion` therefore (1) takes the driver's most neutral frame as the
# reference (`neutral_frame`) and (2) carries mouth and eye openness across as normalised quantities, placed on the
# portrait's own lips and lids, so that the portrait keeps its lip shape and a driver's full blink closes its eyes.

REFERENCES_HELP = ("auto (the driver's most neutral frame), first, a frame number, or running (the most neutral "
                   "frame so far: frames stream out as the driver's come in)")
# A closed eye still reads as this fraction of the open eye's lid gap to MediaPipe (0.03-0.07 against 0.3-0.45 on
# the shared driving clips): at or below it the portrait's eye is fully closed.
CLOSED_EYE_RATIO = 0.15
MAX_EYE_FACTOR = 1.5  # wider than the reference by at most half: a surprised driver, not a tracker glitch
# Neutral-frame score weights (`neutral_frame`): one unit is about "visibly not neutral".
MOUTH_OPEN_UNIT = 0.1  # mouth openness (gap / width) above the clip's minimum
EYE_CLOSING_UNIT = 0.25  # fraction of the open-eye level lost
SMILE_UNIT = 0.1  # mouth-width growth over the clip's lower-quartile width
YAW_UNIT = 0.15  # nose offset from the eye-corner midpoint, in inter-ocular distances
ROLL_UNIT = np.radians(10.0)


def eye_openness_per_eye(lmk: np.ndarray) -> np.ndarray:
    """Each eye's centre lid gap over its width: ``(..., 478, 2)`` -> ``(..., 2)`` (subject's right, left)."""
    lmk = _check_landmarks(lmk, "lmk")
    eyes = []
    for (upper, lower), (outer, inner) in (((159, 145), (RIGHT_EYE_OUTER, RIGHT_EYE_INNER)),
                                           ((386, 374), (LEFT_EYE_OUTER, LEFT_EYE_INNER))):
        gap = np.linalg.norm(lmk[..., upper, :] - lmk[..., lower, :], axis=-1)
        eyes.append(gap / np.linalg.norm(lmk[..., outer, :] - lmk[..., inner, :], axis=-1))
    return np.stack(eyes, axis=-1)


def mouth_width_ratio(lmk: np.ndarray) -> np.ndarray:
    """Mouth width (outer corners) over the outer eye-corner distance, ``(..., 478, 2)`` -> ``(...)``: grows in a smile."""
    lmk = _check_landmarks(lmk, "lmk")
    mouth = np.linalg.norm(lmk[..., 291, :] - lmk[..., 61, :], axis=-1)
    return mouth / np.linalg.norm(lmk[..., LEFT_EYE_OUTER, :] - lmk[..., RIGHT_EYE_OUTER, :], axis=-1)


def neutral_scores(driving_lmk: np.ndarray) -> np.ndarray:
    """How far each driving frame is from neutral: ``(T, 478, 2)`` -> ``(T,)``, 0 = neutral (see `neutral_frame`).

    The sum, in the units above, of mouth openness over the clip's minimum, eye closing below the clip's open
    level, mouth widening over its lower quartile, yaw from the nose offset and roll from the eye line. The clip
    statistics make the score relative to this driver (every measure is a ratio: any pixel frame works).
    """
    driving_lmk = np.asarray(driving_lmk)
    if driving_lmk.ndim != 3 or len(driving_lmk) == 0:
        raise ValueError(f"driving_lmk must be (T, 478, 2) with T >= 1, got {driving_lmk.shape}")
    # Per-frame measures a chunk at a time: a float64 copy of a 10-minute clip's landmarks would take 115 MB.
    measures = np.concatenate([_frame_measures(_check_landmarks(driving_lmk[start:start + SCORE_CHUNK],
                                                                "driving_lmk"))
                               for start in range(0, len(driving_lmk), SCORE_CHUNK)])  # fmt: skip
    mouth, eyes, width, yaw, roll = measures.T
    open_level = np.percentile(eyes, 80)  # most frames of a clip have open eyes; blinks are the low tail
    narrow = np.percentile(width, 25)  # not the minimum: an "oo" purses the lips narrower than at rest
    return ((mouth - mouth.min()) / MOUTH_OPEN_UNIT
            + np.clip(open_level - eyes, 0.0, None) / (EYE_CLOSING_UNIT * open_level)
            + np.clip(width / narrow - 1.0, 0.0, None) / SMILE_UNIT
            + yaw / YAW_UNIT + roll / ROLL_UNIT)


def _frame_measures(points: np.ndarray) -> np.ndarray:
    """``(T, 478, 2)`` -> ``(T, 5)``: mouth openness, eye openness (mean of both), mouth width ratio, yaw, roll."""
    corners = points[:, [RIGHT_EYE_OUTER, LEFT_EYE_OUTER]]
    eye_line = corners[:, 1] - corners[:, 0]
    ocular = np.linalg.norm(eye_line, axis=-1)
    across = eye_line / ocular[:, None]
    yaw = np.abs(((points[:, NOSE_TIP] - corners.mean(axis=1)) * across).sum(-1)) / ocular
    roll = np.abs(np.arctan2(eye_line[:, 1], eye_line[:, 0]))
    eyes = eye_openness_per_eye(points).mean(axis=-1)
    return np.stack([mouth_openness(points), eyes, mouth_width_ratio(points), yaw, roll], axis=-1)


def neutral_frame(driving_lmk: np.ndarray) -> int:
    """Index of the driver's most neutral frame (mouth closed, eyes open, no smile, frontal and upright): the
    lowest `neutral_scores`, the earliest on ties.

    Args:
        driving_lmk: ``(T, 478, 2)`` driving landmarks.
    """
    return int(np.argmin(neutral_scores(driving_lmk)))


class RunningReference:
    """The neutral reference of a driver seen one frame at a time (live input): `neutral_frame` over a window.

    The reference is the most neutral of the last ``window`` frames, but it changes only when a frame is more
    neutral than the current reference by ``margin`` score units (re-scored on the same window), so the output
    does not jump at every small difference. The first frame is the first reference.
    """

    def __init__(self, window: int = 250, margin: float = 0.5):
        if window < 2:
            raise ValueError(f"window must be at least 2 frames, got {window}")
        self.window, self.margin = window, margin
        self.history: list[np.ndarray] = []
        self.reference: np.ndarray | None = None
        self.changes = 0  # how often the reference moved after the first frame

    def __call__(self, driving_lmk: np.ndarray) -> np.ndarray:
        """Add one ``(478, 2)`` driving frame; returns the current reference ``(478, 2)`` (float64)."""
        points = _check_landmarks(driving_lmk, "driving_lmk")
        self.history = [*self.history[-(self.window - 1):], points]
        if self.reference is None:
            self.reference = points
            return points
        scores = neutral_scores(np.stack([self.reference, *self.history]))
        best = int(np.argmin(scores[1:])) + 1
        if scores[best] < scores[0] - self.margin:
            self.reference = self.history[best - 1]
            self.changes += 1
        return self.reference


def resolve_reference(reference: str | int, driving_lmk: np.ndarray) -> int:
    """The reference frame index for ``reference`` = ``"auto"`` (`neutral_frame`), ``"first"`` or a frame number.

    Raises:
        ValueError: an unknown name, or a frame number outside the clip's ``T`` frames.
    """
    count = len(driving_lmk)
    if reference == "auto":
        return neutral_frame(driving_lmk)
    if reference == "first":
        return 0
    if isinstance(reference, str):
        try:
            reference = int(reference)
        except ValueError:
            raise ValueError(f"reference must be auto, first or a frame number, got {reference!r}") from None
    if not 0 <= reference < count:
        raise ValueError(f"reference frame {reference} is outside the driving clip's {count} frames")
    return int(reference)


def _lip_gap(lmk: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Inner-lip gap at the centre along ``down``, ``(..., 478, 2)`` -> ``(...)`` pixels (negative: overlapping)."""
    return (lmk[..., INNER_LIP_LOWER_CENTRE, :] - lmk[..., INNER_LIP_UPPER_CENTRE, :]) @ down


def _retarget_mouth(expression: np.ndarray, source: np.ndarray, openness: np.ndarray) -> None:
    """Set the mouth openness of ``expression`` (T, 478, 2), source-frame pixels, to ``openness`` (T,), in place.

    The lower lip and jaw move along the source face's down axis, weighted by the source's `jaw_weights` (as
    `edit_landmarks(mouth=...)`); then inner-lip points that crossed are met half-way, so lips never cross.
    """
    down = FaceFrame.of(source).down
    weights = jaw_weights(source)
    width = np.linalg.norm(expression[:, 291] - expression[:, 61], axis=-1)
    gap = _lip_gap(expression, down)
    shift = (openness * width - gap) / weights[INNER_LIP_LOWER_CENTRE]
    expression += shift[:, None, None] * weights[None, :, None] * down
    upper, lower = list(LIPS_INNER_UPPER[1:-1]), list(LIPS_INNER_LOWER[1:-1])  # corners are shared points
    # A closed mouth's inner lips can overlap a little in the source itself: allow that much, no more.
    allowed = np.minimum((source[lower] - source[upper]) @ down, 0.0)  # (9,)
    overlap = np.clip(allowed - (expression[:, lower] - expression[:, upper]) @ down, 0.0, None)  # (T, 9)
    expression[:, upper] -= 0.5 * overlap[..., None] * down
    expression[:, lower] += 0.5 * overlap[..., None] * down


def _retarget_eye(expression: np.ndarray, source: np.ndarray, factor: np.ndarray, lid_pairs, iris, corners) -> None:
    """Give one eye of ``expression`` (T, 478, 2) the source's lid gaps times ``factor`` (T,), in place.

    The lids meet where `LID_MEET` puts them between the expression's own lids; the iris is squashed towards that
    line when the eye closes (as in `edit_landmarks`), never stretched.
    """
    upper, lower = [u for u, _ in lid_pairs], [d for _, d in lid_pairs]
    source_gap = source[upper] - source[lower]  # (P, 2)
    meet = expression[:, lower] + LID_MEET * (expression[:, upper] - expression[:, lower])  # (T, P, 2)
    expression[:, upper] = meet + (1 - LID_MEET) * factor[:, None, None] * source_gap
    expression[:, lower] = meet - LID_MEET * factor[:, None, None] * source_gap
    axis = expression[:, corners[1]] - expression[:, corners[0]]
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    normal = np.stack([-axis[:, 1], axis[:, 0]], axis=-1)  # (T, 2)
    centre = meet[:, len(lid_pairs) // 2]  # (T, 2)
    offsets = ((expression[:, list(iris)] - centre[:, None]) * normal[:, None]).sum(-1)  # (T, 5)
    squash = 1.0 - np.minimum(factor, 1.0)
    expression[:, list(iris)] -= (squash[:, None] * offsets)[..., None] * normal[:, None]


def retarget_motion(source_lmk: np.ndarray, driving_lmk: np.ndarray, reference: int,
                    expression_scale: float = 1.0, regions: bool = True) -> np.ndarray:
    """The default motion transfer: `relative_motion` from a reference frame, then mouth and eyes retargeted.

    1. Head pose and the expression residual as `relative_motion` (the residual times ``expression_scale``).
    2. Mouth (``regions``): the portrait's openness plus the driver's change of openness since the reference,
       ``m_S + s (m_D(t) - m_D(ref))`` (openness = inner-lip gap over mouth width, so it carries across face
       sizes), never below closed; placed on the portrait's lips by moving its jaw.
    3. Eyes (``regions``), each on its own: the driver's lid gap relative to the reference's, rescaled so that
       `CLOSED_EYE_RATIO` (what a closed eye reads as) is 0, times the portrait's own lid gaps.

    Args:
        source_lmk: ``(478, 2)`` source landmarks.
        driving_lmk: ``(T, 478, 2)`` driving landmarks.
        reference: index of the driver's reference frame (`resolve_reference`).
        expression_scale: strength of the expression (0 = the portrait's own, 1 = the driver's change, > 1
            exaggerated); head pose is not scaled.
        regions: False gives plain `relative_motion` (with the scaled residual).

    Returns:
        ``float32`` ``(T, 478, 2)`` target landmarks in the source's pixels.
    """
    source = _check_landmarks(source_lmk, "source_lmk")
    driving = _check_landmarks(driving_lmk, "driving_lmk")
    if source.ndim != 2 or driving.ndim != 3:
        raise ValueError(f"source_lmk must be (478, 2) and driving_lmk (T, 478, 2), got {source.shape}, {driving.shape}")
    if not 0 <= reference < len(driving):
        raise ValueError(f"reference {reference} is outside the {len(driving)} driving frames")
    if not np.isfinite(expression_scale) or expression_scale < 0:
        raise ValueError(f"expression_scale must be >= 0, got {expression_scale}")
    # 1. Expression in the source's frame (`relative_motion` steps 1-3), then the pose (its step 4) at the end.
    residual, pose = _residual_and_pose(source, driving, driving[reference])
    expression = _real(_complex(source) + expression_scale * residual).astype(np.float64)  # (T, 478, 2)
    if regions:
        # 2. Mouth.
        driver_mouth = mouth_openness(driving)
        # The source's own openness measured as `_retarget_mouth` sets it, so a still driver changes nothing.
        source_mouth = _lip_gap(source, FaceFrame.of(source).down) / np.linalg.norm(source[291] - source[61])
        openness = source_mouth + expression_scale * (driver_mouth - driver_mouth[reference])
        _retarget_mouth(expression, source, np.clip(openness, min(source_mouth, 0.0), None))
        # 3. Eyes.
        driver_eyes = eye_openness_per_eye(driving)  # (T, 2)
        relative = driver_eyes / np.maximum(driver_eyes[reference], 1e-6)
        factors = np.clip((relative - CLOSED_EYE_RATIO) / (1 - CLOSED_EYE_RATIO), 0.0, MAX_EYE_FACTOR)
        factors = np.clip(1.0 + expression_scale * (factors - 1.0), 0.0, None)
        _retarget_eye(expression, source, factors[:, 0], RIGHT_EYE_LID_PAIRS, RIGHT_IRIS,
                      (RIGHT_EYE_OUTER, RIGHT_EYE_INNER))
        _retarget_eye(expression, source, factors[:, 1], LEFT_EYE_LID_PAIRS, LEFT_IRIS,
                      (LEFT_EYE_INNER, LEFT_EYE_OUTER))
    # 4. Pose: A ∘ M ∘ A⁻¹, as in `relative_motion`.
    return _real(_posed(_complex(expression), pose))
