"""Image grids with labels (PNG outputs people look at)."""
from __future__ import annotations

import numpy as np

_GAP = 4  # between an image and its own caption, and between columns
_ROW_GAP = 14  # between one row's captions and the next row's images: captions read as belonging above


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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    box = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return box[2] - box[0], box[3] - box[1]


def labelled_grid(rows: list[list], row_labels: list[str] | None = None, col_labels: list[str] | None = None,
                  cell_labels: list[list[str]] | None = None, upscale: int | None = None, *,
                  title: str | None = None, legend: list[str] | None = None):
    """A grid of images (rows x columns) with an optional title, legend lines, row and column
    labels and a caption under each image (``""``: none). Captions sit right under their own
    image with a wider gap before the next row.

    Example::

        >>> import numpy as np
        >>> img = np.zeros((8, 8, 3))
        >>> grid = labelled_grid([[img, img]], row_labels=["a red circle"], col_labels=["base", "SPMs"],
        ...                      cell_labels=[["", "red 1.00"]], title="demo", legend=["gates: 0 = off, 1 = on"])
        >>> grid.size[0] > 16
        True
    """
    from PIL import Image, ImageDraw

    first = to_pil(rows[0][0])
    if upscale is None:
        upscale = max(1, 128 // max(first.width, 1))
    cells = [[to_pil(im, upscale) for im in row] for row in rows]
    ncol = max(len(r) for r in cells)
    font, small, big = _font(12), _font(11), _font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = lambda text, f=font: _text_size(probe, text, f)  # noqa: E731

    # column widths: the image, its header and its captions
    col_w = [0] * ncol
    for row in cells:
        for j, im in enumerate(row):
            col_w[j] = max(col_w[j], im.width)
    for j, text in enumerate(col_labels or []):
        col_w[j] = max(col_w[j], size(text)[0] + 4)
    for row in cell_labels or []:
        for j, text in enumerate(row):
            col_w[j] = max(col_w[j], size(text, small)[0] + 4)
    label_w = 0 if not row_labels else max(size(s)[0] for s in row_labels) + 12
    head_h = 0 if not col_labels else max(size(s)[1] for s in col_labels) + 8
    cap_h = 0 if not cell_labels else max(size(c, small)[1] for r in cell_labels for c in r) + _GAP + 2
    row_h = [max(im.height for im in row) for row in cells]
    title_h = size(title, big)[1] + 8 if title else 0
    legend_h = size("\n".join(legend), small)[1] + 10 if legend else 0
    margin = 8
    width = margin * 2 + label_w + sum(col_w) + _GAP * (ncol - 1)
    width = max(width, margin * 2 + size(title or "", big)[0], margin * 2 + size("\n".join(legend or []), small)[0])
    height = margin * 2 + title_h + legend_h + head_h + sum(h + cap_h for h in row_h) + _ROW_GAP * (len(cells) - 1)

    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    y = margin
    if title:
        draw.multiline_text((margin, y), title, fill="black", font=big, spacing=2)
        y += title_h
    if legend:
        draw.multiline_text((margin, y), "\n".join(legend), fill=(70, 70, 70), font=small, spacing=2)
        y += legend_h
    xs = [margin + label_w + sum(col_w[:j]) + _GAP * j for j in range(ncol)]
    for j, text in enumerate(col_labels or []):
        draw.text((xs[j] + (col_w[j] - size(text)[0]) // 2, y), text, fill="black", font=font)
    y += head_h
    for i, row in enumerate(cells):
        if row_labels:
            th = size(row_labels[i])[1]
            draw.text((margin, y + (row_h[i] - th) // 2), row_labels[i], fill="black", font=font)
        for j, im in enumerate(row):
            x = xs[j] + (col_w[j] - im.width) // 2
            grid.paste(im, (x, y))
            text = cell_labels[i][j] if cell_labels else ""
            if text:
                tw = size(text, small)[0]
                draw.multiline_text((xs[j] + (col_w[j] - tw) // 2, y + im.height + _GAP), text, fill="black",
                                    font=small, spacing=2, align="center")
        y += row_h[i] + cap_h + _ROW_GAP
    return grid
