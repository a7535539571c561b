"""A Keras classifier trained with model.fit the way most scripts do it: NumPy arrays, a
validation split, and the three callbacks almost every fit uses. It knows nothing of
checkpoints; fit_resumable.py is the same script made resumable.

    python fit.py --out results
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results", help="folder of best.keras and final.keras")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_data(seed):
    """1200 examples of 20 features, 4 classes, a quarter of the labels noisy: the
    validation loss soon stops improving, and the callbacks have work to do."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1200, 20)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(20, 4)), axis=1)
    noisy = rng.random(1200) < 0.25
    y[noisy] = rng.integers(0, 4, noisy.sum())
    return x, y


def make_model():
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dropout(0.2),
        keras.layers.Dense(4),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    x, y = make_data(args.seed)
    model = make_model()
    os.makedirs(args.out, exist_ok=True)
    callbacks = [
        keras.callbacks.ModelCheckpoint(os.path.join(args.out, "best.keras"),
                                        save_best_only=True),
        keras.callbacks.EarlyStopping(patience=10),
        keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=2),
    ]
    model.fit(x, y, epochs=args.epochs, batch_size=64, shuffle=True, validation_split=0.2,
              callbacks=callbacks, verbose=2)
    model.save(os.path.join(args.out, "final.keras"))


if __name__ == "__main__":
    main()
