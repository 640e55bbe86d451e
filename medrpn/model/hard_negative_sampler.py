"""MONAI's hard-negative sampler sized like torchvision's balanced sampler, for the RPN's
`sampler: hard_negative`.

Its own module so that MONAI (about 3 s to import) is loaded only by a model that uses it.
"""

from __future__ import annotations

from monai.apps.detection.utils.hard_negative_sampler import HardNegativeSampler
from torch import Tensor


class HardNegativeRPNSampler(HardNegativeSampler):
    """MONAI's hard-negative sampler, drawing as many negatives per image as the balanced sampler.

    MONAI keeps negatives at a fixed ratio to the positives drawn (one negative for an image without
    positives at a 0.5 fraction); here the sample is filled to `batch_size_per_image` as torchvision
    does, so the two samplers differ only in *which* negatives they pick.
    Called as `sampler(labels_per_image, object_probabilities_of_all_anchors)`.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float, pool_size: float) -> None:
        super().__init__(batch_size_per_image, positive_fraction, min_neg=1, pool_size=pool_size)

    def get_num_neg(self, negative: Tensor, num_pos: int) -> int:
        return min(negative.numel(), self.batch_size_per_image - num_pos)
