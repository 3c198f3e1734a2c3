import os
import socket
import tempfile

import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never reach the real Hub: the client talks to tests/hub_server.py on a free local port. huggingface_hub
# reads these variables when it is imported, so they are set here, before any test module imports it.
with socket.socket() as _probe:
    _probe.bind(("127.0.0.1", 0))
    HUB_PORT = _probe.getsockname()[1]
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_TOKEN"] = "hf_test_token"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="hf_sdt_hub_cache_")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)
