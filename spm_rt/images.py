"""Image grids with labels (PNG outputs people look at)."""
from __future__ import annotations

import numpy as np


def to_pil(image, upscale: int = 1):
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image


def labelled_grid(rows: list[list], row_labels: list[str] | None = None, col_labels: list[str] | None = None,
                  cell_labels: list[list[str]] | None = None, upscale: int | None = None):
    """A grid of images (rows x columns) with optional row, column and per-cell captions."""
    from PIL import Image, ImageDraw

    first = to_pil(rows[0][0])
    if upscale is None:
        upscale = max(1, 128 // max(first.width, 1))
    cells = [[to_pil(im, upscale) for im in row] for row in rows]
    w, h = cells[0][0].size
    label_w = 0 if not row_labels else max(8 * max(len(s) for s in row_labels) + 10, 60)
    head_h = 0 if not col_labels else 18
    cap_h = 0 if not cell_labels else 14 * max(len(c.split("\n")) for r in cell_labels for c in r)
    ncol = max(len(r) for r in cells)
    grid = Image.new("RGB", (label_w + ncol * (w + 4), head_h + len(cells) * (h + cap_h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(col_labels or []):
        draw.text((label_w + j * (w + 4) + 2, 2), text, fill="black")
    for i, row in enumerate(cells):
        y = head_h + i * (h + cap_h + 4)
        if row_labels:
            draw.text((4, y + h // 2 - 6), row_labels[i], fill="black")
        for j, im in enumerate(row):
            x = label_w + j * (w + 4)
            grid.paste(im, (x, y))
            if cell_labels:
                draw.multiline_text((x + 2, y + h + 1), cell_labels[i][j], fill="black", spacing=1)
    return grid
