import dataclasses, time
import torch
from cogtune.train import TrainConfig, run_training
from cogtune.train.config import LoraConfig, OptimizerConfig, ValidationConfig, MemoryConfig

def test_smoke(tiny_cache, tmp_path):
    for kind in ("nf4", "int8"):
        t = time.time()
        config = TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path / kind), steps=3,
                             lora=LoraConfig(rank=4), optimizer=OptimizerConfig(lr=1e-3),
                             validation=ValidationConfig(final=True, steps=2), memory=MemoryConfig(base_weights=kind))
        result = run_training(config)
        print(kind, result.losses, time.time() - t)
