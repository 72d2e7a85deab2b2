"""Diabetes regression: ckpt against scikit-learn's MLPRegressor, the same data on both sides.

    python bench/diabetes_vs_sklearn.py [--epochs 200] [--seeds 5]

For each seed, ckpt.datasets prepares the split and scaling that `ckpt train --example
diabetes` uses (20% held out at random, features and target standardised with the training
rows' statistics); both libraries then fit the same architecture on the same standardised rows
-- two hidden ReLU layers of 64, Adam at 1e-3, batch 32, no weight decay, a fixed number of
epochs with no early stopping, float64 -- and are scored by R^2 on the held-out rows in the
target's units. Prints one row per seed, the mean R^2 of each and the fit times.

The initialisation differs: build_mlp draws He-normal weights and zero biases, MLPRegressor
Glorot-uniform weights and biases. The third column refits ckpt from Glorot-uniform weights
and biases drawn as MLPRegressor draws them, which separates the initialisation from the rest.
"""
import argparse
import time
import warnings

import numpy as np

from ckpt import Adam, build_mlp, fit, predict
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.datasets import diabetes_table, prepare_training_data
from ckpt.inference import regression_metrics


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    rows = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        data = prepare_training_data(diabetes_table(np.float64), rng, test_fraction=0.2,
                                     task="regression")
        unscale = data.target_scaler.inverse

        layers = build_mlp(10, 3, 64, 1, "relu", np.float64, rng)
        glorot = [[w.copy() for w in layer.params()] for layer in layers]
        draw = np.random.RandomState(seed)
        for weights in glorot:
            bound = np.sqrt(6.0 / sum(weights[0].shape))
            for w in weights:
                w[...] = draw.uniform(-bound, bound, w.shape)
        scores = []
        for start_from in (None, glorot):
            if start_from is not None:
                for layer, weights in zip(layers, start_from):
                    for target, value in zip(layer.params(), weights):
                        target[...] = value
            model = SegmentCheckpointer(layers)
            fit_rng = np.random.default_rng([seed, 1])
            start = time.perf_counter()
            fit(model, data.X_train, data.y_train, loss="mse", optimizer=Adam(model, 1e-3),
                epochs=args.epochs, batch_size=32, seed=fit_rng)
            ckpt_s = time.perf_counter() - start if start_from is None else ckpt_s
            scores.append(regression_metrics(data.y_test,
                                             unscale(predict(model, data.X_test)))["r2"])
        ckpt_r2, glorot_r2 = scores

        sk = MLPRegressor(hidden_layer_sizes=(64, 64), alpha=0.0, batch_size=32,
                          learning_rate_init=1e-3, max_iter=args.epochs, tol=0.0,
                          n_iter_no_change=args.epochs + 1, shuffle=True, random_state=seed)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)   # max_iter is the plan
            sk.fit(data.X_train, data.y_train)
        sk_s = time.perf_counter() - start
        sk_r2 = regression_metrics(data.y_test, unscale(sk.predict(data.X_test)[:, None]))["r2"]
        rows.append((seed, ckpt_r2, glorot_r2, sk_r2, ckpt_s, sk_s))

    print(f"diabetes, {args.epochs} epochs, 2 x 64 ReLU, Adam 1e-3, batch 32, float64")
    print(f"{'seed':>4}  {'ckpt R^2':>8}  {'ckpt Glorot':>11}  {'sklearn R^2':>11}  "
          f"{'ckpt s':>7}  {'sklearn s':>9}")
    for seed, a, g, b, ta, tb in rows:
        print(f"{seed:>4}  {a:>8.4f}  {g:>11.4f}  {b:>11.4f}  {ta:>7.2f}  {tb:>9.2f}")
    mean = np.mean(rows, axis=0)
    print(f"{'mean':>4}  {mean[1]:>8.4f}  {mean[2]:>11.4f}  {mean[3]:>11.4f}  {mean[4]:>7.2f}  "
          f"{mean[5]:>9.2f}")
    print(f"R^2 difference {mean[1] - mean[3]:+.4f} ({mean[2] - mean[3]:+.4f} from Glorot; "
          f"target within 0.03); fit time ratio {mean[4] / mean[5]:.2f} (target below 1)")


if __name__ == "__main__":
    main()
