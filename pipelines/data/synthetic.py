"""The embedded default data set: procedural clips whose classes differ in time-frequency structure.

Nothing is downloaded. Each clip is a class event hidden at a random time inside a pink or brown noise bed and 1-3
background events from a separate distractor family, at a variable SNR and a random overall gain, so an encoder has
to find a structured part of the clip: loudness, duration and position carry no label. Two class sets:

- ``events``: eight kinds of sound (chirps, harmonic stacks, click trains, ...), one 0.3-0.6 s event per clip.
- ``sequences``: eight two-part calls (0.6-0.9 s) made of four sounds, in four pairs that share their sounds and
  differ only in order ("harmonic then noise" and "noise then harmonic"), as spoken words share phonemes. What a
  clip holds, averaged over time, tells at most the pair: a bag-of-frames classifier stays near one half, and only
  an encoder that relates one part of the clip to the next can name the class.

Every clip is drawn from its own generator, seeded by (seed, split, clip number), so the set is reproducible
byte for byte and a clip does not change when the size of another split changes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

# Bump when the generated audio changes for the same parameters: existing sets are then regenerated.
GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic.json"
SPLITS = ("train", "valid", "test")
DEFAULT_PARAMS: dict[str, Any] = dict(
    num_train=640, num_valid=160, num_test=160, seed=0, clip_seconds=2.56, sample_rate=16_000,
    snr_min_db=-3.0, snr_max_db=9.0,  # the event's level over the background: the task's difficulty
    classes="events",  # the class set: "events" or "sequences" (the module's docstring)
)
EVENT_SECONDS = (0.3, 0.6)  # an "events" clip's class event
SEQUENCE_SECONDS = (0.6, 0.9)  # a "sequences" clip's call, both parts
FIRST_PART = (0.4, 0.6)  # the share of a call its first part takes
# Random overall gain, set on the clip's RMS, not its peak: peak normalisation would make peaky classes (clicks)
# quieter on average, a loudness cue. The peak is then capped below full scale (PCM-16 never clips), which only
# ever touches the loudest few click trains.
RMS_DBFS = (-36.0, -20.0)
MAX_PEAK = 0.95
RAMP_SECONDS = 0.015  # raised-cosine fade at both ends of every event: no broadband clicks that give it away
MAX_EVENT_HZ = 6000.0  # every partial stays well below the 8 kHz Nyquist of 16 kHz audio


# --- small signal helpers ------------------------------------------------------------------------------------

def _ramp(n: int, sample_rate: int, seconds: float = RAMP_SECONDS) -> np.ndarray:
    """Tukey envelope of n samples: raised-cosine fade-in and fade-out of ``seconds`` each."""
    env = np.ones(n, dtype=np.float64)
    r = min(int(seconds * sample_rate), n // 2)
    if r > 0:
        fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
        env[:r] = fade
        env[n - r:] = fade[::-1]
    return env


def _tone_from_frequency(freq: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Sinusoid following an instantaneous-frequency track (Hz per sample), phase-continuous."""
    phase = 2 * np.pi * np.cumsum(freq) / sample_rate + rng.uniform(0, 2 * np.pi)
    return np.sin(phase)


def _shaped_noise(n: int, sample_rate: int, rng: np.random.Generator, *, exponent: float = 0.0,
                  band: tuple[float, float] | None = None) -> np.ndarray:
    """Gaussian noise with its amplitude spectrum scaled by f^-exponent (0.5 pink, 1 brown), optionally band-limited.

    Drawn directly in the frequency domain (white noise's spectrum is complex Gaussian): one FFT instead of two.
    """
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    low, high = band if band is not None else (20.0, sample_rate / 2)
    keep = (freqs >= max(low, 20.0)) & (freqs <= high)  # >= 20 Hz: no DC, no sub-audio drift in brown noise
    spectrum = np.zeros(len(freqs), dtype=np.complex128)
    count = int(keep.sum())
    spectrum[keep] = (rng.standard_normal(count) + 1j * rng.standard_normal(count)) * freqs[keep] ** -exponent
    return np.fft.irfft(spectrum, n)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)) + 1e-20))


# --- class events: each returns n samples of unit-free signal; the envelope and level are applied later ---------

