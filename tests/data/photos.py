"""Real photographs for the data tests, taken from wheels the tests install.

A pytest plugin (``pytest_plugins`` in tests/conftest.py), so its fixtures reach every test;
import the helpers with ``from tests.data.photos import write_folder, decode_reference``.

* scikit-learn ``datasets/images/china.jpg`` and ``flower.jpg`` (427x640 colour JPEGs);
* scikit-image ``data/``: ``rocket.jpg``, ``retina.jpg`` (JPEG) and ``astronaut.png`` (PNG);
* derived with PIL: a progressive JPEG, a grayscale JPEG, an odd-sized crop;
* broken on purpose: a truncated JPEG and a text file named ``.jpg``.

The photos are shrunk (PIL thumbnail) so the tests decode quickly; every derived file is
re-encoded by PIL, so its decode is the reference.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image")


def _wheel_file(module: str, *parts: str) -> Path:
    mod = pytest.importorskip(module)
    path = Path(os.path.dirname(mod.__file__), *parts)
    assert path.is_file(), f"{path} is missing from the {module} wheel"
    return path


def _jpeg(img, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", **kw)
    return out.getvalue()


@pytest.fixture(scope="session")
def real_images() -> dict[str, bytes]:
    """name -> encoded bytes of real, decodable photographs (JPEG and PNG)."""
    from PIL import Image

    out: dict[str, bytes] = {}
    srcs = {
        "china": _wheel_file("sklearn", "datasets", "images", "china.jpg"),
        "flower": _wheel_file("sklearn", "datasets", "images", "flower.jpg"),
        "rocket": _wheel_file("skimage", "data", "rocket.jpg"),
        "retina": _wheel_file("skimage", "data", "retina.jpg"),
    }
    for name, path in srcs.items():
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((160, 160))
            out[name] = _jpeg(im, quality=90)
    # The original file bytes too: the photos as their authors' encoders wrote them.
    out["china_original"] = srcs["china"].read_bytes()
    with Image.open(_wheel_file("skimage", "data", "astronaut.png")) as im:
        im = im.convert("RGB")
        im.thumbnail((96, 96))
        png = io.BytesIO()
        im.save(png, "PNG")
        out["astronaut_png"] = png.getvalue()
    with Image.open(srcs["flower"]) as im:
        im = im.convert("RGB")
        im.thumbnail((150, 150))
        out["flower_progressive"] = _jpeg(im, quality=85, progressive=True)
        out["flower_gray"] = _jpeg(im.convert("L"), quality=90)
        out["flower_odd"] = _jpeg(im.crop((3, 5, 3 + 37, 5 + 53)), quality=90)  # 37x53: odd sizes
    return out


@pytest.fixture(scope="session")
def broken_images(real_images) -> dict[str, bytes]:
    """name -> bytes that no decoder can turn into a whole image."""
    jpg = real_images["china"]
    return {"truncated": jpg[: len(jpg) // 2], "not_an_image": b"this is a text file, not a JPEG\n" * 4}


def write_folder(root: Path, images: dict[str, bytes], classes: int = 2) -> list[Path]:
    """Writes ``images`` into ``root/class_<k>/<name>.<ext>`` round-robin; returns the paths."""
    paths = []
    for i, (name, data) in enumerate(sorted(images.items())):
        d = root / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        ext = ".png" if data[:4] == b"\x89PNG" else ".jpg"
        p = d / f"{name}{ext}"
        p.write_bytes(data)
        paths.append(p)
    return paths


def decode_reference(data: bytes) -> np.ndarray:
    """PIL's RGB decode, (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
