"""Image grids that say what they show: every row of images carries its label, drawn in a column on its left.

    grid = labelled_grid([("base", base_images), ("after 60 steps", lora_images)], title="a red circle")

Text is drawn with PIL's default font (no font files to download). Images are PIL images or tensors
`[3, H, W]` in [0, 1]; tiles take the first image's size, and small ones (toy models render 32 px) are
enlarged by an integer factor, nearest neighbour, so pixels stay pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LABEL_MARGIN, TILE_GAP = 6, 2  # pixels: around labels, between tiles
BACKGROUND, INK = "white", "black"


def to_pil(image: Any):
    """A tensor `[3, H, W]` in [0, 1] (or a PIL image) as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    """PIL's bitmap fallback font (no FreeType) takes latin-1 only: replace what it cannot draw."""
    from PIL import ImageFont

    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def _text_size(text: str) -> tuple[int, int]:
    font = _font()
    left, _, right, bottom = font.getbbox(_drawable(text or " ", font))
    return right - left, bottom


class GridLayout:
    """Where `labelled_grid` puts things: a title strip on top (if any), then per row a label column
    `label_width` wide and the row's tiles, each `tile` = (w, h) pixels, `TILE_GAP` apart."""

    def __init__(self, labels: Sequence[str], columns: int, tile: tuple[int, int], title: str | None) -> None:
        self.tile, self.columns = tile, columns
        text_h = max(_text_size(t)[1] for t in (*labels, title or ""))
        self.label_width = max(_text_size(label)[0] for label in labels) + 2 * LABEL_MARGIN
        self.title_height = text_h + 2 * LABEL_MARGIN if title else 0
        self.row_height = max(tile[1], text_h + 2 * LABEL_MARGIN)
        title_width = _text_size(title)[0] + 2 * LABEL_MARGIN if title else 0
        self.size = (max(self.label_width + columns * (tile[0] + TILE_GAP), title_width),
                     self.title_height + len(labels) * (self.row_height + TILE_GAP))

    def label_box(self, row: int) -> tuple[int, int, int, int]:
        top = self.title_height + row * (self.row_height + TILE_GAP)
        return 0, top, self.label_width, top + self.row_height

    def tile_origin(self, row: int, column: int) -> tuple[int, int]:
        return (self.label_width + column * (self.tile[0] + TILE_GAP),
                self.title_height + row * (self.row_height + TILE_GAP))


def labelled_grid(rows: Sequence[tuple[str, Sequence[Any]]], title: str | None = None, min_side: int = 128):
    """One grid row per `(label, images)`, in the order given: the label on the left, the images to its
    right (rows may hold different numbers of images); `title` in a strip above. Tiles smaller than
    `min_side` are enlarged by the integer factor that brings them closest to it from below."""
    from PIL import Image, ImageDraw

    if not rows or not any(images for _, images in rows):
        raise ValueError("labelled_grid needs at least one image")
    first = to_pil(next(im for _, images in rows for im in images))
    zoom = max(1, min_side // max(first.size))
    tile = (first.width * zoom, first.height * zoom)
    layout = GridLayout([label for label, _ in rows], max(len(images) for _, images in rows), tile, title)
    grid = Image.new("RGB", layout.size, BACKGROUND)
    draw, font = ImageDraw.Draw(grid), _font()
    if title:
        draw.text((LABEL_MARGIN, LABEL_MARGIN), _drawable(title, font), fill=INK, font=font)
    for r, (label, images) in enumerate(rows):
        left, top, _, _ = layout.label_box(r)
        draw.text((left + LABEL_MARGIN, top + LABEL_MARGIN), _drawable(label, font), fill=INK, font=font)
        for c, image in enumerate(images):
            pil = to_pil(image)
            if pil.size != first.size:
                raise ValueError(f"labelled_grid: image {c} of row {label!r} is {pil.size}, not {first.size}")
            grid.paste(pil.resize(tile, resample=Image.NEAREST) if zoom > 1 else pil, layout.tile_origin(r, c))
    return grid


def stack_vertically(images: Sequence[Any]):
    """PIL images one under another, left-aligned, on the grid background (for grids of equal layout)."""
    from PIL import Image

    out = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)), BACKGROUND)
    top = 0
    for image in images:
        out.paste(image, (0, top))
        top += image.height
    return out
