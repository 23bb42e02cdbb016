"""The seed methods' learned and searched allocations on a causal language model (a tiny random Llama): UniPTS's
reducing-regrowing search, scored end to end on calibration windows, and FCPTS's thresholds learned during
distillation (and carried over as ``allocation: fcpts``) meet the target exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ptsparse
from ptsparse.allocation import AllocationContext, LayerBudget, ReducingRegrowingSearch, target_count
from ptsparse.allocation.unipts_search import FitnessEvaluator
from ptsparse.data import as_calibration
from ptsparse.errors import ConfigError
from ptsparse.targets import find_targets

transformers = pytest.importorskip("transformers")

VOCAB, WINDOWS, SEQ = 96, 24, 16
SEARCH = {"unipts_search_population": 4, "unipts_search_generations": 2, "unipts_search_parents": 2,
          "unipts_search_elites": 1, "unipts_search_fit_samples": 16}


@pytest.fixture(scope="module")
def llama():
    """A 2-layer Llama with random weights (seeded) in ptsparse's causal-LM wrapper."""
    from ptsparse.models.zoo import HFCausalLM

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return HFCausalLM(transformers.LlamaForCausalLM(config)).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (WINDOWS, SEQ), generator=torch.Generator().manual_seed(0))


def assert_exact(result, sparsity: float) -> None:
    targets = find_targets(result.model)
    total = sum(t.numel for t in targets)
    zeros = sum(int((t.weight == 0).sum()) for t in targets)
    assert zeros == round(sparsity * total)
    assert not any("lm_head" in t.name for t in targets)


def budgets(model) -> list[LayerBudget]:
    return [LayerBudget(t.name, tuple(t.shape)) for t in find_targets(model)]


# --- UniPTS search -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_searched_allocation_meets_the_target_exactly(llama, windows, criterion, sparsity):
    before = {name: value.clone() for name, value in llama.state_dict().items()}
    result = ptsparse.sparsify(llama, windows, method="magnitude", allocation="unipts_search", criterion=criterion,
                               sparsity=sparsity, batch_size=8, progress=False, **SEARCH)
    assert_exact(result, sparsity)
    search = result.report["allocation_search"]
    assert search["best_fitness"] >= max(search["erk_fitness"], search["uniform_regrowth_fitness"])
    assert all(torch.equal(value, before[name]) for name, value in llama.state_dict().items())  # dense untouched
    if search["best"] != "erk":  # a searched genome: no layer sparser than P + delta
        assert max(layer["target"] for layer in result.report["layers"]) <= sparsity + 0.05 + 1e-9


