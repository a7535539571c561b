"""Compare the newest complete TensorFlow checkpoints of two folders bitwise: every saved
tensor (weights, optimizer slots and iterations, RNG states, the step) with the same
dtype, shape and bytes.

    python scripts/compare_tf_checkpoints.py run-a/checkpoints run-b/checkpoints

"Newest complete" is the highest step with a completion marker (ckpt-N.json), as
templates/tf_checkpoint_utils.py writes them. Exit code 0 when identical, 1 when not.
Used by the TensorFlow tests and by the fault-injection bench (--compare tf).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MARKER = re.compile(r"^ckpt-(\d+)\.json$")
# The object graph holds names, not state; save_counter counts the saves of this folder,
# which an interrupted run makes more of. Neither is training state.
IGNORED = {"_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE"}


def newest_complete_prefix(folder: str | Path) -> Path:
    steps = [int(m[1]) for p in Path(folder).iterdir() if (m := MARKER.match(p.name))]
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (ckpt-N.json) in {folder}")
    return Path(folder) / f"ckpt-{max(steps)}"


def saved_tensors(prefix: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint that NumPy can hold. The tf.data iterator's state is
    a variant tensor, which cannot be read back as values: a wrong data position shows up
    in the weights of the steps after it instead."""
    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name)
            for name, dtype in reader.get_variable_to_dtype_map().items()
            if name not in IGNORED and dtype != tf.variant}


def tf_checkpoint_differences(folder_a: str | Path, folder_b: str | Path) -> list[str]:
    prefix_a, prefix_b = newest_complete_prefix(folder_a), newest_complete_prefix(folder_b)
    a, b = saved_tensors(prefix_a), saved_tensors(prefix_b)
    differences = [f"{name}: only in {prefix_a.name if name in a else prefix_b.name}"
                   for name in sorted(set(a) ^ set(b))]
    for name in sorted(set(a) & set(b)):
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype != y.dtype or x.shape != y.shape:
            differences.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        elif x.tobytes() != y.tobytes():
            differences.append(f"{name}: values differ")
    return differences


def keras_weights_differences(file_a: str | Path, file_b: str | Path) -> list[str]:
    """Compare two Keras ``.weights.h5`` files (weights and optimizer variables) bitwise."""
    import h5py  # installed with Keras

    def arrays(path) -> dict[str, bytes]:
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, item: found.__setitem__(name, item[()].tobytes())
                         if isinstance(item, h5py.Dataset) else None)
        return found

    a, b = arrays(file_a), arrays(file_b)
    return ([f"{name}: only in one file" for name in sorted(set(a) ^ set(b))]
            + [f"{name}: values differ" for name in sorted(set(a) & set(b)) if a[name] != b[name]])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    differences = tf_checkpoint_differences(*argv)
    for line in differences:
        print(line)
    print("bitwise identical" if not differences else f"{len(differences)} differences")
    return 0 if not differences else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
