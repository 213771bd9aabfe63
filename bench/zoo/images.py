"""Real inputs for the zoo: scikit-image's sample photos (shipped with the package, no network),
cropped and resized per model, and token ids from a fixed sentence list. Never random data alone.

Runs under the GPU machine's python3 (numpy, scikit-image, pillow); no torch needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

# skimage.data photos that ship inside the package (the others are fetched with pooch: no network).
RGB_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
             "colorwheel", "logo", "motorcycle")
GRAY_NAMES = ("camera", "text", "page", "coins", "moon", "clock", "brick", "grass", "gravel", "horse")

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "tensorrt builds an engine from an onnx model for one gpu",
    "a photograph of an astronaut standing next to a flag",
    "the cat sat on the warm windowsill and watched the rain",
    "calibration data should look like the data the model will see",
    "engines are published to the bucket with a manifest",
    "coffee in a white cup on a saucer with a spoon",
    "a rocket lifts off from the launch pad into a clear sky",
    "the model converts text into a sequence of hidden states",
    "accuracy is checked against onnx runtime on the cpu",
    "every failure names the node the limit and the fix",
    "dynamic shapes need a profile with min opt and max sizes",
)


def _load(name: str) -> np.ndarray:
    from skimage import data

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()


def photos() -> List[np.ndarray]:
    """The RGB sample photos as uint8 HxWx3 (grey ones stacked to 3 channels), those that load."""
    out = []
    for name in RGB_NAMES + GRAY_NAMES:
        try:
            img = np.asarray(_load(name))
        except Exception:  # noqa: BLE001 - a sample missing from this scikit-image: use the others
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-6)).astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3]))
    if len(out) < 4:
        raise RuntimeError(f"only {len(out)} scikit-image sample photos could be loaded; the zoo needs real images")
    return out


def crops(count: int, size: Tuple[int, int], seed: int) -> List[np.ndarray]:
    """``count`` uint8 HxWx3 crops of the photos at several scales and flips, resized to ``size``."""
    rng = np.random.default_rng(seed)
    imgs = photos()
    out = []
    for i in range(count):
        img = imgs[i % len(imgs)]
        h, w = img.shape[:2]
        scale = rng.uniform(0.5, 1.0)
        ch, cw = max(16, int(h * scale)), max(16, int(w * scale))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size[1], size[0]), Image.BILINEAR)))
    return out


def to_tensor(batch: Sequence[np.ndarray], mean: Sequence[float] = (0.0, 0.0, 0.0),
              std: Sequence[float] = (1.0, 1.0, 1.0), dtype=np.float32) -> np.ndarray:
    """uint8 HxWx3 images -> NCHW float, x/255 then (x - mean) / std (the spec's preprocess)."""
    arr = np.stack(batch).astype(np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2)).astype(dtype)


def save_pngs(images: Sequence[np.ndarray], folder: Path, stem: str = "img") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        # compress_level 1: default zlib level makes 64 640x640 PNGs take ~35 s; lossless either way
        Image.fromarray(img).save(folder / f"{stem}-{i:03d}.png", compress_level=1)


def text_strips(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """Grey crops of skimage.data.text() (a photographed text page) as [count, 1, height, width]
    float32 in [0, 1]: what a text recogniser reads."""
    from skimage import data

    page = np.asarray(data.text(), np.float32) / 255.0
    rng = np.random.default_rng(seed)
    h, w = page.shape
    out = []
    for _ in range(count):
        ch = int(rng.integers(20, min(48, h)))
        cw = int(rng.integers(max(ch * 2, 64), w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        strip = Image.fromarray((page[y:y + ch, x:x + cw] * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
        out.append(np.asarray(strip, np.float32)[None] / 255.0)
    return np.stack(out).astype(np.float32)


def token_batches(count: int, seq: int, vocab: int) -> Dict[str, np.ndarray]:
    """input_ids/attention_mask int64 [count, seq] from SENTENCES: a word-level vocabulary built from
    the sentences themselves (no tokenizer file is reachable), with BERT's special ids
    ([PAD]=0, [CLS]=101, [SEP]=102) and words from id 1000 on."""
    words = sorted({w for s in SENTENCES for w in s.split()})
    index = {w: 1000 + i % max(vocab - 1000, 1) for i, w in enumerate(words)}
    ids = np.zeros((count, seq), np.int64)
    mask = np.zeros((count, seq), np.int64)
    for i in range(count):
        toks = [101] + [index[w] for w in SENTENCES[i % len(SENTENCES)].split()]
        toks += [index[w] for w in SENTENCES[(i + 1) % len(SENTENCES)].split()]  # a second sentence
        toks = (toks + [102])[:seq]
        ids[i, :len(toks)] = toks
        mask[i, :len(toks)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def sequence_features(count: int, steps: int, features: int, seed: int) -> np.ndarray:
    """[count, steps, features] float32: rows of the grey photos as time steps (a real, structured
    signal for the sequence model; there is no audio sample to make spectrograms from)."""
    rng = np.random.default_rng(seed)
    imgs = [img.mean(axis=-1) for img in photos()]
    out = []
    for i in range(count):
        img = np.asarray(Image.fromarray(imgs[i % len(imgs)].astype(np.uint8)).resize((features, steps)), np.float32)
        if rng.random() < 0.5:
            img = img[::-1]
        out.append((img - img.mean()) / (img.std() + 1e-6))
    return np.stack(out).astype(np.float32)
