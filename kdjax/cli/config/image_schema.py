"""The schema of the image commands' config (``kdjax config --schema``).

Every key of a run's YAML config with its default, kind and meaning; see
:mod:`kdjax.cli.config.image` for loading and validation. Standard library only.
"""

from __future__ import annotations

from kdjax.cli.config import sections as _sections
from kdjax.cli.config.base import Field

BUILTIN_ARCHS = ("cnn", "mlp")


def _model_section(arch: str, channels, dense, hidden, doc: str) -> dict:
  return {
      "arch": Field(arch, "str", f"{doc} architecture: cnn "
                    "(kdjax.models.CNN), mlp (kdjax.models.MLP), or your own "
                    "Flax linen or NNX module class as 'package.module:"
                    "ClassName' (importable from sys.path, PYTHONPATH or the "
                    "current directory; built with kwargs, plus num_classes "
                    "and, for NNX, input_shape [H, W, C] and rngs when its "
                    "constructor takes them)"),
      "kwargs": Field({}, "dict", "keyword arguments of the model's "
                      "constructor, e.g. {width: 16} (for cnn/mlp: over the "
                      "keys below, e.g. {batch_norm: true})"),
      "features": Field([], "strs", "intermediate features of this model "
                        "(submodule paths or sown names, e.g. [block1]); the "
                        "feature-based methods read them by default "
                        "(student_feature/teacher_feature: the last one, "
                        "pairs: zipped)"),
      "channels": Field(list(channels), "ints", "CNN: channels of the conv "
                        "blocks (features block_0, block_1, ...)", minimum=1),
      "dense": Field(dense, "int", "CNN: width of the penultimate dense layer",
                     minimum=1),
      "hidden": Field(list(hidden), "ints", "MLP: widths of the hidden layers",
                      minimum=1),
      "dropout": Field(0.0, "float", "dropout rate (train mode only)",
                       minimum=0.0),
  }


