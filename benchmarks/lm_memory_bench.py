"""Peak device memory of one-shot pruning of a causal language model, with and without ``offload``.

A Llama-shaped model with random weights (only memory and time count) is built from a config, calibrated on random
token windows, and pruned by Wanda and SparseGPT at 0.5 with the whole model on the device and with ``offload`` (the
model in CPU memory, one decoder layer at a time on the device). Each run records the report's
``peak_device_memory_mb`` (CUDA's ``max_memory_allocated``, reset before the run), the model's and one decoder layer's
size, the wall time, and whether the two runs chose the same masks::

    python benchmarks/lm_memory_bench.py --device cuda                      # about 1 B parameters (3.6 GiB in fp32)
    python benchmarks/lm_memory_bench.py --device cuda --layers 32 --hidden 4096 --intermediate 11008 \\
        --heads 32 --seq-len 2048 --batch-size 4                            # Llama-2-7B's shape (27 GB in fp32)
    python benchmarks/lm_memory_bench.py --layers 2 --hidden 64 --intermediate 128 --heads 4 --vocab 256 \\
        --seq-len 32 --calib-size 8                                         # CPU-sized check of the script
    python benchmarks/lm_memory_bench.py --table                            # print the markdown section

On the CPU the report has no device memory (``null``): tensors there are part of the peak RSS, recorded instead.
Each measurement is one JSON file in ``benchmarks/results/lm_memory/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import ptsparse
from ptsparse.checkpoint import write_json
from ptsparse.graph.cost import synchronize

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lm_memory"


def build(args: argparse.Namespace) -> torch.nn.Module:
    """The Llama-shaped causal LM of ``args`` (random weights, fp32), as ``hf:`` directories load."""
    import transformers

    from ptsparse.models.zoo import HFCausalLM

    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.heads, vocab_size=args.vocab,
                                      max_position_embeddings=args.seq_len)
    torch.manual_seed(0)
    return HFCausalLM(transformers.LlamaForCausalLM(config)).eval()


def mib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def run(method: str, args: argparse.Namespace) -> dict:
    """Prunes the model by ``method`` without and with offload; one row with both."""
    model = build(args)
    tokens = torch.randint(args.vocab, (args.calib_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    row = {"method": method, "sparsity": 0.5, "layers": args.layers, "hidden": args.hidden,
           "intermediate": args.intermediate, "vocab": args.vocab, "seq_len": args.seq_len,
           "calib_size": args.calib_size, "batch_size": args.batch_size, "device": args.device,
           "device_name": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
           else "cpu", "torch": torch.__version__, "model_mib": mib(model),
           "decoder_layer_mib": mib(model.hf.model.layers[0])}
    masks = {}
    for offload in (False, True):
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(torch.device(args.device))
        synchronize(args.device)
        start = time.perf_counter()
        result = ptsparse.sparsify(model, tokens, method=method, sparsity=0.5, batch_size=args.batch_size,
                                   device=args.device, offload=offload, progress=False)
        synchronize(args.device)
        key = "offload" if offload else "on_device"
        row[f"{key}_seconds"] = time.perf_counter() - start
        row[f"{key}_peak_device_mib"] = result.report["peak_device_memory_mb"]
        row[f"{key}_peak_rss_mib"] = result.report["peak_rss_mb"]  # the process's so far: the first run included
        masks[offload] = result.masks
        del result
    row["same_masks"] = all(torch.equal(masks[True][name], masks[False][name]) for name in masks[False])
    write_json(args.out / f"{args.device.split(':')[0]}-l{args.layers}-h{args.hidden}-{method}.json", row)
    return row


def memory_section(directory: str | Path = RESULTS) -> str:
    """The markdown section of ``RESULTS.md``: what is measured, and the JSON results as a table (or that there
    are none yet)."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    text = ("\n## Language models: peak device memory with offload (`benchmarks/lm_memory_bench.py`)\n\n"
            "Wanda and SparseGPT at 0.5 on a Llama-shaped model with random weights, with the whole model on the GPU "
            "and with `offload` (the model in CPU memory, one decoder layer at a time on the GPU), recording the "
            "report's `peak_device_memory_mb` (`max_memory_allocated`, reset before each run) and whether both runs "
            "chose the same masks: `python benchmarks/lm_memory_bench.py --device cuda`.\n\n")
    if not any(r["device"].startswith("cuda") for r in rows):
        return text + ("No GPU was available to this project's sessions so far, so there are no measurements yet; on "
                       "the CPU the two runs choose the same masks (`tests/unit/test_language_models.py` checks that, "
                       "and that one decoder layer is on the device at a time).\n")
    text += ("| device | layers x hidden | model MiB | decoder layer MiB | method | peak MiB, whole model | peak MiB, "
             "offload | seconds, whole model | seconds, offload | same masks |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        if not r["device"].startswith("cuda"):
            continue
        text += (f"| {r['device_name']} | {r['layers']} x {r['hidden']} | {r['model_mib']:.0f} | "
                 f"{r['decoder_layer_mib']:.0f} | {r['method']} | {r['on_device_peak_device_mib']:.0f} | "
                 f"{r['offload_peak_device_mib']:.0f} | {r['on_device_seconds']:.1f} | {r['offload_seconds']:.1f} | "
                 f"{'yes' if r['same_masks'] else 'no'} |\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=("wanda", "sparsegpt"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON results")
    parser.add_argument("--table", action="store_true", help="print the markdown section and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(memory_section(args.out))
        return 0
    for method in args.methods:
        row = run(method, args)
        peaks = [row[key] for key in ("on_device_peak_device_mib", "offload_peak_device_mib")]
        memory = "no device memory (cpu)" if peaks[0] is None else \
            f"peak {peaks[0]:.0f} MiB on the device with the whole model there, {peaks[1]:.0f} MiB with offload"
        print(f"{method}: model {row['model_mib']:.1f} MiB, {memory}; same masks {row['same_masks']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
