"""`evaluate`: held-out quality of full attention, all-sparse attention and the router, per task family.

For each family of the ``eval`` section, on examples of the data generator's "eval" split (text, numbers
and seeds that training never sees):

- exact-match families: greedy answers (`fluxc.generate`) scored with `is_correct`;
- perplexity families (`PERPLEXITY_TASKS`): the prompt is prefilled first (the routes are decided there,
  as at inference), then the target tokens are scored as a second chunk that reuses those routes;
- per mode: the fraction of layers routed to SA, per layer too, and the prefill attention work saved
  (`fluxc.stats.attention_work`).

"full" is the untouched model; "sparse" and "router" run the rewritten graph. Every accuracy has a 95% Wilson
interval, every perplexity a delta-method one over examples, and each mode a paired comparison with full
attention on the same examples. `eval.thresholds` sweeps the router's operating point on one compiled model
("router@t" modes). Writes ``eval.json`` (every number, the done-criteria of a router and a Markdown table),
``eval_heatmap.png`` (layers x families, the router's SA fraction) and, with a sweep, ``pareto.json`` /
``pareto.png`` (quality against SA fraction per family: how users pick an operating point).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fluxc.api import compile as flux_compile
from fluxc.api import last_route
from fluxc.api import sites as fluxc_sites
from fluxc.checkpoint import read_checkpoint
from fluxc.config import FluxConfig
from fluxc.errors import ConfigError, NotTracedError
from fluxc.hf_compat import cache_keyword, output_cache
from fluxc.stats import attention_work

from .batches import heldout_examples
from .config import MODES, RunConfig
from .data import IGNORE, PERPLEXITY_TASKS, TASKS, Example, end_of_turn_id, is_correct
from .models import DTYPES, load_model, resolve_device
from .runs import record_run, run_provenance, sha256_file
from .trainer import mark_dynamic

log = logging.getLogger("fluxc")

EVAL_JSON = "eval.json"
HEATMAP = "eval_heatmap.png"
PARETO_JSON = "pareto.json"
PARETO_PNG = "pareto.png"
CLEARLY_WORSE = 0.10  # all-sparse retrieval accuracy at least this far below full attention


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _local_windows(runner: Any, layers: int) -> dict[int, int]:
    """{layer: window} of the model's own local layers, which no router decides: SA fractions and work saved
    count the other layers."""
    try:
        sites = fluxc_sites(runner)
    except (ConfigError, NotTracedError):  # the untouched model
        return {}
    return {i: site.local_window for i, site in enumerate(sites) if site.local_window} if len(sites) == layers else {}


def _routes(runner: Any, mode: str, batch: int, layers: int) -> torch.Tensor:
    """bool (B, L) of the last prefill, True = full attention."""
    if mode == "full":
        return torch.ones(batch, layers, dtype=torch.bool)
    return last_route(runner).cpu()


@torch.no_grad()
def _answers(runner: Any, examples: list[Example], pad: int, eos: int | None, max_new: int,
             device: torch.device) -> list[list[int]]:
    """Greedy answers (token ids) of a left-padded batch: one prefill (routes decided there), then one token
    per step with a DynamicCache that keeps every key. A loop of its own rather than `fluxc.generate`, so
    the numbers measure the routing alone, whatever decode engine `fluxc.generate` uses."""
    from transformers import DynamicCache

    ids, mask = _left_pad([e.prompt_ids for e in examples], pad, device)
    mark_dynamic(ids, mask)
    cache, keyword = DynamicCache(), cache_keyword(runner)
    step_ids, new = ids, []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]
        if step_ids is ids:
            mark_dynamic(positions)  # the prefill: batch and length symbolic, like ids and mask
        out = runner(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{keyword: cache})
        cache = output_cache(out)
        step_ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        if eos is not None:
            step_ids = torch.where(done[:, None], torch.full_like(step_ids, eos), step_ids)
            done = done | (step_ids[:, 0] == eos)
        new.append(step_ids)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        if bool(done.all()):
            break
    return torch.cat(new, dim=1).tolist() if new else [[] for _ in examples]


@torch.no_grad()
def _continuation_nll(runner: Any, examples: list[Example], pad: int,
                      device: torch.device) -> tuple[list[float], list[int]]:
    """Per example: the sum of its target tokens' negative log-likelihood, and their count. The prompt is one
    prefill (routes decided there), the targets a second chunk that reuses the routes."""
    from transformers import DynamicCache

    ids, mask = _left_pad([e.prompt_ids for e in examples], pad, device)
    targets = [[t for t, lab in zip(e.input_ids[e.prompt_len:], e.labels[e.prompt_len:]) if lab != IGNORE]
               for e in examples]
    width = max(len(t) for t in targets)
    tgt = torch.full((len(examples), width), pad, dtype=torch.long)
    tmask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, t in enumerate(targets):
        tgt[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        tmask[i, : len(t)] = 1
    tgt, tmask = tgt.to(device), tmask.to(device)
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    mark_dynamic(ids, mask, positions)
    keyword = cache_keyword(runner)
    first = runner(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{keyword: cache})
    full_mask = torch.cat([mask, tmask], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)[:, -width:]
    mark_dynamic(tgt, full_mask, positions, dims=(1,))
    second = runner(input_ids=tgt, attention_mask=full_mask, position_ids=positions, use_cache=True,
                    **{keyword: output_cache(first)})
    logits = torch.cat([first.logits[:, -1:], second.logits[:, :-1]], dim=1).float()  # (B, S, V) predicts tgt
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tgt[..., None])[..., 0]  # (B, S)
    keep = tmask.bool()
    return (-logp.masked_fill(~keep, 0.0)).sum(dim=1).tolist(), keep.sum(dim=1).tolist()


# ---------------------------------------------------------------------------------------- statistics

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `correct / n` (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p, z2 = correct / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # contains p despite rounding


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean of per-example values (paired differences) and its 95% normal interval."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, -math.inf, math.inf)
    half = Z95 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return (mean, mean - half, mean + half)


def ratio_ci(sums: list[float], counts: list[int]) -> tuple[float, float, float]:
    """Pooled ratio sum(sums) / sum(counts) (e.g. NLL per token over examples) and its 95% interval, by the
    delta method over examples (the examples are the sampled units, not the tokens)."""
    n, total = len(sums), sum(counts)
    if n == 0 or total == 0:
        return (math.nan, math.nan, math.nan)
    ratio = sum(sums) / total
    if n == 1:
        return (ratio, -math.inf, math.inf)
    mean_count = total / n
    spread = sum((s - ratio * c) ** 2 for s, c in zip(sums, counts)) / (n - 1)
    half = Z95 * math.sqrt(spread / n) / mean_count
    return (ratio, ratio - half, ratio + half)


def versus_full(full: dict[str, Any], other: dict[str, Any]) -> dict[str, Any] | None:
    """`other` against full attention on the same examples (paired): accuracy difference in points, or the
    perplexity ratio, each with its 95% interval."""
    if "outcomes" in full and "outcomes" in other and len(full["outcomes"]) == len(other["outcomes"]):
        diff, low, high = mean_ci([b - a for a, b in zip(full["outcomes"], other["outcomes"])])
        return {"accuracy_diff": diff, "ci95": [low, high]}
    if "nll" in full and "nll" in other and full["target_tokens"] == other["target_tokens"]:
        per_token, low, high = ratio_ci([b - a for a, b in zip(full["nll"], other["nll"])], full["target_tokens"])
        return {"perplexity_ratio": math.exp(per_token), "ci95": [math.exp(low), math.exp(high)]}
    return None


def _balanced(items: list[Example], size: int) -> list[list[Example]]:
    """Consecutive batches of at most `size`, as equal as possible: no batch of one after a full one (a batch
    of one is a shape of its own for Dynamo, which specialises sizes 0 and 1)."""
    count = -(-len(items) // size)
    bounds = [round(i * len(items) / count) for i in range(count + 1)] if count else [0]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


@contextlib.contextmanager
def _recompiles_fail_loudly() -> Iterator[None]:
    """More Dynamo recompiles for this evaluation's modules (prefill, two decode graphs, the scoring chunk, each
    as shapes change), and an error rather than a silent fall-back to the untouched model past the limit."""
    import torch._dynamo.config as dynamo_config

    changes = {name: 64 for name in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, name)}
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        changes["fail_on_recompile_limit_hit"] = True
    with dynamo_config.patch(**changes):
        yield


def _runner(mode: str, model: Any, router: str | None, flux: FluxConfig) -> Any:
    if mode == "full":
        return model
    if mode == "sparse":
        return flux_compile(model, config=flux, route="sparse")
    if router is None:
        raise ConfigError("eval mode 'router' needs a router checkpoint (--router PATH)")
    return flux_compile(model, router, config=flux)


def operating_points(spec: Any) -> list[tuple[str, float | None]]:
    """(mode name, router threshold) in the order evaluated: the modes of `spec` ("router" at spec.threshold),
    then "router@t" for each point of the sweep."""
    points: list[tuple[str, float | None]] = [(m, spec.threshold if m == "router" else None) for m in spec.modes]
    done = {spec.threshold} if "router" in spec.modes else set()
    for t in spec.thresholds:
        if t not in done:
            points.append((f"router@{t:g}", t))
            done.add(t)
    return points


def evaluate(cfg: RunConfig, router: str | None, *, model: Any = None, tokenizer: Any = None,
             echo: Callable[[str], None] = print, device: torch.device | None = None,
             examples: list[Example] | None = None) -> dict[str, Any]:
    """Evaluate `cfg.eval` on held-out examples; writes eval.json and the heatmap to `cfg.eval.out` (or
    `cfg.run.out`) and returns the results (``families``, ``summary``, ``criteria``, ``table``)."""
    spec = cfg.eval
    out = Path(spec.out or cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or resolve_device(cfg.model.device)
    timings: dict[str, float] = {}
    if model is None or tokenizer is None:
        t = time.perf_counter()
        model, tokenizer = load_model(cfg.model.source, gguf=cfg.model.gguf, tokenizer=cfg.model.tokenizer,
                                      dtype=cfg.model.dtype, tiny_layers=cfg.model.tiny_layers, seed=cfg.model.seed)
        model = model.to(device, DTYPES[cfg.model.dtype])
        timings["load_model_s"] = time.perf_counter() - t
    flux = cfg.flux
    if "router" in spec.modes:
        if router is None:
            raise ConfigError("eval.modes includes 'router' but no router checkpoint was given (--router PATH)")
        theirs = read_checkpoint(router).config
        if theirs.method_dict() != flux.method_dict():
            diff = {k: (flux.method_dict()[k], v) for k, v in theirs.method_dict().items() if flux.method_dict()[k] != v}
            echo(f"note: evaluating with the router's SA configuration; [flux] differs on {diff} (config, router)")
            flux = theirs.replace(compiler=flux.compiler, impl=flux.impl)
    t = time.perf_counter()
    data = examples if examples is not None else heldout_examples(cfg, tokenizer, spec.examples)
    data = data[spec.shard[0]::spec.shard[1]]
    timings["data_s"] = time.perf_counter() - t
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = end_of_turn_id(tokenizer) if cfg.data.chat else getattr(tokenizer, "eos_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    layers = _num_layers(model)
    families: dict[str, dict[str, Any]] = {t: {"kind": TASKS[t], "metric": "perplexity" if t in PERPLEXITY_TASKS
                                              else "accuracy", "examples": 0, "modes": {}} for t in spec.tasks}
    samples: dict[str, list[dict[str, Any]]] = {}
    about = {"config": cfg.to_dict(), "flux": flux.to_dict(), "router": router,
             "router_provenance": read_checkpoint(router).provenance if router else None,
             "lengths": list(spec.lengths), "layers": layers, "timings": timings, "provenance": run_provenance(device)}

    def document(complete: bool) -> dict[str, Any]:
        """eval.json: every finished (mode, family) row with the summary, criteria and table they give, so a run
        cut short still leaves a self-describing file (``complete`` false)."""
        summary, criteria = _summarise(families, spec.capable_threshold)
        return {"complete": complete, "families": families, "summary": summary, "criteria": criteria,
                "samples": samples, "table": markdown_table(families), "pareto": pareto(families), **about}

    def write_partial() -> None:
        (out / EVAL_JSON).write_text(json.dumps(document(False), indent=1, default=str))

    with _recompiles_fail_loudly():
        _run_modes(spec, model, router, flux, tokenizer, data, pad, eos, layers, device, families, samples, timings,
                   write_partial, echo)
    result = document(True)
    summary, criteria = result["summary"], result["criteria"]
    wrote = write_evaluation(result, out)
    echo(result["table"])
    echo("criteria: " + json.dumps(criteria))
    index = record_run(cfg, "eval", git=result["provenance"]["git"], router=router, router_sha256=sha256_file(router) if router else None,
                       results=[str(w) for w in wrote], summary=summary, criteria=criteria)
    echo("wrote " + ", ".join(str(w) for w in [*wrote, *([index] if index else [])]))
    return result


def write_evaluation(result: dict[str, Any], out: Path) -> list[Path]:
    """eval.json, the heatmap when the router ran, pareto.json / .png when its operating point was swept."""
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_JSON).write_text(json.dumps(result, indent=1, default=str))
    wrote = [out / EVAL_JSON]
    families = result["families"]
    if any("router" in f["modes"] for f in families.values()):
        heatmap(families, out / HEATMAP, result["layers"])
        wrote.append(out / HEATMAP)
    if any(row.get("threshold") is not None and mode != "router" for f in families.values()
           for mode, row in f["modes"].items()):
        keep = ("router", "router_provenance", "lengths", "config")
        (out / PARETO_JSON).write_text(json.dumps({"families": result["pareto"], **{k: result[k] for k in keep}},
                                                  indent=1, default=str))
        pareto_plot(result["pareto"], out / PARETO_PNG)
        wrote += [out / PARETO_JSON, out / PARETO_PNG]
    return wrote


def _run_modes(spec: Any, model: Any, router: str | None, flux: FluxConfig, tokenizer: Any, data: list[Example],
               pad: int, eos: int | None, layers: int, device: torch.device, families: dict[str, dict[str, Any]],
               samples: dict[str, list[dict[str, Any]]], timings: dict[str, float], write_partial: Callable[[], None],
               echo: Callable[[str], None]) -> None:
    """Every (mode, family) of `spec`, filling `families` and `samples`; eval.json is rewritten after each. The
    router's operating points share one compiled runner: a threshold is data, not a recompile."""
    routed = None
    for mode, threshold in operating_points(spec):
        t = time.perf_counter()
        if threshold is None:
            runner = _runner(mode, model, router, flux)
        else:
            routed = routed if routed is not None else _runner("router", model, router, flux)
            routed.set_threshold(threshold)
            runner = routed
        for task in spec.tasks:
            chosen = [e for e in data if e.task == task]
            families[task]["examples"] = len(chosen)
            outcomes: list[int] = []
            nll: list[float] = []
            tokens: list[int] = []
            routes: list[torch.Tensor] = []
            lens: list[int] = []
            for chunk in _balanced(chosen, spec.batch_size):
                if task in PERPLEXITY_TASKS:
                    sums, counts = _continuation_nll(runner, chunk, pad, device)
                    nll, tokens = nll + sums, tokens + counts
                else:
                    for e, ids in zip(chunk, _answers(runner, chunk, pad, eos, spec.max_new_tokens, device)):
                        text = tokenizer.decode(ids, skip_special_tokens=True)
                        ok = is_correct(text, e.answer)
                        outcomes.append(int(ok))
                        shown = samples.setdefault(f"{task}/{mode}", [])
                        if len(shown) < 3:
                            shown.append({"answer": e.answer, "generated": text.strip()[:80], "correct": ok})
                routes.append(_routes(runner, mode, len(chunk), layers))
                lens.extend(e.prompt_len for e in chunk)
            route = torch.cat(routes) if routes else torch.ones(0, layers, dtype=torch.bool)
            local = _local_windows(runner, layers) if len(route) else {}
            work = attention_work(route, lens, flux, local)
            columns = [layer for layer in range(layers) if layer not in local] if len(route) else []
            row: dict[str, Any] = {
                "threshold": threshold,
                "sa_fraction": float((~route[:, columns]).float().mean()) if columns else 0.0,
                "sa_fraction_per_layer": (~route).float().mean(dim=0).tolist() if len(route) else [],
                "work_saved": float(work["skipped"].mean()) if len(route) else 0.0,
            }
            row["breakdown"] = _breakdown(chosen, outcomes, nll, tokens)
            if task in PERPLEXITY_TASKS:
                per_token, low, high = ratio_ci(nll, tokens)
                row.update(nll_per_token=per_token, perplexity=math.exp(per_token), tokens=sum(tokens),
                           ci95=[math.exp(low), math.exp(high)], nll=nll, target_tokens=tokens)
            else:
                row.update(accuracy=sum(outcomes) / max(1, len(outcomes)), correct=sum(outcomes),
                           ci95=list(wilson(sum(outcomes), len(outcomes))), outcomes=outcomes)
            families[task]["modes"][mode] = row
            shown = f"ppl {row['perplexity']:.3f}" if task in PERPLEXITY_TASKS else f"acc {row['accuracy']:.1%}"
            echo(f"eval {mode:<6} {task:<18} {shown}  SA {row['sa_fraction']:.2f}  saved {row['work_saved']:.1%}")
            write_partial()  # kept if the run is cut short
        timings[f"{mode}_s"] = time.perf_counter() - t
        del runner
    del routed


