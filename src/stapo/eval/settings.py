"""Evaluation settings: the paper's protocol as defaults, every part overridable.

Protocol (STAPO, arXiv 2602.15620, Table 1): avg@32 on AIME24, AIME25 and AMC23 and
avg@4 on MATH500, Minerva and OlympiadBench, sampled at the training decoding (temperature 1.0,
top-p 1.0, ``train``) or at JustRL's evaluation decoding (0.7 / 0.9, ``justrl``, the default).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

PAPER_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")

# N samples per problem: 32 on the three small competition sets (30-40 problems, so avg@N needs
# many samples to be stable), 4 on the three large ones (272-675 problems)
DEFAULT_SAMPLES = {"aime24": 32, "aime25": 32, "amc23": 32, "math500": 4, "minerva": 4, "olympiadbench": 4}
FALLBACK_SAMPLES = 4  # a benchmark the paper does not use

# name -> (temperature, top_p)
DECODING_PRESETS = {"justrl": (0.7, 0.9), "train": (1.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    benchmarks: tuple[str, ...] = PAPER_BENCHMARKS
    samples: dict[str, int] = dataclasses.field(default_factory=dict)  # per-benchmark N overrides
    decoding: str = "justrl"  # a DECODING_PRESETS name
    temperature: float | None = None  # overrides the preset's temperature
    top_p: float | None = None  # overrides the preset's top-p
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 8192
    template: str = "boxed"  # stapo.data.build_prompt template
    chat_template: str = "auto"  # "auto" | "on" | "off": apply the tokenizer's chat template
    limit: int | None = None  # first K problems of each benchmark
    seed: int = 0
    batch_size: int = 64  # (problem x sample) rows per generate call
    backend: str = "hf"  # a registered rollout backend: "hf" | "vllm"
    reward_workers: int = 2
    reward_timeout: float = 2.0  # seconds per verification before it scores 0
    strict: bool = False  # require a \boxed{} answer (see stapo.rewards)

    def __post_init__(self):
        if self.decoding not in DECODING_PRESETS:
            raise ValueError(
                f"eval.decoding: unknown preset {self.decoding!r}; choose from {list(DECODING_PRESETS)}"
            )
        if not self.benchmarks:
            raise ValueError("eval.benchmarks: empty list")
        from ..rollout.backends import get_backend

        try:
            get_backend(self.backend)
        except ValueError as err:
            raise ValueError(f"--backend: {err}") from None
        for name, n in self.samples.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"eval.samples[{name!r}]: need a positive integer, got {n!r}")
        for field, value, lo in [
            ("max_new_tokens", self.max_new_tokens, 1),
            ("batch_size", self.batch_size, 1),
        ]:
            if value < lo:
                raise ValueError(f"eval.{field}: must be >= {lo}, got {value}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval.limit: must be >= 1, got {self.limit}")
        if self.chat_template not in ("auto", "on", "off"):
            raise ValueError(f"eval.chat_template: choose auto, on or off, got {self.chat_template!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalSettings:
        """Build from a config mapping; unknown keys are an error naming the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"eval: unknown setting(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("benchmarks"), str):
            d["benchmarks"] = tuple(b.strip() for b in d["benchmarks"].split(",") if b.strip())
        elif "benchmarks" in d:
            d["benchmarks"] = tuple(d["benchmarks"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["benchmarks"] = list(self.benchmarks)
        return d

    def n_samples(self, benchmark: str) -> int:
        return self.samples.get(benchmark, DEFAULT_SAMPLES.get(benchmark, FALLBACK_SAMPLES))

    def problems_per_chunk(self, benchmark: str) -> int:
        """Problems per generation call: enough to fill ``batch_size`` rows, at least one."""
        return max(1, self.batch_size // self.n_samples(benchmark))

    def sampling(self, benchmark: str, chunk: int):
        """Decoding of one chunk; its seed depends only on (seed, benchmark, chunk index).

        That makes each chunk's samples a pure function of the settings, so an interrupted
        run regenerates exactly the missing chunks, identically, on the same machine.
        Returns a ``stapo.rollout.SamplingConfig``.
        """
        from ..rollout.base import SamplingConfig  # lazy: torch stays out of `stapo --help`

        temperature, top_p = DECODING_PRESETS[self.decoding]
        return SamplingConfig(
            temperature=temperature if self.temperature is None else self.temperature,
            top_p=top_p if self.top_p is None else self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            n=self.n_samples(benchmark),
            seed=chunk_seed(self.seed, benchmark, chunk),
        )

    def signature(self, benchmarks: list[str] | None = None) -> dict[str, Any]:
        """Everything that changes a stored sample; a resumed run must match it."""
        t, p = DECODING_PRESETS[self.decoding]
        return {
            "temperature": t if self.temperature is None else self.temperature,
            "top_p": p if self.top_p is None else self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "template": self.template,
            "chat_template": self.chat_template,
            "seed": self.seed,
            "strict": self.strict,
            "backend": self.backend,
            "per_benchmark": {
                b: {"n_samples": self.n_samples(b), "problems_per_chunk": self.problems_per_chunk(b)}
                for b in (self.benchmarks if benchmarks is None else benchmarks)
            },
        }


def chunk_seed(seed: int, benchmark: str, chunk: int) -> int:
    """A 31-bit seed from (seed, benchmark, chunk): stable across processes, unlike ``hash()``."""
    digest = hashlib.sha256(f"{seed}/{benchmark}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def parse_samples(spec: str | None) -> dict[str, int]:
    """``"aime24=16,math500=8"`` -> {"aime24": 16, "math500": 8}; a bare ``"8"`` is not allowed here."""
    out: dict[str, int] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--samples: expected NAME=N with N >= 1, got {part!r}")
        out[name.strip()] = int(value)
    return out
