"""Triton Python-backend model: runs the exported serving TorchScript (``model.pt``).

Copied into every version folder as ``model.py``. Each version is its own instance with its
own TorchScript, so versions never share state. The dynamic batcher hands ``execute`` several
requests; they run as one batch and are split back per request.
"""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

INPUT_NAME = "USER_ID__0"
OUTPUT_NAME = "EMBEDDING__0"


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(int(os.environ.get("DAYLOOP_TRITON_TORCH_THREADS", "1")))
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.model = torch.jit.load(os.path.join(folder, "model.pt"), map_location="cpu").eval()
        self.version = args["model_version"]
        cfg = json.loads(args["model_config"])
        self.max_batch = int(cfg.get("max_batch_size", 0))

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        try:
            batch = np.concatenate(arrays, axis=0).astype(np.int64, copy=False)
            with torch.inference_mode():
                out = self.model(torch.from_numpy(batch).reshape(-1, 1)).numpy().astype(np.float32, copy=False)
        except Exception as exc:  # one bad batch answers each request with an error, not a crash
            error = pb_utils.TritonError(f"user_tower v{self.version}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            tensor = pb_utils.Tensor(OUTPUT_NAME, np.ascontiguousarray(out[start:start + n]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start += n
        return responses

    def finalize(self):
        self.model = None
