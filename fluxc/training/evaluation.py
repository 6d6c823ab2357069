"""`evaluate`: held-out quality of full attention, all-sparse attention and the router, per task family.

For each family of the ``eval`` section, on examples of the data generator's "eval" split (text, numbers
and seeds that training never sees):

- exact-match families: greedy answers (`fluxc.generate`) scored with `is_correct`;
- perplexity families (`PERPLEXITY_TASKS`): the prompt is prefilled first (the routes are decided there,
  as at inference), then the target tokens are scored as a second chunk that reuses those routes;
- per mode: the fraction of layers routed to SA, per layer too, and the prefill attention work saved
  (`fluxc.stats.attention_work`).

"full" is the untouched model; "sparse" and "router" run the rewritten graph. Writes ``eval.json`` (every
number, the done-criteria of a router (separation, holistic quality, retrieval) and a Markdown table) and ``eval_heatmap.png`` (layers x families, the
router's SA fraction).
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
from fluxc.checkpoint import read_checkpoint
from fluxc.config import FluxConfig
from fluxc.errors import ConfigError
from fluxc.hf_compat import cache_keyword, output_cache
from fluxc.stats import attention_work

from .batches import heldout_examples
from .config import RunConfig
from .data import IGNORE, PERPLEXITY_TASKS, TASKS, Example, end_of_turn_id, is_correct
from .models import DTYPES, load_model, resolve_device
from .trainer import mark_dynamic

log = logging.getLogger("fluxc")

EVAL_JSON = "eval.json"
HEATMAP = "eval_heatmap.png"
CLEARLY_WORSE = 0.10  # all-sparse retrieval accuracy at least this far below full attention


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


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
def _continuation_nll(runner: Any, examples: list[Example], pad: int, device: torch.device) -> tuple[float, int]:
    """Sum of the target tokens' negative log-likelihood and their count; the prompt is one prefill (routes
    decided there), the targets a second chunk that reuses the routes."""
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
    return float(-logp[keep].sum()), int(keep.sum())


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
    timings["data_s"] = time.perf_counter() - t
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = end_of_turn_id(tokenizer) if cfg.data.chat else getattr(tokenizer, "eos_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    layers = _num_layers(model)
    families: dict[str, dict[str, Any]] = {t: {"kind": TASKS[t], "metric": "perplexity" if t in PERPLEXITY_TASKS
                                              else "accuracy", "examples": 0, "modes": {}} for t in spec.tasks}
    samples: dict[str, list[dict[str, Any]]] = {}
    with _recompiles_fail_loudly():
        _run_modes(spec, model, router, flux, tokenizer, data, pad, eos, layers, device, families, samples, timings,
                   out, echo)
    summary, criteria = _summarise(families, spec.capable_threshold)
    result = {"complete": True, "families": families, "summary": summary, "criteria": criteria, "samples": samples,
              "table": markdown_table(families), "config": cfg.to_dict(), "flux": flux.to_dict(),
              "router": router, "router_provenance": read_checkpoint(router).provenance if router else None,
              "lengths": list(spec.lengths), "layers": layers, "timings": timings}
    (out / EVAL_JSON).write_text(json.dumps(result, indent=1, default=str))
    if "router" in spec.modes:
        heatmap(families, out / HEATMAP, layers)
    echo(result["table"])
    echo("criteria: " + json.dumps(criteria))
    echo(f"wrote {out / EVAL_JSON}" + (f" and {out / HEATMAP}" if "router" in spec.modes else ""))
    return result


def _run_modes(spec: Any, model: Any, router: str | None, flux: FluxConfig, tokenizer: Any, data: list[Example],
               pad: int, eos: int | None, layers: int, device: torch.device, families: dict[str, dict[str, Any]],
               samples: dict[str, list[dict[str, Any]]], timings: dict[str, float], out: Path,
               echo: Callable[[str], None]) -> None:
    """Every (mode, family) of `spec`, filling `families` and `samples`; eval.json is rewritten after each."""
    for mode in spec.modes:
        t = time.perf_counter()
        runner = _runner(mode, model, router, flux)
        for task in spec.tasks:
            chosen = [e for e in data if e.task == task]
            families[task]["examples"] = len(chosen)
            correct, nll, tokens = 0, 0.0, 0
            routes: list[torch.Tensor] = []
            lens: list[int] = []
            for chunk in _balanced(chosen, spec.batch_size):
                if task in PERPLEXITY_TASKS:
                    s, n = _continuation_nll(runner, chunk, pad, device)
                    nll, tokens = nll + s, tokens + n
                else:
                    for e, ids in zip(chunk, _answers(runner, chunk, pad, eos, spec.max_new_tokens, device)):
                        text = tokenizer.decode(ids, skip_special_tokens=True)
                        ok = is_correct(text, e.answer)
                        correct += ok
                        shown = samples.setdefault(f"{task}/{mode}", [])
                        if len(shown) < 3:
                            shown.append({"answer": e.answer, "generated": text.strip()[:80], "correct": ok})
                routes.append(_routes(runner, mode, len(chunk), layers))
                lens.extend(e.prompt_len for e in chunk)
            route = torch.cat(routes) if routes else torch.ones(0, layers, dtype=torch.bool)
            work = attention_work(route, lens, flux)
            row: dict[str, Any] = {
                "sa_fraction": float((~route).float().mean()) if len(route) else 0.0,
                "sa_fraction_per_layer": (~route).float().mean(dim=0).tolist() if len(route) else [],
                "work_saved": float(work["skipped"].mean()) if len(route) else 0.0,
            }
            if task in PERPLEXITY_TASKS:
                row.update(nll_per_token=nll / max(1, tokens), perplexity=math.exp(nll / max(1, tokens)), tokens=tokens)
            else:
                row.update(accuracy=correct / max(1, len(chosen)), correct=correct)
            families[task]["modes"][mode] = row
            shown = f"ppl {row['perplexity']:.3f}" if task in PERPLEXITY_TASKS else f"acc {row['accuracy']:.1%}"
            echo(f"eval {mode:<6} {task:<18} {shown}  SA {row['sa_fraction']:.2f}  saved {row['work_saved']:.1%}")
            partial = {"complete": False, "families": families, "samples": samples, "router": router}
            (out / EVAL_JSON).write_text(json.dumps(partial, indent=1, default=str))  # kept if the run is cut short
        timings[f"{mode}_s"] = time.perf_counter() - t
        del runner


def _num_layers(model: Any) -> int:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    layers = getattr(text, "num_hidden_layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__} has no config.num_hidden_layers; fluxc eval needs a Hugging Face "
                          f"style causal LM")
    return int(layers)


def _summarise(families: dict[str, dict[str, Any]], threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pooled numbers per kind and the done-criteria checks (SA-fraction gap, holistic quality, retrieval)."""
    def mode_of(task: str, mode: str) -> dict[str, Any] | None:
        return families[task]["modes"].get(mode)

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
                summary[f"{kind}_{mode}_accuracy"] = sum(r["correct"] for _, r in exact) / max(1, n)
    have = all(k in summary for k in ("retrieval_full_accuracy", "retrieval_sparse_accuracy", "retrieval_router_accuracy"))
    if have:
        full, sparse, routed = (summary[f"retrieval_{m}_accuracy"] for m in ("full", "sparse", "router"))
        criteria["retrieval_router_within_2_points"] = routed >= full - 0.02
        criteria["retrieval_sparse_clearly_worse"] = sparse <= full - CLEARLY_WORSE
    if "retrieval_router_sa_fraction" in summary and "holistic_router_sa_fraction" in summary:
        gap = summary["holistic_router_sa_fraction"] - summary["retrieval_router_sa_fraction"]
        summary["sa_fraction_gap"] = gap
        criteria["sa_gap_at_least_0.3"] = gap >= 0.3
    quality = {}
    for t in holistic:
        full, routed = mode_of(t, "full"), mode_of(t, "router")
        if full is None or routed is None:
            continue
        if "perplexity" in full:
            quality[t] = routed["perplexity"] <= full["perplexity"] * 1.02
        else:
            quality[t] = routed["accuracy"] >= full["accuracy"] * 0.98
    if quality:
        criteria["holistic_quality_within_2_percent"] = all(quality.values())
        criteria["holistic_quality_by_family"] = quality
    return summary, criteria


def markdown_table(families: dict[str, dict[str, Any]]) -> str:
    """The README table: quality per mode, the router's SA fraction and the attention work it saves."""
    lines = ["| family | kind | metric | full | all-sparse | router | router SA fraction | work saved (router) |",
             "|---|---|---|---|---|---|---|---|"]
    for task, f in families.items():
        cells = []
        for mode in ("full", "sparse", "router"):
            r = f["modes"].get(mode)
            if r is None:
                cells.append("-")
            elif f["metric"] == "perplexity":
                cells.append(f"{r['perplexity']:.3f}")
            else:
                cells.append(f"{r['accuracy']:.1%} ({r['correct']}/{f['examples']})")
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
