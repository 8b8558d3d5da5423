"""Token-by-token generation on a GPU: ``model.generate`` with a static cache and
``compile_config``, the way transformers users compile decoding, under eager, Inductor and
backend="hubkernels", for a Llama-3.2-1B-shaped model with random weights.

    python bench/decode.py --out bench/results [--impls eager,inductor,hubkernels]
                           [--modes default,reduce-overhead] [--batches 1,8] [--layers 16]
                           [--vocab 128256] [--prompt 512] [--new-tokens 64] [--reps 3]
                           [--attn sdpa|eager] [--perf-guard off|on|auto]

``--interleave``: Inductor and hubkernels (and ``hubkernels-all``: min_elements=0, every
match replaced; ``hubkernels-local``: that with the RMSNorm kernel given as a local repo,
runtime-checked as kernels that did not come with hubcompile are; or
``hubkernels-local-nochecks``: the same with runtime_checks=0, the checks' cost) compiled
side by side, each on its own copy of the model, then timed in alternating rounds (A B, B A, ...) in the same process, so that whatever the host does
meanwhile falls on both; each row then also carries the median over rounds of its decode
time over Inductor's in the same round, and the rounds' interquartile range.

Fresh processes: one process measures one set of rows; the GPU medians must come from 3
fresh processes (compile caches, allocator state and clocks differ between processes, and
a single process hides that), one implementation per process, all with the same DIR:

    for i in 1 2 3; do for impl in eager inductor hubkernels; do
      TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 python3 bench/decode.py --impls $impl --out DIR
    done; done

Rows of all processes go to ``<out>/decode.jsonl`` and carry their greedy tokens, so a
later process compares its tokens with those of eager and Inductor from an earlier one
(same workload, GPU and torch).

What is timed: per (impl, mode, batch), one warm-up generate (where the decoding forward
compiles: ``compile_s``), then ``--reps`` pairs of generates, one of ``--new-tokens``
tokens and one of a single token (the prefill, which transformers never compiles, and the
first token); decode tok/s = batch * (N - 1) / (t_N - t_1). The cache is a new StaticCache
in each generate, so under reduce-overhead each generate records its CUDA graphs again
(the cache's addresses changed): users pay that too, and it is in the decode time.

generate() compiles the decoding forward only on a GPU (transformers' auto-compile
criteria); ``--small`` (tiny sizes, fp32, CPU: a smoke test of this script) sets
CompileConfig's private ``_compile_all_devices`` so that the CPU run compiles too. Each
row says how many graphs Dynamo compiled and what hubcompile replaced: a row with no
graphs did not compile.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hubcompile  # noqa: E402 - registers backend="hubkernels"
from common import LOCAL_RMSNORM, Records  # noqa: E402
from hubcompile.guards import performance as perf_guard  # noqa: E402

# hubkernels-all: min_elements=0, the launch-bound matches of a decode step replaced too;
# hubkernels-local: that, with the bundled RMSNorm given as a local repo (a kernel that did
# not come with hubcompile: runtime-checked on its first calls, then sampled, issue 25);
# hubkernels-local-nochecks: the same with runtime_checks=0, the checks' baseline.
IMPLS = ("eager", "inductor", "hubkernels", "hubkernels-all", "hubkernels-local", "hubkernels-local-nochecks")
BACKEND_OPTIONS = {
    "hubkernels_all": {"min_elements": 0},
    "hubkernels_local": {"min_elements": 0, "kernels": LOCAL_RMSNORM},
    "hubkernels_local_nochecks": {"min_elements": 0, "kernels": LOCAL_RMSNORM, "runtime_checks": 0},
}


def _backend_with(name: str, settings: dict):
    """backend="hubkernels" with ``settings`` added to its options. A backend of its own, so
    that Dynamo keeps its graphs apart from hubkernels' (hubcompile's settings are not part
    of Dynamo's cache key)."""
    def backend(gm, example_inputs, *, mode=None, options=None):
        from hubcompile.backend import hubkernels

        return hubkernels(gm, example_inputs, mode=mode, options={**(options or {}), **settings})

    backend.__name__ = name
    return backend


