"""The evaluation loop: sample N responses per problem, verify them, aggregate the metrics.

    problems --(chunks of problems_per_chunk problems x N samples, one generate call each)-->
    records (prompt, response, answer, correct, num_tokens) --append--> samples.jsonl
    samples.jsonl --(verifier groups answers for maj@k)--> results.json

Every chunk's seed is a function of (seed, benchmark, chunk index) (``EvalSettings.sampling``), so
a run resumed from ``samples.jsonl`` regenerates only the chunks it lacks and gets the very
samples an uninterrupted run would have. ``evaluate`` is what the CLI and the trainer call: the
trainer passes its in-memory policy (and may pass its own generator, e.g. a vLLM engine).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from .metrics import benchmark_metrics, k_ladder, macro_average, majority_vote
from .samples import SampleKey, append_samples, load_samples
from .settings import EvalSettings

RESULTS, SAMPLES, CONFIG, TIMING = "results.json", "samples.jsonl", "eval_config.json", "timing.json"


@dataclasses.dataclass(frozen=True)
class Chunk:
    benchmark: str
    index: int  # chunk number within the benchmark; seeds its sampling
    problems: tuple[int, ...]  # problem indices it covers
    n: int  # samples per problem

    def sample_keys(self) -> list[SampleKey]:
        return [(self.benchmark, i, j) for i in self.problems for j in range(self.n)]


def plan_chunks(benchmark: str, n_problems: int, settings: EvalSettings) -> list[Chunk]:
    """Fixed problem groups: chunk c always covers the same problems, whatever was done before."""
    per, n = settings.problems_per_chunk(benchmark), settings.n_samples(benchmark)
    return [
        Chunk(benchmark, c, tuple(range(start, min(start + per, n_problems))), n)
        for c, start in enumerate(range(0, n_problems, per))
    ]


def encode_prompt(problem, tokenizer, settings: EvalSettings) -> tuple[str, list[int]]:
    """The templated prompt text (``stapo.data.build_prompt``, the trainer's templates) and its ids."""
    from ..data.prompts import chat_mode
    from ..data.prompts import encode_prompt as encode

    return encode(problem, tokenizer, settings.template, chat_mode(settings.chat_template))


def run_chunk(
    chunk: Chunk, problems: list, prompts: dict, generator, pool, settings: EvalSettings
) -> list[dict]:
    """Generate and verify one chunk; returns its records in (problem, sample) order."""
    from ..rewards.correct import is_correct
    from ..rewards.math_reward import final_answer, gold_parts

    sampling = settings.sampling(chunk.benchmark, chunk.index)
    gens = generator.generate([prompts[i][1] for i in chunk.problems], sampling)  # [P_c][n]
    rows = [(i, j, g) for i, per_problem in zip(chunk.problems, gens) for j, g in enumerate(per_problem)]
    if len(rows) != len(chunk.sample_keys()):
        raise RuntimeError(
            f"generator returned {len(rows)} samples for a chunk of {len(chunk.sample_keys())}"
        )
    rewards = pool.score_batch([g.text for _, _, g in rows], [problems[i].answer for i, _, _ in rows])
    return [
        {
            "benchmark": chunk.benchmark,
            "problem_index": i,
            "problem_id": problems[i].id,
            "sample_index": j,
            "prompt": prompts[i][0],
            "response": g.text,
            # the answer the math reward judged (a k-part gold also takes the last k boxes)
            "answer": final_answer(g.text, len(gold_parts(problems[i].answer)), strict=settings.strict),
            "gold": problems[i].answer,
            "correct": is_correct(r),
            "num_tokens": len(g.response_ids),
            "finish_reason": g.finish_reason,
        }
        for (i, j, g), r in zip(rows, rewards)
    ]


def evaluate(
    model,
    tokenizer,
    problems_by_benchmark: dict[str, list],
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    generator=None,
    model_name: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate ``model`` on each benchmark's problems; writes samples.jsonl and results.json.

    Resumes from ``out_dir/samples.jsonl`` when the model, dtype and settings match the ones recorded
    in ``eval_config.json`` (a mismatch is an error, never a silent mix of two protocols). One process
    writes ``out_dir`` at a time (``stapo.locking``). ``dtype`` defaults to the model's own.
    ``generator`` defaults to ``eval_generator(settings, model, tokenizer)``.
    Returns the results dict (see ``aggregate``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with out_lock(out):
        return _evaluate(model, tokenizer, problems_by_benchmark, settings, out, generator, model_name, dtype,
                         progress)


def out_lock(out: Path):
    """The one-writer lock of an eval output folder."""
    from ..locking import DirLock

    return DirLock(out, label="--out", hint="choose another --out").held()


def _evaluate(model, tokenizer, problems_by_benchmark, settings, out, generator, model_name, dtype, progress):
    from ..rewards import RewardPool

    problems_by_benchmark = {b: list(p)[: settings.limit] for b, p in problems_by_benchmark.items()}
    for b, probs in problems_by_benchmark.items():
        if not probs:
            raise ValueError(f"benchmark {b!r}: no problems to evaluate")
    name = model_name or getattr(model, "name_or_path", None) or "in-memory model"
    dtype = dtype or str(getattr(model, "dtype", "unknown")).removeprefix("torch.")
    record = config_record(str(name), dtype, settings, list(problems_by_benchmark))
    check_config(out / CONFIG, record)
    write_config(out / CONFIG, record)

    done = load_samples(out / SAMPLES)
    chunks = [c for b, probs in problems_by_benchmark.items() for c in plan_chunks(b, len(probs), settings)]
    todo = [c for c in chunks if any(k not in done for k in c.sample_keys())]
    with RewardPool(
        "math", num_workers=settings.reward_workers, timeout=settings.reward_timeout, strict=settings.strict
    ) as pool:
        if todo:
            if generator is None:
                from ..rollout import eval_generator

                generator = eval_generator(settings, model, tokenizer)
            timing = _generate_all(
                todo,
                problems_by_benchmark,
                tokenizer,
                generator,
                pool,
                settings,
                out / SAMPLES,
                done,
                progress,
            )
            (out / TIMING).write_text(json.dumps(timing, indent=2) + "\n")
        results = aggregate(problems_by_benchmark, done, settings, pool, model_name=str(name))
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _generate_all(todo, problems_by_benchmark, tokenizer, generator, pool, settings, path, done, progress):
    """Run the missing chunks in order, appending each to ``path`` and ``done`` as it finishes."""
    from ..progress import Reporter

    total = sum(len(c.sample_keys()) for c in todo)
    per_bench = {b: sum(len(c.sample_keys()) for c in todo if c.benchmark == b) for b in problems_by_benchmark}
    prompts: dict[str, dict] = {b: {} for b in problems_by_benchmark}
    tokens, start = 0, time.perf_counter()
    with Reporter("eval", quiet=not progress) as reporter:  # stderr: stdout carries the results table
        tasks = {}
        for chunk in todo:
            if chunk.benchmark not in tasks:  # a benchmark's clock starts with its first chunk
                tasks[chunk.benchmark] = reporter.task(chunk.benchmark, per_bench[chunk.benchmark])
            probs, cache = problems_by_benchmark[chunk.benchmark], prompts[chunk.benchmark]
            for i in chunk.problems:
                if i not in cache:
                    cache[i] = encode_prompt(probs[i], tokenizer, settings)
            records = run_chunk(chunk, probs, cache, generator, pool, settings)
            # a chunk is regenerated whole (its RNG is shared), but only the missing samples are kept
            new = [r for r in records if (r["benchmark"], r["problem_index"], r["sample_index"]) not in done]
            append_samples(path, new)
            for r in new:
                done[(r["benchmark"], r["problem_index"], r["sample_index"])] = r
            tokens += sum(r["num_tokens"] for r in records)
            tasks[chunk.benchmark].advance(len(records))
    seconds = time.perf_counter() - start
    if progress:
        print(
            f"stapo eval: generated {total} samples, {tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.1f} "
            "tokens/s, generation + verification)",
            file=sys.stderr,
        )
    return {
        "samples": total,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }


def aggregate(
    problems_by_benchmark: dict[str, list],
    samples: dict[SampleKey, dict],
    settings: EvalSettings,
    pool,
    model_name: str = "",
) -> dict:
    """Metrics per benchmark and their macro average, from the stored samples.

    maj@k groups answers with the verifier (``pool.verify_pairs``): two samples vote together
    when their answers are the same string or math-verify says they are equal.
    """
    per_bench: dict[str, dict] = {}
    for bench, probs in problems_by_benchmark.items():
        n = settings.n_samples(bench)
        rows = []
        for i in range(len(probs)):
            try:
                rows.append([samples[(bench, i, j)] for j in range(n)])
            except KeyError as err:
                raise RuntimeError(f"{bench}: sample {err.args[0]} missing after generation") from err
        equivalent = _answer_equivalence(
            [[r["answer"] for r in row] for row in rows], [p.answer for p in probs], pool
        )
        votes = {k: [_vote(row[:k], i, equivalent) for i, row in enumerate(rows)] for k in k_ladder(n)}
        metrics = benchmark_metrics([[r["correct"] for r in row] for row in rows], votes)
        flat = [r for row in rows for r in row]
        metrics["mean_tokens"] = sum(r["num_tokens"] for r in flat) / len(flat)
        metrics["truncated_frac"] = sum(r["finish_reason"] == "length" for r in flat) / len(flat)
        metrics["no_answer_frac"] = sum(r["answer"] is None for r in flat) / len(flat)
        per_bench[bench] = metrics
    return {
        "model": model_name,
        "settings": settings.to_dict(),
        "benchmarks": per_bench,
        "macro": macro_average(per_bench),
    }


def _vote(samples: list[dict], problem: int, equivalent) -> bool:
    """maj@k of one problem over ``samples`` (its first k)."""
    return majority_vote(
        [r["answer"] for r in samples],
        [r["correct"] for r in samples],
        lambda a, b: equivalent(problem, a, b),
    )


def _answer_equivalence(answers: list[list[str | None]], golds: list, pool):
    """equivalent(problem, a, b) for samples a < b, from one batched verifier call.

    Only pairs of distinct strings are verified, ordered by first appearance; that covers every
    (class representative, later sample) query ``majority_vote`` makes, because a representative's
    answer always appears no later than the answers compared with it. The earlier answer plays the
    gold role in ``verify(gold, pred)``; for a k-part gold (OlympiadBench) it is split into its k
    parts, so two answers are equal when their parts match as the reward matches them.
    """
    from ..rewards.extract import answer_parts
    from ..rewards.math_reward import gold_parts

    pairs, index = [], {}
    for i, row in enumerate(answers):
        k = len(gold_parts(golds[i]))
        distinct = list(dict.fromkeys(a for a in row if a is not None))
        for u in range(len(distinct)):
            parts = answer_parts(distinct[u], k) if k > 1 else [distinct[u]]
            as_gold = parts if len(parts) == k > 1 else distinct[u]
            for v in range(u + 1, len(distinct)):
                index[(i, distinct[u], distinct[v])] = len(pairs)
                pairs.append((as_gold, distinct[v]))
    verdicts = pool.verify_pairs(pairs) if pairs else []

    def equivalent(i: int, a: int, b: int) -> bool:
        x, y = answers[i][a], answers[i][b]
        if x == y:
            return True
        pos = index.get((i, x, y))
        if pos is None:  # asked in the other order: only reachable if the invariant above breaks
            raise AssertionError(f"answer pair ({x!r}, {y!r}) was not verified")
        return bool(verdicts[pos])

    return equivalent


def config_record(model_name: str, dtype: str, settings: EvalSettings, benchmarks: list[str]) -> dict:
    """What ``eval_config.json`` records: everything that changes a stored sample."""
    return {"model": model_name, "dtype": dtype, "signature": settings.signature(benchmarks)}


def _diffs(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every recorded setting ``new`` changes (a benchmark's own once per key)."""
    out = [f"{k}: {old.get(k, 'not recorded')!r} -> {new[k]!r}" for k in ("model", "dtype") if old.get(k) != new[k]]
    old_sig = old.get("signature", {})
    for key, value in new["signature"].items():
        if key == "per_benchmark":
            for b, v in value.items():
                if b in old_sig.get(key, {}) and old_sig[key][b] != v:
                    out.append(f"{b}: {old_sig[key][b]} -> {v}")
        elif old_sig.get(key) != value:
            out.append(f"{key}: {old_sig.get(key)!r} -> {value!r}")
    return out


def check_config(path: Path, record: dict) -> None:
    """Refuse to resume into ``path``'s folder with settings that would change the samples."""
    if not path.exists():
        return
    diffs = _diffs(json.loads(path.read_text()), record)
    if diffs:
        raise ValueError(
            f"{path.parent}: holds samples from other settings ({'; '.join(diffs)}); "
            "resume with the recorded settings, choose another --out, or delete this one"
        )


def write_config(path: Path, record: dict) -> None:
    """Record the folder's settings; benchmarks recorded before stay recorded (their samples stay)."""
    if path.exists():
        old = json.loads(path.read_text()).get("signature", {}).get("per_benchmark", {})
        record = {**record, "signature": {**record["signature"],
                                          "per_benchmark": {**old, **record["signature"]["per_benchmark"]}}}
    path.write_text(json.dumps(record, indent=2) + "\n")
