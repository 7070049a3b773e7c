"""Images for training: embedded image sets, image folders and NHWC numpy batches."""
from flax_ulmfit.vision.data import ImageLoader, channel_stats
from flax_ulmfit.vision.datasets import ImageSet, image_folder, mnist_5k, mnist_5k_split, sklearn_digits

__all__ = ['ImageLoader', 'ImageSet', 'channel_stats', 'image_folder', 'mnist_5k', 'mnist_5k_split',
           'sklearn_digits']
