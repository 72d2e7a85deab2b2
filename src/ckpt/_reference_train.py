"""Pure-NumPy twins of ckpt's loss and optimizer kernels, written to be read.

Each optimizer function performs one step on copies and returns the new (param, *state); the
tests run them side by side with ckpt.optim for several steps.
"""
from __future__ import annotations

import numpy as np


def softmax_cross_entropy(logits, labels):
    """(mean(logsumexp(z) - z[label]), (softmax(z) - onehot) / batch)"""
    m = len(logits)
    if m == 0:
        return 0.0, np.zeros_like(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_prob = shifted - log_sum
    rows = np.arange(m)
    loss = -log_prob[rows, labels].mean()
    grad = np.exp(log_prob)
    grad[rows, labels] -= 1
    return float(loss), (grad / m).astype(logits.dtype)


def mse_loss(pred, target):
    """(mean((pred - target)^2), 2 (pred - target) / size), the mean over every element."""
    if pred.size == 0:
        return 0.0, np.zeros_like(pred)
    diff = pred - target.reshape(pred.shape)
    return float(np.mean(diff ** 2)), (2 * diff / pred.size).astype(pred.dtype)


def sgd_step(p, g, buf, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD (dampening 0); buf is None before the first step."""
    d = g + weight_decay * p
    if momentum:
        buf = d.copy() if buf is None else momentum * buf + d
        d = d + momentum * buf if nesterov else buf
    return p - lr * d, buf


def adam_step(p, g, m, v, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              decoupled=False):
    """torch.optim.Adam (decoupled=False) or AdamW (decoupled=True), step t counted from 1."""
    beta1, beta2 = betas
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def output_loss(z, y, sample_weight, output):
    """scikit-learn's MLP loss of the output z (before the output units) and its gradient.

    output: "identity" (half squared error, mean over the outputs), "logistic" (binary
    cross-entropy per output) or "softmax" (categorical cross-entropy). Rows are weighted by
    sample_weight (None: all ones) and the sums divided by its total. The gradient is
    w (out(z) - y) / sum(w), scikit-learn's delta of the last layer.
    """
    z64 = z.astype(np.float64)
    y64 = y.astype(np.float64)
    m, c = z.shape
    w = np.ones(m) if sample_weight is None else sample_weight.astype(np.float64)
    eps = np.finfo(z.dtype).eps
    if output == "identity":
        p = z64
        per_row = 0.5 * ((p - y64) ** 2).mean(axis=1)
    else:
        if output == "logistic":
            p = 0.5 * (1 + np.tanh(0.5 * z64))  # the logistic function, without overflow
        else:
            e = np.exp(z64 - z64.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
        q = np.clip(p, eps, 1 - eps)
        terms = np.where(y64 == 0, 0.0, y64 * np.log(q))
        if output == "logistic":
            terms = terms + np.where(y64 == 1, 0.0, (1 - y64) * np.log(1 - q))
        per_row = -terms.sum(axis=1)
    total = w.sum()
    loss = float((w * per_row).sum() / total) if m else 0.0
    grad = (w[:, None] * (p - y64) / total) if m else np.zeros_like(z64)
    return loss, grad.astype(z.dtype)
