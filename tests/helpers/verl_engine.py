"""verl-side helpers for tests/test_verl_*.py (imported only where verl is installed).

- ``rollout_tensordict``: a rollout batch as verl's ``RayPPOTrainer._update_actor`` hands it to the
  workers: dense left/right-padded tensors turned into verl's no-padding layout by verl's own
  ``left_right_2_no_padding``.
- ``CPUEngine``: a small ``BaseEngine`` for the fast and the 2-process tests (verl's real FSDP engine
  runs in tests/test_verl_fsdp.py through a CPU platform plugin, single process: verl's dynamic-batch
  balancing all-reduces a CUDA tensor across DP ranks). It runs verl's ``BaseEngine.train_batch`` /
  ``infer_batch`` (where the stapo hook sits). It does what ``FSDPEngine.forward_backward_batch`` does with verl's own
  pieces (global token count over the DP group, ``prepare_micro_batches``, the loss call contract,
  ``postprocess_batch_func``); only the forward is a plain HF forward per sequence, and
  ``optimizer_step`` averages gradients over DP ranks, as FSDP does, before an SGD step.
- ``actor_config``: verl's ``FSDPActorConfig`` composed by hydra from verl's own ppo_trainer.yaml
  (the command-line path), with stapo_trainer.yaml on top.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.engine.base import BaseEngine
from verl.workers.engine.utils import postprocess_batch_func, prepare_micro_batches
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding


@functools.cache
def actor_config(*overrides: str):
    """``FSDPActorConfig`` from verl's command line: stapo_trainer.yaml + ``overrides`` (cached: hydra is slow)."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    from stapo.integrations.verl import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        # verl asserts a micro-batch size; the engine's own split comes from `train_data`
        cfg = compose("stapo_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                                                  *overrides])
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def rollout_tensordict(vocab: int, n: int = 8, prompt_len: int = 5, response_len: int = 9, seed: int = 0,
                       adv_scale: float = 1.0) -> TensorDict:
    """``n`` rollouts: left-padded prompts, right-padded responses (some very short), ±advantages."""
    g = torch.Generator().manual_seed(seed)
    p_lens = torch.randint(1, prompt_len + 1, (n,), generator=g)
    r_lens = torch.randint(1, response_len + 1, (n,), generator=g)
    r_lens[0] = response_len  # the padded width is reached
    prompts = torch.zeros(n, prompt_len, dtype=torch.long)
    responses = torch.zeros(n, response_len, dtype=torch.long)
    attention = torch.zeros(n, prompt_len + response_len, dtype=torch.long)
    for i in range(n):
        prompts[i, prompt_len - p_lens[i]:] = torch.randint(3, vocab, (int(p_lens[i]),), generator=g)
        responses[i, : r_lens[i]] = torch.randint(3, vocab, (int(r_lens[i]),), generator=g)
        attention[i, prompt_len - p_lens[i]: prompt_len + r_lens[i]] = 1
    response_mask = attention[:, prompt_len:].float()
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    advantages = (sign * adv_scale * (0.5 + torch.rand(n, generator=g)))[:, None] * response_mask  # [n, T]
    old = -3.0 + 0.3 * torch.randn(n, response_len, generator=g)  # replaced by the model's + noise below
    td = tu.get_tensordict({
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention, "position_ids": position_ids, "response_mask": response_mask,
        "advantages": advantages, "old_log_probs": old,
    })
    return left_right_2_no_padding(td)


def with_old_log_probs(model, data: TensorDict, noise: float = 0.2, seed: int = 1) -> TensorDict:
    """``old_log_probs`` = the model's own log-probs plus noise, so the clip ranges bind somewhere."""
    logprobs, _ = padded_stats(model, data)
    g = torch.Generator().manual_seed(seed)
    data["old_log_probs"] = (logprobs.detach() + noise * torch.randn(logprobs.shape, generator=g)) \
        * data["response_mask"]
    return data


def sequence_stats(model, data: TensorDict, temperature: float = 1.0, entropy: bool = True):
    """Nested [B, j] log-probs of the next token and entropies, as verl's engines return them."""
    ids, pos = data["input_ids"], data["position_ids"]
    logps, ents = [], []
    for row_ids, row_pos in zip(ids.unbind(), pos.unbind()):
        logits = model(input_ids=row_ids[None], position_ids=row_pos[None]).logits[0].float() / temperature
        logp = torch.log_softmax(logits, -1)  # [j, V]
        labels = torch.roll(row_ids, -1)  # position t scores token t + 1 (verl's rolled labels)
        logps.append(logp.gather(-1, labels[:, None])[:, 0])
        ents.append(-(logp.exp() * logp).sum(-1))
    offsets = ids.offsets()
    out = {"log_probs": torch.nested.nested_tensor_from_jagged(torch.cat(logps), offsets)}
    if entropy:
        out["entropy"] = torch.nested.nested_tensor_from_jagged(torch.cat(ents), offsets)
    return out


def padded_stats(model, data: TensorDict):
    """[B, T] response log-probs and entropies (with grad), verl's ``no_padding_2_padding`` layout."""
    out = sequence_stats(model, data)
    return no_padding_2_padding(out["log_probs"], data), no_padding_2_padding(out["entropy"], data)


class CPUEngine(BaseEngine):
    """A ``BaseEngine`` that runs on CPU (see the module docstring); ``grads`` holds the last step's."""

    def __init__(self, model, lr: float = 0.0, group=None):
        self.module = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.group = group
        self.grads: dict[str, torch.Tensor] = {}
        self.prepass_calls = 0

    def is_param_offload_enabled(self):
        return False

    def is_optimizer_offload_enabled(self):
        return False

    def get_data_parallel_size(self):
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def get_data_parallel_rank(self):
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def get_data_parallel_group(self):
        return self.group if dist.is_initialized() else None

    def is_mp_src_rank_with_outputs(self):
        return True

    def infer_batch(self, data, loss_function=None):
        self.prepass_calls += 1
        return super().infer_batch(data, loss_function)

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        # as FSDPEngine.forward_backward_batch (verl 0.9.1), minus the device moves
        batch_num_tokens = data["loss_mask"].sum()
        if dist.is_initialized():
            dist.all_reduce(batch_num_tokens, group=self.group)
        tu.assign_non_tensor(data, batch_num_tokens=batch_num_tokens.item(), dp_size=self.get_data_parallel_size())
        # verl equalises the dynamic micro-batch count over DP ranks with a CUDA tensor: per rank here
        dynamic = tu.get_non_tensor_data(data, "use_dynamic_bsz", False)
        micro_batches, indices = prepare_micro_batches(
            data=data, dp_group=None if dynamic else self.get_data_parallel_group(), same_micro_num_in_dp=True)
        outputs = []
        for micro in micro_batches:
            with torch.no_grad() if forward_only else nullcontext():
                temperature = tu.get_non_tensor_data(micro, "temperature", 1.0)
                entropy = tu.get_non_tensor_data(micro, "calculate_entropy", False)
                model_output = sequence_stats(self.module, micro, temperature, entropy=entropy)
                if loss_function is not None:
                    loss, metrics = loss_function(model_output=model_output, data=micro,
                                                  dp_group=self.get_data_parallel_group())
                else:
                    loss, metrics = torch.tensor(1.0), {}
                if not forward_only:
                    loss.backward()
            outputs.append({"model_output": {k: v.detach() for k, v in model_output.items()},
                            "loss": loss.detach().item(), "metrics": metrics})
        return postprocess_batch_func(output_lst=outputs, indices=indices, data=data)

    def optimizer_zero_grad(self):
        self.optimizer.zero_grad()

    def optimizer_step(self):
        params = dict(self.module.named_parameters())
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if dist.is_initialized():  # FSDP / DDP average gradients over the DP group
                dist.all_reduce(p.grad, group=self.group)
                p.grad /= self.get_data_parallel_size()
        self.grads = {k: p.grad.detach().clone() for k, p in params.items()}
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), float("inf"))
        self.optimizer.step()
        return norm


def train_data(data: TensorDict, micro_batch_size: int | None = None, max_token_len: int | None = None):
    """The non-tensor keys ``TrainingWorker.train_batch`` adds before ``engine.train_batch``."""
    data = data.copy()
    tu.assign_non_tensor(
        data, use_remove_padding=True, use_dynamic_bsz=max_token_len is not None,
        max_token_len_per_gpu=max_token_len, micro_batch_size_per_gpu=micro_batch_size, use_fused_kernels=False,
        global_batch_size=len(data), temperature=1.0, calculate_entropy=False,
    )
    return data


def dp_model_and_data(n: int = 8, vocab: int = 48):
    """The model and global mini-batch of the DP test (identical in every process)."""
    from stapo.models.tiny import tiny_qwen3

    model = tiny_qwen3(vocab, hidden_size=64, num_layers=1, num_heads=2, head_dim=32, seed=0)
    return model, with_old_log_probs(model, rollout_tensordict(vocab, n=n, seed=0))
