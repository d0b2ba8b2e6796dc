"""Attribute measures (brightness of the ink, size of its bounding box) and their per-class thresholds."""

import torch

from tide.eval.attributes import AttributeThresholds, bbox_area, brightness


def _rect(h0, h1, w0, w1, value):
    x = torch.zeros(1, 1, 28, 28)
    x[..., h0:h1, w0:w1] = value
    return x


def test_bounding_box_area_and_ink_brightness_are_measured_on_the_ink_only():
    images = torch.cat([_rect(2, 12, 3, 8, 0.5), _rect(0, 28, 0, 28, 0.9), torch.zeros(1, 1, 28, 28)])
    assert bbox_area(images).tolist() == [50.0, 784.0, 0.0]
    torch.testing.assert_close(brightness(images), torch.tensor([0.5, 0.9, 0.0]))
    faint = _rect(0, 28, 0, 28, 0.1)  # below the ink threshold everywhere: no item
    assert bbox_area(faint).item() == 0.0


def test_thresholds_are_per_class_tertiles_and_agreement_uses_the_class_median():
    # class 0: small items of rising size; class 1: large ones. Brightness rises with the index.
    imgs, labels = [], []
    for i in range(9):
        imgs.append(_rect(0, 4 + i, 0, 4, 0.2 + 0.08 * i)); labels.append(0)
        imgs.append(_rect(0, 20 + i, 0, 10, 0.2 + 0.08 * i)); labels.append(1)
    images, labels = torch.cat(imgs), torch.tensor(labels)
    th = AttributeThresholds.fit(images, labels, 2)
    assert th.median_GK["size"][0] < th.median_GK["size"][1]
    words = th.label(images, labels)
    assert words["size"][labels == 0].tolist() == [0, 0, 0, -1, -1, -1, 1, 1, 1]
    # a small class-1 item is "small" for class 1 though larger than every class-0 item
    probe = _rect(0, 20, 0, 10, 0.5)
    assert th.agrees(probe, torch.tensor([1]), "size", torch.tensor([0])).item()
    assert not th.agrees(probe, torch.tensor([0]), "size", torch.tensor([0])).item()
    again = AttributeThresholds.from_dict(th.to_dict())
    assert again.median_GK == th.median_GK and again.low_GK == th.low_GK
