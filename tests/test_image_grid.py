"""utils/evaluation/image_grid.py: labelled grids put each row's label on its left and its images where the layout says."""

import pytest
import torch
from PIL import Image

from utils.evaluation.image_grid import GridLayout, labelled_grid, to_pil


def test_labelled_grid_places_labels_and_tiles_in_row_order():
    torch.manual_seed(0)
    rows = [("base", list(torch.rand(3, 3, 16, 24))), ("after 60 steps", list(torch.rand(2, 3, 16, 24)))]
    grid = labelled_grid(rows, title="a red circle", min_side=64)
    zoom = 64 // 24
    layout = GridLayout([label for label, _ in rows], 3, (24 * zoom, 16 * zoom), "a red circle")
    assert grid.size == layout.size and layout.label_width > 0 and layout.title_height > 0
    for r, (label, images) in enumerate(rows):
        assert min(grid.crop(layout.label_box(r)).convert("L").getdata()) < 100, label  # the label is drawn
        for c, image in enumerate(images):
            left, top = layout.tile_origin(r, c)
            tile = grid.crop((left, top, left + 24 * zoom, top + 16 * zoom))
            expected = to_pil(image).resize((24 * zoom, 16 * zoom), resample=Image.NEAREST)
            assert list(tile.getdata()) == list(expected.getdata()), (r, c)
    # the second row has two images: its third cell is background
    left, top = layout.tile_origin(1, 2)
    assert set(grid.crop((left, top, left + 24 * zoom, top + 16 * zoom)).getdata()) == {(255, 255, 255)}
    # the labels differ, so their cells do
    assert list(grid.crop(layout.label_box(0)).getdata()) != list(grid.crop(layout.label_box(1)).getdata())


def test_labelled_grid_refuses_images_of_different_sizes():
    with pytest.raises(ValueError, match="not"):
        labelled_grid([("a", [torch.rand(3, 8, 8), torch.rand(3, 8, 16)])])
    with pytest.raises(ValueError, match="at least one image"):
        labelled_grid([("a", [])])
