"""Makes safetensors-0.8.safetensors with the real safetensors library (pip install
safetensors==0.8.0 numpy), once; soup's writer must produce the same bytes
(soup-models/tests/checkpoints.rs). Not run in CI."""
import numpy as np
from safetensors.numpy import save_file

tensors = {
    "position_ids": np.arange(3, dtype=np.int64).reshape(1, 3),
    "a.weight": (np.arange(6, dtype=np.float32) / 7).reshape(2, 3),
    "b.bias": np.array([1.5, -2.25, 3e-8, 1e30], dtype=np.float32),
    "c.half": np.array([0.5, -1.0, 2.0], dtype=np.float16),
}
metadata = {"soup.method": "uniform", "format": "pt", "soup.recipe": '{"lr":0.01}'}
save_file(tensors, "safetensors-0.8.safetensors", metadata=metadata)