def _rising_chirp(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0, ratio = rng.uniform(250, 700), rng.uniform(3, 6)
    return _tone_from_frequency(f0 * ratio ** (np.arange(n) / n), sr, rng)


def _falling_chirp(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0, ratio = rng.uniform(250, 700), rng.uniform(3, 6)
    return _tone_from_frequency(f0 * ratio ** (1 - np.arange(n) / n), sr, rng)


def _harmonic_stack(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0 = rng.uniform(120, 300)
    k = np.arange(1, int(min(12, MAX_EVENT_HZ // f0)) + 1)[:, None]  # (K, 1)
    t = np.arange(n)[None, :] / sr  # (1, n)
    partials = np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi, size=k.shape)) / k  # (K, n)
    return partials.sum(axis=0)


def _tremolo_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    carrier, rate = rng.uniform(500, 3000), rng.uniform(6, 12)
    t = np.arange(n) / sr
    # Deep amplitude modulation: 6-12 Hz is 8-16 fbank frames per cycle, visible as a pulsing line.
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    return envelope * _tone_from_frequency(np.full(n, carrier), sr, rng)


def _click_train(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    rate = rng.uniform(8, 16)
    period = sr / rate
    impulses = np.zeros(n)
    impulses[(np.arange(rng.uniform(0, period), n, period)).astype(int)] = 1.0
    kernel_n = int(0.006 * sr)  # each click: a 6 ms exponentially decaying broadband burst
    kernel = rng.standard_normal(kernel_n) * np.exp(-np.arange(kernel_n) / (0.3 * kernel_n))
    return np.convolve(impulses, kernel)[:n]


def _noise_band(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    centre = rng.uniform(800, 4000)
    half_third_octave = 2 ** (1 / 6)
    return _shaped_noise(n, sr, rng, band=(centre / half_third_octave, centre * half_third_octave))


def _two_tone_alternation(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    low = rng.uniform(400, 1500)
    high = low * rng.uniform(1.4, 2.0)
    segment = int(rng.uniform(0.05, 0.09) * sr)
    which = (np.arange(n) // segment) % 2  # 0, 0, ..., 1, 1, ..., 0, ...
    return _tone_from_frequency(np.where(which == 0, low, high), sr, rng)


def _vibrato_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    carrier, rate, depth = rng.uniform(600, 2500), rng.uniform(5, 8), rng.uniform(0.04, 0.08)
    t = np.arange(n) / sr
    return _tone_from_frequency(carrier * (1 + depth * np.sin(2 * np.pi * rate * t)), sr, rng)


EVENTS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "rising_chirp": _rising_chirp,
    "falling_chirp": _falling_chirp,
    "harmonic_stack": _harmonic_stack,
    "tremolo_tone": _tremolo_tone,
    "click_train": _click_train,
    "noise_band": _noise_band,
    "two_tone_alternation": _two_tone_alternation,
    "vibrato_tone": _vibrato_tone,
}
CLASS_NAMES: tuple[str, ...] = tuple(EVENTS)


# --- sequences: two sounds in a fixed order ---------------------------------------------------------------------

PARTS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "harmonic": _harmonic_stack, "noise": _noise_band, "clicks": _click_train, "tremolo": _tremolo_tone,
}
# Four pairs of sounds, each in both orders: every sound opens two calls and closes two.
SEQUENCE_ORDERS = (("harmonic", "noise"), ("noise", "harmonic"), ("clicks", "tremolo"), ("tremolo", "clicks"),
                   ("harmonic", "clicks"), ("clicks", "harmonic"), ("noise", "tremolo"), ("tremolo", "noise"))


def _sequence(first: str, second: str) -> Callable[[int, int, np.random.Generator], np.ndarray]:
    """A call of n samples: ``first`` for 40-60 % of it, then ``second``; each part faded and at unit RMS, so the
    two halves are equally loud and only their order tells the pair's classes apart."""
    def call(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
        k = int(n * rng.uniform(*FIRST_PART))
        parts = [PARTS[name](m, sr, rng) * _ramp(m, sr) for name, m in ((first, k), (second, n - k))]
        return np.concatenate([part / _rms(part) for part in parts])
    return call


SEQUENCES: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    f"{a}_then_{b}": _sequence(a, b) for a, b in SEQUENCE_ORDERS}
# name -> (class events, the event's duration range in seconds)
CLASS_SETS: dict[str, tuple[dict[str, Callable], tuple[float, float]]] = {
    "events": (EVENTS, EVENT_SECONDS), "sequences": (SEQUENCES, SEQUENCE_SECONDS)}


def class_names(classes: str = "events") -> tuple[str, ...]:
    """The class names of a class set, in label order."""
    return tuple(_class_set(classes)[0])


def _class_set(classes: str) -> tuple[dict[str, Callable], tuple[float, float]]:
    if classes not in CLASS_SETS:
        raise ValueError(f"classes={classes!r} is not allowed: expected one of {sorted(CLASS_SETS)}")
    return CLASS_SETS[classes]


# --- distractors: a separate family (short steady tones, noise bursts outside the class bands) --------------------

def _distractor(n_clip: int, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One background event: (samples, start sample). Short enough never to look like a whole class event."""
    n = min(int(rng.uniform(0.05, 0.25) * sr), n_clip)
    if rng.random() < 0.5:
        signal = _tone_from_frequency(np.full(n, rng.uniform(200, 5000)), sr, rng) * np.hanning(n)
    else:
        band = (50.0, 400.0) if rng.random() < 0.5 else (5000.0, min(7500.0, 0.47 * sr))
        signal = _shaped_noise(n, sr, rng, band=band) * _ramp(n, sr)
    return signal / _rms(signal), int(rng.integers(0, n_clip - n + 1))


def _background(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Pink or brown noise bed at unit RMS plus 1-3 distractor events at 0.5-2x its level."""
    bed = _shaped_noise(n, sr, rng, exponent=0.5 if rng.random() < 0.5 else 1.0)
    bed /= _rms(bed)
    for _ in range(int(rng.integers(1, 4))):
        signal, start = _distractor(n, sr, rng)
        bed[start:start + len(signal)] += rng.uniform(0.5, 2.0) * signal
    return bed


def generate_clip(
    class_index: int, rng: np.random.Generator, clip_seconds: float = 2.56, sample_rate: int = 16_000,
    snr_db: tuple[float, float] = (DEFAULT_PARAMS["snr_min_db"], DEFAULT_PARAMS["snr_max_db"]),
    classes: str = "events",
) -> tuple[np.ndarray, tuple[float, float]]:
    """One clip of class ``class_index`` of the class set ``classes``: (waveform float32 (samples,),
    (event_start_s, event_end_s)).

    The event's RMS over its own span is ``snr_db`` (default -3..+9 dB) relative to the background's RMS over the whole clip; the
    mixture is then scaled to a random RMS between -36 and -20 dBFS, its peak capped at 0.95.
    """
    events, seconds = _class_set(classes)
    names = tuple(events)
    if not 0 <= class_index < len(names):
        raise ValueError(f"class_index={class_index} is not allowed: expected 0..{len(names) - 1}")
    _check_geometry(clip_seconds, sample_rate, classes)
    n_clip = int(round(clip_seconds * sample_rate))
    n_event = int(rng.uniform(*seconds) * sample_rate)
    event = events[names[class_index]](n_event, sample_rate, rng) * _ramp(n_event, sample_rate)
    start = int(rng.integers(0, n_clip - n_event + 1))

    mix = _background(n_clip, sample_rate, rng)
    level_db = rng.uniform(*snr_db)
    mix[start:start + n_event] += event * (_rms(mix) * 10 ** (level_db / 20) / _rms(event))
    mix *= 10 ** (rng.uniform(*RMS_DBFS) / 20) / _rms(mix)
    mix *= min(1.0, MAX_PEAK / np.max(np.abs(mix)))
    return mix.astype(np.float32), (start / sample_rate, (start + n_event) / sample_rate)


def _check_geometry(clip_seconds: float, sample_rate: int, classes: str = "events") -> None:
    longest = _class_set(classes)[1][1]
    if sample_rate < 16_000:
        raise ValueError(f"sample_rate={sample_rate} is not allowed: the events need at least 16000 Hz")
    if clip_seconds < longest:
        raise ValueError(f"clip_seconds={clip_seconds} is not allowed: must hold a {longest} s event")


# --- the data set on disk ------------------------------------------------------------------------------------

def resolve_params(**options: Any) -> dict[str, Any]:
    """Defaults overridden by ``options``, coerced to their types (options may arrive as CLI strings)."""
    unknown = sorted(set(options) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"unknown synthetic option(s) {unknown}; allowed: {sorted(DEFAULT_PARAMS)}")
    params = {}
    for key, default in DEFAULT_PARAMS.items():
        value = options.get(key, default)
        try:
            params[key] = type(default)(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not allowed: expected {type(default).__name__}") from None
    for key in ("num_train", "num_valid", "num_test"):
        if params[key] < 0:
            raise ValueError(f"{key}={params[key]} is not allowed: expected a count >= 0")
    if params["num_train"] + params["num_valid"] + params["num_test"] == 0:
        raise ValueError("synthetic data set with no clips: set num_train, num_valid or num_test above 0")
    _check_geometry(params["clip_seconds"], params["sample_rate"], params["classes"])
    if params["snr_min_db"] > params["snr_max_db"]:
        raise ValueError(f"snr_min_db={params['snr_min_db']} is not allowed: expected <= snr_max_db "
                         f"({params['snr_max_db']})")
    return params


def _clip_plan(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every clip's id, split, file and label; labels cycle through the classes so each split is balanced."""
    plan = []
    count = len(class_names(params["classes"]))
    for split_number, split in enumerate(SPLITS):
        for i in range(params[f"num_{split}"]):
            plan.append(dict(id=f"{split}/{i:05d}", split=split, file=f"{split}/{i:05d}.wav",
                             label=i % count, rng_key=[params["seed"], split_number, i]))
    return plan


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a generated set in ``root``, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_current(manifest: dict[str, Any] | None, root: Path, params: dict[str, Any]) -> bool:
    return (manifest is not None and manifest.get("generator_version") == GENERATOR_VERSION
            and manifest.get("params") == params
            and all((root / clip["file"]).is_file() for clip in manifest.get("clips", [])))


def _prepare_folder(root: Path) -> None:
    """Remove a previous generation; refuse to write into a folder that holds anything else."""
    ours = (*SPLITS, MANIFEST_NAME, MANIFEST_NAME + ".tmp")
    foreign = sorted(p.name for p in root.iterdir() if p.name not in ours)
    if foreign:
        raise ValueError(f"refusing to generate the synthetic data set into {root}: it holds other files "
                         f"({', '.join(foreign[:5])}); pass an empty or new folder")
    # Drop the manifest first: an interrupted generation then leaves no manifest and is redone next time.
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        if (root / split).is_dir():
            shutil.rmtree(root / split)


def _wav_bytes(wav: np.ndarray, sample_rate: int) -> bytes:
    """PCM-16 WAV encoded in memory: writing through libsndfile directly fsyncs every file, 3x slower here."""
    buffer = io.BytesIO()
    sf.write(buffer, wav, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def ensure_dataset(root: str | Path, **options: Any) -> dict[str, Any]:
    """Generate the set into ``root`` unless a manifest with the same parameters is already there; return it.

    The manifest (``synthetic.json``) records the generator version, the parameters, the class names and every
    clip's id, split, relative file, label and event span.
    """
    root = Path(os.path.abspath(os.path.expanduser(str(root))))
    params = resolve_params(**options)
    old = read_manifest(root) if root.is_dir() else None
    if _is_current(old, root, params):
        return old
    root.mkdir(parents=True, exist_ok=True)
    _prepare_folder(root)

    clips = []
    for entry in _clip_plan(params):
        rng = np.random.default_rng(entry.pop("rng_key"))
        wav, event = generate_clip(entry["label"], rng, params["clip_seconds"], params["sample_rate"],
                                   (params["snr_min_db"], params["snr_max_db"]), params["classes"])
        path = root / entry["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_wav_bytes(wav, params["sample_rate"]))
        clips.append({**entry, "event": list(event)})

    manifest = dict(generator_version=GENERATOR_VERSION, params=params, class_names=list(class_names(params["classes"])),
                    clips=clips)
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST_NAME)
    return manifest