def test_without_batchnorm_the_fitness_scores_windows_of_the_whole_sample(llama, windows):
    context = AllocationContext(llama, find_targets(llama), as_calibration(windows), batch_size=8)
    evaluate = FitnessEvaluator(context, bn_samples=256, fit_samples=16, seed=3)
    assert len(evaluate.fit_slice) == 16 and len(evaluate.bn_slice) == WINDOWS - 16  # no BatchNorm slice taken
    rows = {tuple(row) for row in windows.tolist()}
    fit = {tuple(row) for row in evaluate.fit_slice.inputs.tolist()}
    rest = {tuple(row) for row in evaluate.bn_slice.inputs.tolist()}
    assert fit | rest == rows and not fit & rest
    whole = FitnessEvaluator(context, fit_samples=256, seed=3)  # the default 256: every window, none left over
    assert len(whole.fit_slice) == WINDOWS and len(whole.bn_slice) == 0
    counts = {t.name: t.numel // 2 for t in context.targets}
    with pytest.raises(ConfigError, match=r"none are left; give more samples or a unipts_search_fit_samples below "
                                          r"24") as error:
        whole.after_distillation(counts, steps=1)
    assert "\n" not in str(error.value)


def test_the_fitness_is_the_kl_of_the_whole_models_next_token_distributions(llama, windows):
    """End to end on the held-out windows, per token: minus the mean over windows and positions of
    KL(dense || sparse) at the fitness temperature, on a model with the candidate's magnitude masks."""
    context = AllocationContext(llama, find_targets(llama), as_calibration(windows), batch_size=8)
    evaluate = FitnessEvaluator(context, fit_samples=16, temperature=2.0, seed=1)
    counts = {t.name: int(0.6 * t.numel) for t in context.targets}
    sparse = copy.deepcopy(llama)
    with torch.no_grad():
        for target in find_targets(sparse):
            weight = target.weight.flatten()
            weight[weight.abs().argsort(stable=True)[: counts[target.name]]] = 0
        inputs = evaluate.fit_slice.inputs
        dense, pruned = llama(inputs) / 2.0, sparse(inputs) / 2.0
    per_token = (dense.softmax(-1) * (dense.log_softmax(-1) - pruned.log_softmax(-1))).sum(-1)
    assert per_token.shape == (16, SEQ)
    assert evaluate(counts)[0] == pytest.approx(-float(per_token.mean()), rel=1e-4)


def test_the_search_prefers_what_its_fitness_rewards_on_a_language_model(llama, windows):
    """The returned allocation is the best scored (ERK and uniform regrowth among the candidates), and the
    same seed gives the same allocation."""
    context = AllocationContext(llama, find_targets(llama), as_calibration(windows), batch_size=8)
    layers = budgets(llama)
    found = []
    for _ in range(2):
        search = ReducingRegrowingSearch(population=4, generations=2, parents=2, elites=1, fit_samples=16, seed=2)
        ratios = search.allocate(layers, 0.6, context=context)
        counts = {l.name: round(ratios[l.name] * l.numel) for l in layers}
        assert sum(counts.values()) == target_count(layers, 0.6)
        report = search.summary()
        assert report["fit_samples"] == 16 and report["bn_samples"] == WINDOWS - 16
        assert report["best_fitness"] >= max(report["erk_fitness"], report["uniform_regrowth_fitness"])
        found.append(counts)
    assert found[0] == found[1]
    evaluate = FitnessEvaluator(context, fit_samples=16, seed=2)
    assert evaluate(found[0])[0] == pytest.approx(report["best_fitness"], rel=1e-6)


# --- FCPTS's learned thresholds --------------------------------------------------------------------------------

def test_fcpts_learns_per_layer_thresholds_and_meets_the_target_exactly(llama, windows):
    result = ptsparse.sparsify(llama, windows, method="fcpts", sparsity=0.6, distill_iterations=6, batch_size=8,
                               progress=False)
    assert_exact(result, 0.6)
    recovery = result.report["recovery"]
    assert recovery["dynamics"] == "learned_thresholds" and recovery["iterations"] == 6
    initial, learned = recovery["initial_allocation"], recovery["learned_allocation"]
    assert initial.keys() == learned.keys() == result.masks.keys()
    assert initial != learned  # the thresholds moved the per-layer sparsities
    achieved = {layer["name"]: layer["achieved"] for layer in result.report["layers"]}
    targets = {t.name: t for t in find_targets(result.model)}
    for name, mask in result.masks.items():
        assert bool((targets[name].weight[~mask] == 0).all()), name
        assert abs(achieved[name] - learned[name]) <= 1.5 / targets[name].numel  # the projection keeps each layer's


def test_fcpts_learned_allocation_carries_over_to_wanda(llama, windows):
    result = ptsparse.sparsify(llama, windows, method="wanda", allocation="fcpts", sparsity=0.6,
                               distill_iterations=4, batch_size=8, progress=False)
    assert_exact(result, 0.6)
    learned = result.report["allocation_search"]["learned"]
    assert {layer["name"]: layer["target"] for layer in result.report["layers"]} == learned
    assert len(set(learned.values())) > 1  # not the uniform allocation wanda runs by default
