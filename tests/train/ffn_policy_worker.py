"""Worker for test_ffn_kernels.py's data-parallel test (run under torchrun): trains with the per-layer policy
driven with the pure-torch sparse op and writes, per rank, the statistics each decision saw and the decisions.

    python -m torch.distributed.run --nproc_per_node 2 ffn_policy_worker.py RUN_DIR CROSSOVER OVERRIDE...
"""

import json
import os
import sys
from pathlib import Path

from sparsify_cli.config.compose import compose
from sparsify_cli.train import distributed
from sparsify_cli.train.ffn_kernels import SparseLayerPolicy
from sparsify_cli.train.loop import Trainer


def main(run_dir: Path, crossover: float, overrides: list[str]) -> None:
    cfg = compose("tiny", overrides)
    t = Trainer(cfg, run_dir)
    t.ffn_policy = SparseLayerPolicy(cfg.model.n_layers, cfg.model.d_ffn, backend="torch", crossover=crossover)
    seen, decided = [], []
    step_mean_active = t.tracker.step_mean_active

    def record():
        seen.append(step_mean_active())
        return seen[-1]

    t.tracker.step_mean_active = record
    train_step = t.train_step

    def step():
        metrics = train_step()
        decided.append([ffn.sparse_train for ffn in t.model.ffns])
        return metrics

    t.train_step = step
    try:
        t.run()
    finally:
        distributed.shutdown()
    (run_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"seen": seen, "decided": decided}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:])
