"""A scripted talking-head motion made from a portrait's own landmarks: speech, blinks, a head turn and a nod.

It drives the built-in demo (no driving video needed) and serves tests and evaluations that need a plausible
motion for any face. Everything is a smooth function of time, so any frame rate gives the same motion, and
frame 0 is the portrait exactly as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metaportrait.motion import edit_landmarks, mouth_openness

DEMO_FPS = 25.0
DEMO_SECONDS = 4.0

# Head pose keyframes (seconds, degrees), eased in and out between keys: turn right, turn left, back, then a nod.
YAW_KEYS = ((0.0, 0.0), (0.3, 0.0), (1.1, 12.0), (2.0, -12.0), (2.7, 0.0))
PITCH_KEYS = ((0.0, 0.0), (2.8, 0.0), (3.15, 8.0), (3.5, -3.0), (3.8, 0.0))
ROLL_KEYS = ((0.0, 0.0), (0.3, 0.0), (1.1, -3.0), (2.0, 3.0), (2.7, 0.0))
BLINK_TIMES = (0.9, 2.5, 3.6)  # seconds at which the lids are fully closed
BLINK_SECONDS = 0.24  # one blink, open to open
# Speech: syllables of SYLLABLE_SECONDS within two phrases; each opens the mouth by its amplitude (added to the
# portrait's own openness, in units of mouth_openness) and closes it again.
PHRASES = ((0.2, 1.8), (2.3, 3.8))
SYLLABLE_SECONDS = 0.2
SYLLABLE_AMPLITUDES = (0.22, 0.38, 0.16, 0.3, 0.42, 0.2, 0.28, 0.12)


@dataclass(frozen=True)
class ScriptCurves:
    """Per-frame values of the script, each ``float64`` ``(T,)``."""

    talk: np.ndarray  # mouth opening added to the portrait's own openness (>= 0)
    eyes: np.ndarray  # eye-openness factor (1 open, 0 closed)
    yaw: np.ndarray  # degrees
    pitch: np.ndarray  # degrees
    roll: np.ndarray  # degrees


def _eased(keys: tuple[tuple[float, float], ...], times: np.ndarray) -> np.ndarray:
    """Piecewise smoothstep interpolation through ``(time, value)`` keys; constant outside them."""
    key_times = np.array([k[0] for k in keys])
    key_values = np.array([k[1] for k in keys])
    segment = np.clip(np.searchsorted(key_times, times, side="right") - 1, 0, len(keys) - 2)
    span = key_times[segment + 1] - key_times[segment]
    u = np.clip((times - key_times[segment]) / span, 0.0, 1.0)
    u = u * u * (3.0 - 2.0 * u)  # zero velocity at every key: no jerks at the turning points
    return key_values[segment] + u * (key_values[segment + 1] - key_values[segment])


def script_curves(num_frames: int = round(DEMO_FPS * DEMO_SECONDS), fps: float = DEMO_FPS) -> ScriptCurves:
    """The script sampled at ``fps`` for ``num_frames`` frames (default: 4 s at 25 fps)."""
    if num_frames < 1 or fps <= 0:
        raise ValueError(f"need num_frames >= 1 and fps > 0, got {num_frames} and {fps}")
    times = np.arange(num_frames) / fps
    talk = np.zeros(num_frames)
    syllable = 0
    for start, end in PHRASES:
        for onset in np.arange(start, end - SYLLABLE_SECONDS + 1e-9, SYLLABLE_SECONDS):
            phase = (times - onset) / SYLLABLE_SECONDS
            inside = (phase >= 0) & (phase <= 1)
            amplitude = SYLLABLE_AMPLITUDES[syllable % len(SYLLABLE_AMPLITUDES)]
            talk[inside] = amplitude * np.sin(np.pi * phase[inside])
            syllable += 1
    closed = np.zeros(num_frames)
    for blink in BLINK_TIMES:
        phase = np.clip((times - blink) / (BLINK_SECONDS / 2), -1.0, 1.0)  # -1..1 over the blink
        closed = np.maximum(closed, 0.5 * (1.0 + np.cos(np.pi * phase)))
    return ScriptCurves(
        talk=talk,
        eyes=1.0 - closed,
        yaw=_eased(YAW_KEYS, times),
        pitch=_eased(PITCH_KEYS, times),
        roll=_eased(ROLL_KEYS, times),
    )


def scripted_motion(source_landmarks: np.ndarray, num_frames: int = round(DEMO_FPS * DEMO_SECONDS),
                    fps: float = DEMO_FPS) -> np.ndarray:
    """Target landmarks of the portrait performing the script.

    Args:
        source_landmarks: ``(478, 2)`` landmarks of the portrait, in pixels.
        num_frames, fps: length and frame rate (default 4 s at 25 fps).

    Returns:
        ``float32`` ``(num_frames, 478, 2)`` in the same pixels; frame 0 equals ``source_landmarks``.
    """
    curves = script_curves(num_frames, fps)
    rest = float(mouth_openness(source_landmarks))
    frames = []
    for i in range(num_frames):
        # Speech opens the mouth relative to the portrait's own openness, so frame 0 is the portrait unchanged.
        mouth = rest + curves.talk[i] if curves.talk[i] > 0 else None
        frames.append(edit_landmarks(source_landmarks, eyes=curves.eyes[i], mouth=mouth, yaw=curves.yaw[i],
                                     pitch=curves.pitch[i], roll=curves.roll[i]))
    return np.stack(frames).astype(np.float32)
