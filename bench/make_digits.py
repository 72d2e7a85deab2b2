"""Export the UCI "Optical Recognition of Handwritten Digits" test set bundled with scikit-learn
to src/ckpt/data/digits.npz, the default data of ``ckpt train``.

1,797 images of 8x8 pixels (values 0..16) in 10 classes; by E. Alpaydin and C. Kaynak,
UCI Machine Learning Repository, CC BY 4.0 (https://doi.org/10.24432/C50P49).
Run once: python bench/make_digits.py
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
out = Path(__file__).resolve().parent.parent / "src" / "ckpt" / "data" / "digits.npz"
np.savez_compressed(out, X=digits.data.astype(np.uint8), y=digits.target.astype(np.uint8))
print(f"wrote {out}: X {digits.data.shape}, y {digits.target.shape}")
