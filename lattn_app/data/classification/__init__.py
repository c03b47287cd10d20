"""Image-classification datamodules: image folders (ImageNet layout) and CIFAR-10/100 from disk.

- :mod:`.dataset`: :class:`ClassificationDataset` (labelled images through an albumentations
  pipeline) and :class:`ClassificationDataModule`, what both datamodules share (the classes, known on
  first use so that the command line links ``data.num_classes`` to the model; the predict folder);
- :mod:`.folders`: :class:`ImageFolderDataModule`, ``root/{train,val,test}/<class_name>/<image>``;
  ``root=None`` uses the embedded synthetic set (:mod:`lattn_app.data.synthetic_classification`);
- :mod:`.cifar`: :class:`CIFARDataModule`, the official "python version" files of CIFAR-10 or
  CIFAR-100 with a seeded validation split held out of the training batches; the test batch is only
  used by ``test``.

The validation data (checkpoint selection) is never the test data.
"""

from ..io import ImageReadError
from .cifar import CIFARDataModule
from .dataset import IMAGE_EXTENSIONS, ClassificationDataModule, ClassificationDataset, list_images
from .folders import ImageFolderDataModule, find_classes

__all__ = [
    "IMAGE_EXTENSIONS",
    "CIFARDataModule",
    "ClassificationDataModule",
    "ClassificationDataset",
    "ImageFolderDataModule",
    "ImageReadError",
    "find_classes",
    "list_images",
]
