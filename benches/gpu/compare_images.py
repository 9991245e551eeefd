"""Mean and max absolute difference of two RGB images on 0-255 (the parity criterion)."""
import sys

import numpy as np
from PIL import Image

a = np.asarray(Image.open(sys.argv[1]).convert("RGB")).astype(np.int16)
b = np.asarray(Image.open(sys.argv[2]).convert("RGB")).astype(np.int16)
d = np.abs(a - b)
print(f"mean_abs_diff={d.mean():.4f} max_abs_diff={d.max()} shape={a.shape}")
