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
