"""The training-side engine: HF transformers log-probs of given tokens, with gradients.

``HFEngine`` recomputes log p_train for exactly the tokens the deploy engine
sampled (fp32 on CPU, bf16 on GPU) and is the model the optimiser updates.
Sequences are right-padded; response positions are gathered so every output
is ``(B, T)`` aligned with the rollout's per-token log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dcgrpo.algorithm.loss import entropy_from_logits
from dcgrpo.models import check_model_files

Tensor = torch.Tensor
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TokenBatch:
    """Prompt + response token ids, right-padded, with response positions.

    input_ids: (B, L) prompt then response, padded with ``pad_id``.
    attention_mask: (B, L).
    response_pos: (B, T) index into the *shifted* logits of each response token
        (position p predicts token p + 1), 0 on padding.
    response_ids: (B, T) response tokens, ``pad_id`` on padding.
    response_mask: (B, T) 1 on response tokens.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_pos: Tensor
    response_ids: Tensor
    response_mask: Tensor

    def select(self, idx: Tensor) -> TokenBatch:
        return TokenBatch(*(t[idx] for t in (self.input_ids, self.attention_mask, self.response_pos,
                                             self.response_ids, self.response_mask)))  # fmt: skip


def make_token_batch(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, max_response_len: int | None = None
) -> TokenBatch:
    """Pack (prompt, response) pairs into a ``TokenBatch`` (see its docstring)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(response_ids)} responses")
    B = len(prompt_ids)
    L = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True))
    T = max_response_len or max((len(r) for r in response_ids), default=1)
    T = max(T, 1)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    rid = torch.full((B, T), pad_id, dtype=torch.long)
    rmask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if len(r) > T:
            raise ValueError(f"response {i} has {len(r)} tokens, more than max_response_len={T}")
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        if r:
            pos[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
            rid[i, : len(r)] = torch.tensor(r)
            rmask[i, : len(r)] = 1.0
    return TokenBatch(input_ids, attn, pos, rid, rmask)


class HFEngine:
    """A causal LM from an HF directory, in the training dtype."""

    def __init__(self, model_path: str, precision: str = "fp32", device: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # transformers: only a built engine needs it

        if precision not in TORCH_DTYPES:
            raise ValueError(f"train precision must be one of {sorted(TORCH_DTYPES)}, got {precision!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if Path(model_path).is_dir():  # a corrupt shard: one line naming it, not a transformers traceback
            check_model_files(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=TORCH_DTYPES[precision]).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def token_batch(self, prompt_ids, response_ids, max_response_len=None) -> TokenBatch:
        return make_token_batch(prompt_ids, response_ids, self.pad_id, max_response_len)

    def logprobs(
        self, batch: TokenBatch, temperature: float = 1.0, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """log p_train of each response token, (B, T); entropy (B, T) if asked.

        Gradients flow when called outside ``torch.no_grad()``. Logits are
        divided by the sampling temperature so the distribution matches the
        deploy engine's processed log-probs.
        """
        ids = batch.input_ids.to(self.device)
        out = self.model(input_ids=ids, attention_mask=batch.attention_mask.to(self.device), use_cache=False)
        logits = out.logits[:, :-1].float() / temperature  # (B, L-1, V); position p predicts token p+1
        pos = batch.response_pos.to(self.device)  # (B, T)
        resp_logits = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, T, V)
        logp = torch.log_softmax(resp_logits, dim=-1)
        tok_logp = logp.gather(-1, batch.response_ids.to(self.device).unsqueeze(-1)).squeeze(-1)  # (B, T)
        mask = batch.response_mask.to(self.device)
        tok_logp = tok_logp * mask
        entropy = entropy_from_logits(resp_logits) * mask if with_entropy else None
        return tok_logp, entropy

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}
