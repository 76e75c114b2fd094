"""Reference datasets, splits, region partitions and preprocessing (numpy + Pillow, no torch)."""

from shared.data.elpv import default_cache_dir, pseudo_module_ids
from shared.data.fashion_mnist import IdxFormatError, read_idx
from shared.data.preprocess import (
    MAX_IMAGE_PIXELS,
    ImageDecodeError,
    decode_image,
    resize_images,
    to_model_input,
)
from shared.data.splits import (
    PartitionError,
    Split,
    partition_dirichlet,
    partition_elpv,
    partition_groups,
    stratified_split,
    stratified_subset,
    task_split,
)
from shared.data.tasks import TASKS, Dataset, TaskSpec, UnknownTaskError, get_task, load_task

__all__ = [
    "MAX_IMAGE_PIXELS",
    "TASKS",
    "Dataset",
    "IdxFormatError",
    "ImageDecodeError",
    "PartitionError",
    "Split",
    "TaskSpec",
    "UnknownTaskError",
    "decode_image",
    "default_cache_dir",
    "get_task",
    "load_task",
    "partition_dirichlet",
    "partition_elpv",
    "partition_groups",
    "pseudo_module_ids",
    "read_idx",
    "resize_images",
    "stratified_split",
    "stratified_subset",
    "task_split",
    "to_model_input",
]
