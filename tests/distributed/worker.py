"""What every rank of ``torchrun --nproc-per-node 2 worker.py OUT`` runs for ``test_data_parallel.py``: the runs
in :data:`RUNS` (which the tests repeat in one process), the runs each rank must refuse, and a save; each rank
writes what it got to ``OUT/rank<R>.pt``. With ``fail`` after ``OUT``, rank 1 raises at once while rank 0 starts
a long run."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ptsparse  # noqa: E402
from ptsparse import distributed  # noqa: E402
from ptsparse.errors import PtsparseError  # noqa: E402
from tests.conftest import TinyCNN  # noqa: E402

RUNS = {
    "magnitude": {"method": "magnitude", "sparsity": 0.8},
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "magnitude_kd": {"method": "magnitude_kd", "sparsity": 0.8, "distill_iterations": 12, "batch_size": 16},
}
REFUSED = {
    "iee": {"method": "iee", "sparsity": 0.8, "distill_iterations": 2},
    "tiny_batches": {"method": "magnitude_kd", "sparsity": 0.8, "distill_iterations": 2, "batch_size": 1},
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


def calibration(offset: int = 0) -> torch.Tensor:
    return torch.randn(48, 1, 12, 12, generator=torch.Generator().manual_seed(1 + offset))


def main(out: Path, fail: bool = False) -> None:
    with distributed.process_group():
        rank = distributed.world()[0]
        if fail and rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        if fail:  # rank 0 would distil for minutes: the failure of rank 1 must end it
            ptsparse.sparsify(model(), calibration(), method="magnitude_kd", distill_iterations=100_000)
        results, errors = {}, {}
        for name, overrides in RUNS.items():
            result = ptsparse.sparsify(model(), calibration(), **overrides)
            results[name] = {"masks": result.masks, "state": result.model.state_dict(),
                             "history": result.report["recovery"].get("history")}
        result.save(out / f"saved_by_rank{rank}")
        runs = {name: (calibration(), overrides) for name, overrides in REFUSED.items()}
        runs["other_calibration"] = (calibration(offset=rank), RUNS["magnitude"])
        for name, (calib, overrides) in runs.items():
            try:
                ptsparse.sparsify(model(), calib, **overrides)
            except PtsparseError as error:
                errors[name] = f"{type(error).__name__}: {error}"
        torch.save({"results": results, "errors": errors}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), fail=sys.argv[2:] == ["fail"])
