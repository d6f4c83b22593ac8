"""The pixel budget (ingest.max_pixels): the most pixels, width x height, that one read may decode at once.

A small hostile file can declare a huge image (a 1 MB zlib TIFF of 30000 x 30000 decodes to 900 MB, and
to 3.6 GB as float32), so every reader checks the size its file's header declares before it decodes
anything, and a file over the budget is skipped and counted (reason `over_pixel_budget`), like an
unreadable one. Whole-slide images are read region by region: the budget applies to one read (a region,
a level read whole, a stored tile), not to the slide's size.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from biomedsynth.sources import UnreadableInput


class OverPixelBudget(UnreadableInput):
    """A file whose header declares more pixels than the budget; it is skipped without being decoded."""
    reason = "over_pixel_budget"


def check_pixels(where: str, width: int, height: int, max_pixels: int) -> None:
    """OverPixelBudget naming `where` when a width x height image is over the budget."""
    if width * height > max_pixels:
        raise OverPixelBudget(f"{where}: {width} x {height} = {width * height:,} pixels, over the pixel budget "
                              f"(ingest.max_pixels = {max_pixels:,}); not decoded")


@contextmanager
def pil_budget(where: str, max_pixels: int) -> Iterator[None]:
    """PIL's own bomb check, which Image.open makes from the header, set to the budget: PIL warns above
    Image.MAX_IMAGE_PIXELS and raises above twice it; both become OverPixelBudget. Covers PIL used by
    others too (pydicom's JPEG decoder)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise OverPixelBudget(f"{where}: over the pixel budget (ingest.max_pixels = {max_pixels:,}): {e}; "
                              "not decoded") from None
    finally:
        Image.MAX_IMAGE_PIXELS = before