for _name, _settings in BACKEND_OPTIONS.items():
    torch._dynamo.register_backend(_backend_with(_name, _settings), name=_name)
BACKENDS = {impl: impl.replace("-", "_") for impl in IMPLS if impl.replace("-", "_") in BACKEND_OPTIONS}


def build(args, device: str):
    """Llama-3.2-1B-shaped (tied embeddings), ``args.layers`` deep, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16) if args.small else dict(hidden_size=2048, intermediate_size=8192,
                                                      num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    config = LlamaConfig(vocab_size=args.vocab, num_hidden_layers=args.layers, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, **dims)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # Built on the device in its dtype: 1.5B random weights drawn on the CPU took most of a
    # process's start. (The same seed gives the same weights in every process.)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype=dtype).eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def compile_config(impl: str, mode: str, small: bool):
    """None for eager; else what generate() hands to torch.compile."""
    if impl == "eager":
        return None
    from transformers import CompileConfig

    # hubcompile's own settings (the perf guard) are not passed as options=: torch.compile
    # refuses mode= and options= together, and CompileConfig always has a mode. main() sets
    # them with hubcompile.configure instead.
    cfg = CompileConfig(backend=BACKENDS.get(impl, impl), mode=mode, fullgraph=True, dynamic=False)
    if small:
        cfg._compile_all_devices = True  # else generate() skips compiling on CPU
    return cfg


def generate(model, ids, new_tokens: int, cfg, device: str):
    """Greedy generate of exactly ``new_tokens`` tokens: (new tokens, wall seconds)."""
    kwargs = dict(compile_config=cfg) if cfg is not None else dict(disable_compile=True)  # eager: no auto-compile
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                         pad_token_id=0, **kwargs)
    _sync(device)
    return out[:, ids.shape[1]:], time.perf_counter() - start


def compare(tokens, ref) -> dict:
    """First new-token index where any sequence differs from ``ref`` (None: identical),
    and how many (sequence, position) entries differ; all None without a reference."""
    if ref is None:
        return {"same": None, "first_diff": None, "n_diff": None}
    ref = torch.tensor(ref)
    if ref.shape != tokens.shape:
        return {"same": False, "first_diff": 0, "n_diff": tokens.numel()}
    differ = tokens.cpu() != ref
    columns = differ.any(dim=0).nonzero()
    return {"same": not columns.numel(), "first_diff": int(columns[0]) if columns.numel() else None,
            "n_diff": int(differ.sum())}


def _ref_key(impl: str, mode: str | None, wl: dict) -> tuple:
    return impl, mode, json.dumps({k: v for k, v in wl.items() if k != "mode"}, sort_keys=True)


def _ref(refs: dict, impl: str, mode: str | None, wl: dict) -> tuple:
    """(tokens, decode tok/s) of ``impl`` on ``wl`` in ``mode``, or (None, None)."""
    return refs.get(_ref_key(impl, mode, wl), (None, None))


def load_refs(path: str, env: dict) -> dict:
    """Tokens and decode tok/s of earlier processes' rows in ``path`` (same GPU and
    torch), by _ref_key: the latest row of each."""
    refs = {}
    if not os.path.exists(path):
        return refs
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            same_env = all(r["env"].get(k) == env[k] for k in ("gpu", "torch"))
            if same_env and r.get("ok") and r.get("tokens") is not None:
                refs[_ref_key(r["impl"], r["wl"]["mode"], r["wl"])] = (r["tokens"], r["tok_s"]["decode"])
    return refs


def time_row(model, ids, cfg, args, device: str) -> dict:
    """Warm-up (the compile), then ``reps`` pairs of an N-token and a 1-token generate."""
    n, batch = args.new_tokens, ids.shape[0]
    _, compile_s = generate(model, ids, n, cfg, device)
    _free(device)
    totals, decodes = [], []
    for _ in range(args.reps):
        tokens, t_n = generate(model, ids, n, cfg, device)
        _, t_1 = generate(model, ids, 1, cfg, device)
        totals.append(t_n)
        decodes.append(t_n - t_1)
    step_ms = sorted(d / (n - 1) * 1e3 for d in decodes)
    total_tok_s = [batch * n / t for t in totals]
    decode_tok_s = [batch * (n - 1) / d for d in decodes]
    return {"tokens": tokens, "compile_s": compile_s,
            "lat_ms": {"p10": step_ms[0], "p50": statistics.median(step_ms), "p90": step_ms[-1],
                       "reps": args.reps, "what": "decode ms per step (t_N - t_1) / (N - 1); p10/p90: min/max"},
            "tok_s": {"decode": statistics.median(decode_tok_s), "total": statistics.median(total_tok_s)},
            "tok_s_spread": {"decode": [min(decode_tok_s), max(decode_tok_s)],
                             "total": [min(total_tok_s), max(total_tok_s)]}}


def run_impl(model, impl: str, mode: str | None, args, device: str, records: Records, refs: dict,
             rows: list) -> None:
    # A fresh Dynamo for each compile config: nothing compiled for another reaches this one.
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    perf_guard.DECISIONS.clear()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call  # transformers caches the compiled __call__ on the model
    cfg = compile_config(impl, mode, args.small)
    for batch in args.batches:
        wl = {"name": f"llama-{args.layers}L-{args.attn}-v{args.vocab}-decode", "layers": args.layers,
              "vocab": args.vocab, "batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
              "mode": mode, "attn": args.attn}
        gen = torch.Generator(device).manual_seed(batch)  # the same prompt in every process
        ids = torch.randint(3, args.vocab, (batch, args.prompt), device=device, generator=gen)
        counters = torch._dynamo.utils.counters  # process totals: this row's are differences
        before, decided = len(hubcompile.RECORDS), len(perf_guard.DECISIONS)
        graphs0, skips0 = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
        _free(device)
        try:
            row = time_row(model, ids, cfg, args, device)
        except Exception as e:  # noqa: BLE001 - a failing row is a result too
            records.add(impl, wl, None, ok=False, err=repr(e)[:500], perf_guard=args.perf_guard)
            print(f"{impl} {mode} b{batch}: FAILED {e!r}"[:500], flush=True)
            continue
        replaced: dict = {}
        for r in hubcompile.RECORDS[before:]:  # this row's compiles only (a new batch recompiles)
            for fam, k in r.replaced.items():
                if k:
                    replaced[fam] = replaced.get(fam, 0) + k
        graphs = counters["stats"]["unique_graphs"] - graphs0
        skips = counters["inductor"]["cudagraph_skips"] - skips0
        _row_record(impl, wl, row, replaced, graphs, skips, args, refs, records, rows,
                    [d.describe() for d in perf_guard.DECISIONS[decided:]])


def _row_record(impl, wl, row, replaced, graphs, skips, args, refs, records, rows, decisions, extra=None) -> None:
    tokens = row.pop("tokens")
    mode = wl["mode"]
    vs_ind = compare(tokens, _ref(refs, "inductor", mode or "default", wl)[0])  # eager: vs default mode
    vs_eager = compare(tokens, _ref(refs, "eager", None, wl)[0])
    refs[_ref_key(impl, mode, wl)] = (tokens.tolist(), row["tok_s"]["decode"])
    records.add(impl, wl, row.pop("lat_ms"), ok=True, **row, replaced=replaced,
                n_replaced=sum(replaced.values()), graphs_compiled=graphs, cudagraph_skips=skips,
                same_tokens_as_inductor=vs_ind["same"], first_diff_vs_inductor=vs_ind["first_diff"],
                n_diff_vs_inductor=vs_ind["n_diff"], same_tokens_as_eager=vs_eager["same"],
                first_diff_vs_eager=vs_eager["first_diff"], n_diff_vs_eager=vs_eager["n_diff"],
                perf_guard=args.perf_guard,
                min_elements=BACKEND_OPTIONS.get(BACKENDS.get(impl), {}).get("min_elements", args.min_elements),
                perf_guard_decisions=decisions, tokens=tokens.tolist(), **(extra or {}))
    rows.append((impl, wl, row, graphs, sum(replaced.values()), vs_ind, vs_eager))
    print(f"{impl} {mode or '-'} b{wl['batch']}: decode {row['tok_s']['decode']:.1f} tok/s, "
          f"compile {row['compile_s']:.1f} s, {graphs} graph(s), replaced {replaced}, "
          f"cudagraph skips {skips}, first diff vs inductor {vs_ind['first_diff']}, "
          f"vs eager {vs_eager['first_diff']}"
          + (f", x Inductor per round {extra['ratio_rounds']['median']:.3f} (IQR {extra['ratio_rounds']['iqr']:.3f})"
             if extra and extra.get("ratio_rounds") else ""), flush=True)


def run_interleaved(base, args, device: str, records: Records, refs: dict, rows: list) -> None:
    """Every impl of ``--impls`` (Inductor first) compiled on its own copy of the model,
    then timed in alternating rounds; see the module's docstring."""
    import copy

    impls = [i for i in args.impls.split(",") if i != "eager"]
    impls.sort(key=lambda i: i != "inductor")
    models = {impl: copy.deepcopy(base) for impl in impls}
    n = args.new_tokens
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        for batch in args.batches:
            wl = {"name": f"llama-{args.layers}L-{args.attn}-v{args.vocab}-decode", "layers": args.layers,
                  "vocab": args.vocab, "batch": batch, "prompt": args.prompt, "new_tokens": n,
                  "mode": mode, "attn": args.attn, "interleaved": True}
            gen = torch.Generator(device).manual_seed(batch)
            ids = torch.randint(3, args.vocab, (batch, args.prompt), device=device, generator=gen)
            counters = torch._dynamo.utils.counters
            compiled = {}
            for impl in impls:  # the compiles: one warm-up generate each
                before, decided = len(hubcompile.RECORDS), len(perf_guard.DECISIONS)
                graphs0, skips0 = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
                cfg = compile_config(impl, mode, args.small)
                _free(device)
                _, compile_s = generate(models[impl], ids, n, cfg, device)
                replaced: dict = {}
                for r in hubcompile.RECORDS[before:]:
                    for fam, k in r.replaced.items():
                        if k:
                            replaced[fam] = replaced.get(fam, 0) + k
                compiled[impl] = dict(cfg=cfg, compile_s=compile_s, replaced=replaced,
                                      graphs=counters["stats"]["unique_graphs"] - graphs0,
                                      skips=counters["inductor"]["cudagraph_skips"] - skips0,
                                      decisions=[d.describe() for d in perf_guard.DECISIONS[decided:]])
            graphs_before = counters["stats"]["unique_graphs"]
            decodes = {impl: [] for impl in impls}
            totals = {impl: [] for impl in impls}
            tokens = {}
            _free(device)
            for r in range(args.reps):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    cfg = compiled[impl]["cfg"]
                    tokens[impl], t_n = generate(models[impl], ids, n, cfg, device)
                    _, t_1 = generate(models[impl], ids, 1, cfg, device)
                    decodes[impl].append(t_n - t_1)
                    totals[impl].append(t_n)
            recompiled = counters["stats"]["unique_graphs"] - graphs_before
            if recompiled:
                print(f"WARNING: {recompiled} graph(s) compiled during the timed rounds ({mode}, b{batch})")
            for impl in impls:
                step_ms = sorted(d / (n - 1) * 1e3 for d in decodes[impl])
                decode_tok_s = [batch * (n - 1) / d for d in decodes[impl]]
                ratios = sorted(ind / d for ind, d in zip(decodes["inductor"], decodes[impl]))
                q = torch.tensor(ratios, dtype=torch.float64).quantile(
                    torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
                row = {"tokens": tokens[impl], "compile_s": compiled[impl]["compile_s"],
                       "lat_ms": {"p10": step_ms[0], "p50": statistics.median(step_ms), "p90": step_ms[-1],
                                  "reps": args.reps, "what": "decode ms per step (t_N - t_1) / (N - 1); "
                                                             "p10/p90: min/max"},
                       "tok_s": {"decode": statistics.median(decode_tok_s),
                                 "total": statistics.median(batch * n / t for t in totals[impl])},
                       "tok_s_spread": {"decode": [min(decode_tok_s), max(decode_tok_s)]}}
                extra = {"ratio_rounds": {"median": q[1], "iqr": q[2] - q[0], "ratios": ratios},
                         "recompiled_while_timed": recompiled}
                c = compiled[impl]
                _row_record(impl, wl, row, c["replaced"], c["graphs"], c["skips"], args, refs, records, rows,
                            c["decisions"], extra)


def _diff(c: dict) -> str:
    return "-" if c["same"] is None else ("same" if c["same"] else f"@{c['first_diff']}")


def print_table(rows: list, refs: dict) -> None:
    """``refs``: Inductor's decode tok/s, of this process or an earlier one."""
    print(f"\n{'impl':11} {'mode':15} {'batch':>5} {'decode tok/s (min-max)':>26} {'x Ind.':>6} "
          f"{'compile s':>9} {'graphs':>6} {'repl.':>5} {'vs Ind.':>7} {'vs eager':>8}")
    for impl, wl, row, graphs, n_replaced, vs_ind, vs_eager in rows:
        mode, batch = wl["mode"], wl["batch"]
        med, (lo, hi) = row["tok_s"]["decode"], row["tok_s_spread"]["decode"]
        ind = _ref(refs, "inductor", mode or "default", wl)[1]
        ratio = f"{med / ind:6.2f}" if ind else "     -"
        print(f"{impl:11} {mode or '-':15} {batch:5} {f'{med:.1f} ({lo:.1f}-{hi:.1f})':>26} {ratio} "
              f"{row['compile_s']:9.1f} {graphs:6} {n_replaced:5} {_diff(vs_ind):>7} {_diff(vs_eager):>8}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--modes", default="default,reduce-overhead", help="torch.compile modes (eager: ignored)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; --small 1,2)")
    parser.add_argument("--layers", type=int, default=None, help="default 16 (--small 2)")
    parser.add_argument("--vocab", type=int, default=None, help="default 128256 (--small 512)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens, default 512 (--small 9)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated, default 64 (--small 5)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--perf-guard", default="off", choices=list(perf_guard.CHOICES))
    parser.add_argument("--min-elements", type=int, default=None,
                        help="hubcompile's min_elements (default: its own; 0 replaces the launch-bound "
                             "matches of a decode step too)")
    parser.add_argument("--interleave", action="store_true",
                        help="time the compiled impls in alternating rounds in this process (see above)")
    parser.add_argument("--small", action="store_true", help="tiny sizes, fp32 on CPU: a smoke test of this script")
    args = parser.parse_args()
    unknown = set(args.impls.split(",")) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {', '.join(sorted(unknown))}; choose from {', '.join(IMPLS)}")
    if {"hubkernels-local", "hubkernels-local-nochecks"} <= set(args.impls.split(",")):
        # runtime_checks=0 switches the checks off for the whole process, the other row's too
        parser.error("hubkernels-local and hubkernels-local-nochecks need a process each (runtime_checks=0 is "
                     "process-wide); run them as two --impls lists")
    for key, full, small in (("batches", "1,8", "1,2"), ("layers", 16, 2), ("vocab", 128256, 512),
                             ("prompt", 512, 9), ("new_tokens", 64, 5)):
        if getattr(args, key) is None:
            setattr(args, key, small if args.small else full)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode time is t_N - t_1)")
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    if args.small:
        # Tiny matmuls gain nothing from threads, and on a shared CPU spinning OpenMP
        # threads made steps of a few ms take hundreds.
        torch.set_num_threads(1)

    # hubkernels' rows only; see compile_config
    hubcompile.configure(perf_guard=args.perf_guard, min_elements=args.min_elements)
    path = os.path.join(args.out, "decode.jsonl")
    records = Records(path, run="decode")
    refs = load_refs(path, records.env)
    model = build(args, device)
    rows: list = []
    if args.interleave:
        if "inductor" not in args.impls.split(","):
            parser.error("--interleave compares with Inductor: --impls must name inductor")
        with torch.no_grad():
            run_interleaved(model, args, device, records, refs, rows)
        print_table(rows, refs)
        return
    with torch.no_grad():
        for impl in args.impls.split(","):
            for mode in [None] if impl == "eager" else args.modes.split(","):
                run_impl(model, impl, mode, args, device, records, refs, rows)
    print_table(rows, refs)


if __name__ == "__main__":
    main()