def _breakdown(examples: list[Example], outcomes: list[int], nll: list[float],
               tokens: list[int]) -> dict[str, dict[str, dict[str, Any]]]:
    """Quality per text domain and per phrasing (template) of the examples: accuracy with its Wilson interval,
    or perplexity, and the example count; shows whether held-out domains and phrasings cost accuracy."""
    out: dict[str, dict[str, dict[str, Any]]] = {"domain": {}, "template": {}}
    for key in out:
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(examples):
            groups.setdefault(getattr(e, key) or "-", []).append(i)
        for name, rows in sorted(groups.items()):
            if outcomes:
                k = sum(outcomes[i] for i in rows)
                out[key][name] = {"examples": len(rows), "accuracy": k / len(rows), "ci95": list(wilson(k, len(rows)))}
            elif nll:
                total, count = sum(nll[i] for i in rows), sum(tokens[i] for i in rows)
                out[key][name] = {"examples": len(rows), "perplexity": math.exp(total / max(1, count)),
                                  "nll": total, "tokens": count}
    return out


def _shard_positions(family_index: int, examples: int, shard: tuple[int, int]) -> list[int]:
    """Indices within its family of the examples shard (i, n) holds of family number `family_index` (the held-out
    list is ordered by family, `examples` each, and a shard takes every n-th example of it from the i-th)."""
    start = family_index * examples
    first = start + (shard[0] - start) % shard[1]
    return [g - start for g in range(first, start + examples, shard[1])]