SCHEMA: dict = {
    "output_dir": Field("runs/fashion_mnist", "str",
                        "experiment directory: holds the teacher run, the "
                        "teacher cache and one directory per distill run"),
    "seed": Field(0, "int", "seed of the initialisation, data order, dropout "
                  "and augmentation", minimum=0),
    "data": {
        "source": Field("tfds", "str",
                        "tfds: a TFDS dataset by name (the Fashion-MNIST "
                        "builder, or any dataset already prepared in "
                        "array_record format); arrays: your own .npz/.npy "
                        "files (train_path, eval_path); idx: the "
                        "Fashion-MNIST IDX arrays in memory; synthetic: "
                        "generated class patterns (smoke tests)",
                        choices=("tfds", "arrays", "idx", "synthetic")),
        "name": Field("kdjax_fashion_mnist", "str",
                      "TFDS dataset name[/config][:version] (source: tfds); "
                      "kdjax_fashion_mnist is built from the IDX files, any "
                      "other is read as prepared in data_dir, never "
                      "downloaded"),
        "data_dir": Field(None, "str", "TFDS data directory holding the "
                          "prepared datasets (default ~/tensorflow_datasets)",
                          nullable=True),
        "tfds_data_dir": Field(None, "str", "older name of data_dir",
                               nullable=True),
        "dir": Field(None, "str", "directory of the Fashion-MNIST IDX files "
                     "(default $KDJAX_FASHION_MNIST_DIR or "
                     "/usr/share/datasets/fashion-mnist)", nullable=True),
        "train_path": Field(None, "str", "source: arrays: training images "
                            "and labels (.npz), or images (.npy: [N, H, W] or "
                            "[N, H, W, C], uint8 pixels or floats)",
                            nullable=True),
        "train_labels_path": Field(None, "str", "source: arrays: training "
                                   "labels (.npy [N] of class indices, or a "
                                   ".npz holding label_key) when train_path "
                                   "holds only the images", nullable=True),
        "eval_path": Field(None, "str", "source: arrays: evaluation images "
                           "and labels (.npz) or images (.npy)",
                           nullable=True),
        "eval_labels_path": Field(None, "str", "source: arrays: evaluation "
                                  "labels (.npy or .npz)", nullable=True),
        "image_key": Field("image", "str", "the images' name in a .npz "
                           "(arrays) or the image feature (tfds)"),
        "label_key": Field("label", "str", "the labels' name in a .npz "
                           "(arrays) or the label feature (tfds)"),
        "train_split": Field("train", "str", "training split (tfds, idx)"),
        "eval_split": Field("test", "str", "evaluation split (tfds, idx)"),
        "max_train_examples": Field(None, "int", "use only the first N "
                                    "training examples", nullable=True,
                                    minimum=1),
        "max_eval_examples": Field(None, "int", "use only the first N "
                                   "evaluation examples", nullable=True,
                                   minimum=1),
        "num_classes": Field(None, "int", "number of classes; null: from the "
                             "data (arrays: the largest label + 1; tfds: "
                             "the label ClassLabel; Fashion-MNIST and "
                             "synthetic: 10)", nullable=True, minimum=2),
        "mean": Field(None, "float", "image = (pixels / 255 - mean) / std "
                      "(float images: (pixels - mean) / std); null: computed "
                      "from the training split (Fashion-MNIST: 0.286)",
                      nullable=True),
        "std": Field(None, "float", "see mean; null: computed from the "
                     "training split (Fashion-MNIST: 0.353)", nullable=True,
                     minimum=1e-12),
        "batch_size": Field(128, "int", "training batch size", minimum=1),
        "eval_batch_size": Field(1000, "int", "evaluation batch size",
                                 minimum=1),
        "read_threads": Field(0, "int", "grain reader threads (0: read in "
                              "the training thread)", minimum=0),
        "augment": {
            "enabled": Field(False, "bool", "augment each batch once, for "
                             "teacher and student alike (consistent "
                             "teaching, kdjax.data.augment_batch)"),
            "crop_padding": Field(2, "int", "random crop after padding by "
                                  "this many pixels (0: none)", minimum=0),
            "flip": Field(True, "bool", "random horizontal flip"),
            "mixup_alpha": Field(None, "float", "mixup Beta(alpha, alpha) of "
                                 "the shared view (null: none)",
                                 nullable=True, minimum=1e-12),
        },
    },
    "teacher": {
        **_model_section("cnn", (32, 64), 256, (800, 800), "teacher"),
        "run_dir": Field(None, "str", "the teacher run (train-teacher writes "
                         "it, distill/cache-teacher read it; an export "
                         "directory also works); default "
                         "<output_dir>/teacher", nullable=True),
        "steps": Field(None, "int", "train-teacher: optimizer steps (default "
                       "train.steps)", nullable=True, minimum=1),
        "epochs": Field(None, "float", "train-teacher: epochs (default "
                        "train.epochs)", nullable=True, minimum=0.0),
        "lr": Field(None, "float", "train-teacher: peak learning rate "
                    "(default optimizer.lr)", nullable=True, minimum=0.0),
    },
    "student": _model_section("mlp", (16, 32), 64, (128,), "student"),
    "optimizer": _sections.OPTIMIZER,
    "train": _sections.TRAIN,
    "distill": {
        "method": Field("kd", "str", "a kdjax.methods registry name "
                        "(ce: the student alone)"),
        "temperature": Field(None, "float", "the temperature of methods that "
                             "have one (ignored by the others; null: the "
                             "method's default)", nullable=True,
                             minimum=1e-12),
        "hparams": Field({}, "dict", "overrides of the method's "
                         "hyper-parameters, e.g. {beta: 4.0}"),
        "teacher": Field("run", "str", "where the teacher's outputs come "
                         "from: the teacher run (online) or the teacher "
                         "cache (offline)", choices=("run", "cache")),
        "run_name": Field(None, "str", "the run's directory under "
                          "output_dir (default student_<method>, plus "
                          "_cached for a cache)", nullable=True),
    },
    "cache": {
        "dir": Field(None, "str", "teacher cache directory (default "
                     "<output_dir>/teacher_cache)", nullable=True),
        "k": Field(None, "int", "keep the top-k logits (null: all; the "
                   "registry's methods need all)", nullable=True, minimum=1),
        "batch_size": Field(256, "int", "teacher batch size while caching",
                            minimum=1),
        "features": Field(None, "str", "comma-separated teacher features to "
                          "store (default: those distill.method reads)",
                          nullable=True),
    },
    "checkpoint": _sections.CHECKPOINT,
    "eval": {
        "ece_bins": Field(15, "int", "bins of the expected calibration error",
                          minimum=1),
        "latency_batch_sizes": Field([1, 256], "ints", "batch sizes of the "
                                     "latency measurement", minimum=1),
        "latency_runs": Field(30, "int", "timed runs per batch size (median "
                              "reported)", minimum=1),
    },
}

# Recipes of kdjax.methods the command line trains.
SUPPORTED_RECIPES = ("distill", "student_only", "mean_teacher")
