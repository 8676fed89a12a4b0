"""Run under torchrun: build models the way distributed training does (empty on every rank, rank 0 reads the
weights, scattered into FSDP shards), and save rank 0's outputs for a fixed batch, for comparison with a full load.

    torchrun --standalone --nproc_per_node N -m support.sharded_load OUT.pt base=URI [ref=URI] [rm=URI]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from wmtp.config import Devices, DistributedSettings, FSDPSettings
from wmtp.distributed import close_process_group, init_distributed, load_weights, parallelize
from wmtp.models import FROZEN_LOADERS, load_mtp_model
from wmtp.storage import Storage

N_HEADS, HEAD_TYPE = 4, "block"


def outputs(role: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every head for the multi-token model, the frozen model's own output otherwise."""
    with torch.no_grad():
        if role == "base":
            return torch.stack([model.unembed(hidden) for hidden in model.eval()(ids)])
        return model(ids).logits


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))


def sharded_load(models: dict[str, str], world: int, out: Path) -> dict[str, torch.Tensor]:
    """Run this module under torchrun on `world` ranks for `models` (role → URI); rank 0's outputs by role."""
    tests = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", __name__, str(out), *(f"{role}={uri}" for role, uri in models.items())]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.load(out)


def main(out: str, models: dict[str, str]) -> None:
    dist = init_distributed(DistributedSettings(enabled=True), torch.device("cpu"))
    storage = Storage()
    base, _ = load_mtp_model(models["base"], storage, N_HEADS, HEAD_TYPE, empty=True)
    frozen = {role: FROZEN_LOADERS[role](uri, storage, empty=True) for role, uri in models.items() if role != "base"}
    parallelize(base, [], list(frozen.values()), Devices(fsdp=FSDPSettings(enabled=True)), dist)
    load_weights(base, lambda: load_mtp_model(models["base"], storage, N_HEADS, HEAD_TYPE)[0].state_dict(), dist)
    for role, module in frozen.items():
        load_weights(module, lambda r=role: FROZEN_LOADERS[r](models[r], storage).state_dict(), dist)
    ids = batch(base.vocab_size)
    results = {role: outputs(role, module, ids) for role, module in {"base": base, **frozen}.items()}
    if dist.is_main:
        torch.save(results, out)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:]))