def merge_evaluations(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One eval.json from those of the shards of one evaluation (`eval.shard`): per family and mode the examples'
    outcomes (or NLLs) in the order one run holds them, with every statistic recomputed from them as one run
    gives it. Runs may split the modes between them (`eval.modes`; say full and router in two shards, all-sparse in
    one): each mode's rows come from the runs that have it, whose shards must be [0, n] ... [n-1, n] of one n. Runs
    share the SA method and the config but for `eval.shard` and `eval.modes`, and those with a router the router;
    ``complete`` when every mode has all its shards and each finished."""
    if not docs:
        raise ConfigError("merge_evaluations: no eval.json to merge")

    def sameness(doc: dict[str, Any]) -> dict[str, str]:
        """What must agree, by name: the config but where outputs go (run), the shard and the modes; the method."""
        config = json.loads(json.dumps(doc.get("config") or {}, default=str))
        config.pop("run", None)
        for key in ("shard", "out", "modes"):
            config.get("eval", {}).pop(key, None)
        parts = {f"config.{k}": v for k, v in config.items()}
        parts.update(flux=doc.get("flux"))
        return {k: json.dumps(v, sort_keys=True, default=str) for k, v in parts.items()}

    reference = sameness(docs[0])
    differ = sorted({k for d in docs[1:] for k, v in sameness(d).items() if reference.get(k) != v})
    routers = {json.dumps(d.get("router_provenance"), sort_keys=True, default=str) for d in docs
               if d.get("router_provenance") is not None}
    if len(routers) > 1:
        differ.append("router")
    if differ:
        raise ConfigError(f"merge_evaluations: the eval.json files differ in {differ};"
                          f" merge only the shards of one evaluation (same router, method and config but eval.shard "
                          f"and eval.modes)")
    shards = [tuple((d.get("config") or {}).get("eval", {}).get("shard", (0, 1))) for d in docs]
    tasks = list((docs[0].get("config") or {}).get("eval", {}).get("tasks") or docs[0]["families"])
    examples = int((docs[0].get("config") or {}).get("eval", {}).get("examples", 0))
    families: dict[str, dict[str, Any]] = {}
    complete = True
    for task, first in docs[0]["families"].items():
        modes = sorted({m for d in docs for m in d["families"].get(task, {}).get("modes", {})},
                       key=lambda m: (MODES.index(m) if m in MODES else len(MODES), m))  # one run's order
        family = {**{k: v for k, v in first.items() if k != "modes"}, "modes": {}, "examples": examples}
        for mode in modes:
            holders = sorted((shards[i], d) for i, d in enumerate(docs) if mode in d["families"][task]["modes"])
            parts = [s for s, _ in holders]
            if len(set(parts)) != len(parts) or len({n for _, n in parts}) != 1:
                raise ConfigError(f"merge_evaluations: mode {mode!r} has shards {[list(s) for s in parts]}, which "
                                  f"repeat or disagree on their count; give each shard [i, n] of one evaluation once")
            complete = complete and len(parts) == parts[0][1] and all(d.get("complete") for _, d in holders)
            rows = [d["families"][task]["modes"][mode] for _, d in holders]
            positions = [_shard_positions(tasks.index(task), examples, s) for s in parts]
            counts = [len(r.get("outcomes") or r.get("nll") or []) for r in rows]
            n = max(1, sum(counts))
            placed = sorted(range(sum(counts)), key=[p for ps, c in zip(positions, counts) for p in ps[:c]].__getitem__)

            def joined(key: str, rows: list[dict[str, Any]] = rows, placed: list[int] = placed) -> list[Any]:
                values = [v for r in rows for v in r[key]]
                return [values[i] for i in placed]  # in the held-out list's order, as one run holds them

            row: dict[str, Any] = {"threshold": rows[0].get("threshold")}
            row["sa_fraction"] = sum(r["sa_fraction"] * c for r, c in zip(rows, counts)) / n
            row["work_saved"] = sum(r["work_saved"] * c for r, c in zip(rows, counts)) / n
            per_layer = [r["sa_fraction_per_layer"] for r in rows if r["sa_fraction_per_layer"]]
            row["sa_fraction_per_layer"] = ([sum(r["sa_fraction_per_layer"][i] * c for r, c in zip(rows, counts)
                                                 if r["sa_fraction_per_layer"]) / n for i in range(len(per_layer[0]))]
                                            if per_layer else [])
            row["breakdown"] = _merge_breakdowns([r.get("breakdown") or {} for r in rows])
            if "outcomes" in rows[0]:
                outcomes = joined("outcomes")
                row.update(accuracy=sum(outcomes) / max(1, len(outcomes)), correct=sum(outcomes),
                           ci95=list(wilson(sum(outcomes), len(outcomes))), outcomes=outcomes)
            else:
                nll, tokens = joined("nll"), joined("target_tokens")
                per_token, low, high = ratio_ci(nll, tokens)
                row.update(nll_per_token=per_token, perplexity=math.exp(per_token), tokens=sum(tokens),
                           ci95=[math.exp(low), math.exp(high)], nll=nll, target_tokens=tokens)
            family["modes"][mode] = row
        families[task] = family
    base = next((d for d in docs if d.get("router_provenance") is not None), docs[0])
    summary, criteria = _summarise(families, (base.get("summary") or {}).get("capable_threshold", 0.5))
    samples: dict[str, list[Any]] = {}
    for d in docs:
        for key, shown in (d.get("samples") or {}).items():
            samples.setdefault(key, []).extend(shown[: max(0, 3 - len(samples.get(key, [])))])
    config = json.loads(json.dumps(base.get("config") or {}))
    config.setdefault("eval", {})["shard"] = [0, 1]
    timings: dict[str, float] = {}
    for d in docs:
        for key, value in (d.get("timings") or {}).items():
            timings[key] = timings.get(key, 0.0) + value
    config["eval"]["modes"] = list(dict.fromkeys(m for f in families.values() for m in f["modes"]))
    return {"complete": complete, "families": families,
            "summary": summary, "criteria": criteria, "samples": samples, "table": markdown_table(families),
            "pareto": pareto(families), "config": config, "flux": base.get("flux"), "router": base.get("router"),
            "router_provenance": base.get("router_provenance"), "lengths": base.get("lengths"),
            "layers": base.get("layers"), "timings": timings,
            "provenance": base.get("provenance"), "merged": [
                {"shard": list(s), "modes": (d.get("config") or {}).get("eval", {}).get("modes"),
                 "complete": d.get("complete"), "provenance": d.get("provenance")} for s, d in zip(shards, docs)]}


def _merge_breakdowns(parts: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """`_breakdown` of the union of shards: accuracy from the groups' counts, perplexity from their NLL sums."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for part in parts:
        for key, groups in part.items():
            for name, g in groups.items():
                into = out.setdefault(key, {}).setdefault(name, {"examples": 0})
                into["examples"] += g["examples"]
                if "accuracy" in g:
                    into["correct"] = into.get("correct", 0) + round(g["accuracy"] * g["examples"])
                elif "nll" in g:
                    into["nll"], into["tokens"] = into.get("nll", 0.0) + g["nll"], into.get("tokens", 0) + g["tokens"]
    for groups in out.values():
        for g in groups.values():
            if "correct" in g:
                k = g.pop("correct")
                g.update(accuracy=k / g["examples"], ci95=list(wilson(k, g["examples"])))
            elif "nll" in g:
                g["perplexity"] = math.exp(g["nll"] / max(1, g["tokens"]))
    return out


def _num_layers(model: Any) -> int:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    layers = getattr(text, "num_hidden_layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__} has no config.num_hidden_layers; fluxc eval needs a Hugging Face "
                          f"style causal LM")
    return int(layers)


RETRIEVAL_MAX_LOSS = 0.03  # routed accuracy within 3 points of full attention, at the CI's far end
HOLISTIC_MIN_SA = 0.7
HOLISTIC_MAX_LOSS = 0.02  # accuracy points, or relative perplexity
MIN_SA_GAP = 0.4


def _summarise(families: dict[str, dict[str, Any]], threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pooled numbers per kind, each mode against full attention (paired, with CIs), and the done-criteria of a
    router: retrieval within 3 points of full at the CI's far end; holistic SA fraction >= 0.7 at quality within
    2 points (or 2% perplexity); SA-fraction gap between the kinds >= 0.4."""
    def mode_of(task: str, mode: str) -> dict[str, Any] | None:
        return families[task]["modes"].get(mode)

    for f in families.values():
        full = f["modes"].get("full")
        for mode, row in f["modes"].items():
            if full is not None and mode != "full":
                row["vs_full"] = versus_full(full, row)
    capable = {t for t, f in families.items()
               if f["metric"] == "perplexity" or (mode_of(t, "full") or {}).get("accuracy", 1.0) >= threshold}
    summary: dict[str, Any] = {"capable_families": sorted(capable),
                               "not_capable": sorted(set(families) - capable), "capable_threshold": threshold}
    criteria: dict[str, Any] = {}
    retrieval = [t for t in families if TASKS[t] == "retrieval" and t in capable]
    holistic = [t for t in families if TASKS[t] == "holistic" and t in capable]
    for kind, tasks in (("retrieval", retrieval), ("holistic", holistic)):
        for mode in ("full", "sparse", "router"):
            rows = [mode_of(t, mode) for t in tasks]
            if not tasks or any(r is None for r in rows):
                continue
            summary[f"{kind}_{mode}_sa_fraction"] = sum(r["sa_fraction"] for r in rows) / len(rows)
            summary[f"{kind}_{mode}_work_saved"] = sum(r["work_saved"] for r in rows) / len(rows)
            exact = [(t, r) for t, r in zip(tasks, rows) if "accuracy" in r]
            if exact:
                n = sum(families[t]["examples"] for t, _ in exact)
                k = sum(r["correct"] for _, r in exact)
                summary[f"{kind}_{mode}_accuracy"] = k / max(1, n)
                summary[f"{kind}_{mode}_accuracy_ci95"] = list(wilson(k, n))
    retrieval_ok = {}
    for t in retrieval:
        versus = (mode_of(t, "router") or {}).get("vs_full")
        if versus is not None and "accuracy_diff" in versus:
            retrieval_ok[t] = versus["ci95"][0] >= -RETRIEVAL_MAX_LOSS
    if retrieval_ok:
        criteria["retrieval_within_3_points_at_ci_end"] = all(retrieval_ok.values())
        criteria["retrieval_by_family"] = retrieval_ok
    if "retrieval_sparse_accuracy" in summary and "retrieval_full_accuracy" in summary:
        criteria["retrieval_sparse_clearly_worse"] = (summary["retrieval_sparse_accuracy"]
                                                      <= summary["retrieval_full_accuracy"] - CLEARLY_WORSE)
    if "retrieval_router_sa_fraction" in summary and "holistic_router_sa_fraction" in summary:
        gap = summary["holistic_router_sa_fraction"] - summary["retrieval_router_sa_fraction"]
        summary["sa_fraction_gap"] = gap
        criteria["sa_gap_at_least_0.4"] = gap >= MIN_SA_GAP
    holistic_ok = {}
    for t in holistic:
        routed = mode_of(t, "router")
        versus = (routed or {}).get("vs_full")
        if routed is None or versus is None:
            continue
        quality = (versus["accuracy_diff"] >= -HOLISTIC_MAX_LOSS if "accuracy_diff" in versus
                   else versus["perplexity_ratio"] <= 1 + HOLISTIC_MAX_LOSS)
        holistic_ok[t] = {"sa_fraction_at_least_0.7": routed["sa_fraction"] >= HOLISTIC_MIN_SA,
                          "quality_within_2_points": quality}
    if holistic_ok:
        criteria["holistic_sparse_at_full_quality"] = all(all(v.values()) for v in holistic_ok.values())
        criteria["holistic_by_family"] = holistic_ok
    return summary, criteria


def pareto(families: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per family: every evaluated operating point (forced full and sparse, the router at each threshold) as
    (SA fraction, metric with its CI), the router's points ordered by threshold."""
    out: dict[str, Any] = {}
    for task, f in families.items():
        metric = "perplexity" if f["metric"] == "perplexity" else "accuracy"
        points = [{"mode": mode, "threshold": row.get("threshold"), "sa_fraction": row["sa_fraction"],
                   "work_saved": row["work_saved"], metric: row[metric], "ci95": row.get("ci95"),
                   "vs_full": row.get("vs_full")} for mode, row in f["modes"].items()]
        points.sort(key=lambda p: (p["threshold"] is not None, p["threshold"] or 0.0, p["mode"]))
        out[task] = {"kind": f["kind"], "metric": metric, "examples": f["examples"], "points": points}
    return out


def pareto_plot(front: dict[str, Any], path: Path) -> None:
    """PNG: per family, quality against SA fraction along the router's thresholds, with forced full and
    all-sparse beside it and 95% CIs as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(front)
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    FigureCanvasAgg(fig)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(rows, cols, i + 1)
        f = front[task]
        metric = f["metric"]
        for label, pick, style in (("router (thresholds)", lambda p: p["threshold"] is not None, "o-"),
                                   ("full", lambda p: p["mode"] == "full", "s"),
                                   ("all-sparse", lambda p: p["mode"] == "sparse", "^")):
            chosen = [p for p in f["points"] if pick(p)]
            if not chosen:
                continue
            xs = [p["sa_fraction"] for p in chosen]
            ys = [p[metric] for p in chosen]
            err = [[max(0.0, y - (p["ci95"] or [y, y])[0]) for p, y in zip(chosen, ys)],
                   [max(0.0, (p["ci95"] or [y, y])[1] - y) for p, y in zip(chosen, ys)]]
            ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=label, markersize=5)
            if label.startswith("router"):
                for p, x, y in zip(chosen, xs, ys):
                    ax.annotate(f"{p['threshold']:g}", (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
        ax.set_title(f"{task} ({f['kind']}, n={f['examples']})", fontsize=9)
        ax.set_xlabel("SA fraction (layers sparse)")
        ax.set_ylabel(metric)
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("quality against sparsity: the router's operating points (labels: threshold)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(families: dict[str, dict[str, Any]]) -> str:
    """The README table: quality per mode with its 95% CI, the router's SA fraction and the attention work it
    saves."""
    lines = ["| family | kind | metric | full | all-sparse | router | router SA fraction | work saved (router) |",
             "|---|---|---|---|---|---|---|---|"]
    for task, f in families.items():
        cells = []
        for mode in ("full", "sparse", "router"):
            r = f["modes"].get(mode)
            ci = (r or {}).get("ci95")
            if r is None:
                cells.append("-")
            elif f["metric"] == "perplexity":
                cells.append(f"{r['perplexity']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            else:
                cells.append(f"{r['accuracy']:.1%} ({r['correct']}/{f['examples']})"
                             + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else ""))
        routed = f["modes"].get("router")
        sa = f"{routed['sa_fraction']:.2f}" if routed else "-"
        saved = f"{routed['work_saved']:.1%}" if routed else "-"
        metric = "perplexity" if f["metric"] == "perplexity" else "accuracy"
        lines.append(f"| {task} | {f['kind']} | {metric} | {' | '.join(cells)} | {sa} | {saved} |")
    return "\n".join(lines)


def heatmap(families: dict[str, dict[str, Any]], path: Path, layers: int) -> None:
    """PNG of the router's SA fraction per layer (rows) and family (columns)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [t for t, f in families.items() if "router" in f["modes"]]
    grid = torch.tensor([families[t]["modes"]["router"]["sa_fraction_per_layer"] or [0.0] * layers
                         for t in tasks]).T  # (L, F)
    fig = Figure(figsize=(1.2 * len(tasks) + 2.5, 0.22 * layers + 2.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({TASKS[t]})" for t in tasks], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(layers))
    ax.set_yticklabels([str(i) for i in range(layers)], fontsize=6)
    ax.set_ylabel("layer")
    ax.set_title("router: fraction of held-out prompts routed to sparse attention")
    fig.colorbar(im, ax=ax, label="SA fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
