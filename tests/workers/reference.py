"""transformers as the reference: logits per position and greedy continuations with their margins."""
from __future__ import annotations

import torch

MIN_TOP2_GAP = 1e-3


def reference_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([p])).logits[0].float() for p in prompts])


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' generate, greedy; asserts every compared position is no near-tie."""
    # Run past EOS without masking it: min_new_tokens would suppress EOS logits and change the argmax,
    # so EOS is set to an id the vocab never produces.
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=model.config.vocab_size)
    assert out.sequences.shape[1] == len(prompt) + n
    for i, step in enumerate(out.logits):
        top2 = step[0].float().topk(2).values
        gap = (top2[0] - top2[1]).item()
        assert gap > MIN_TOP2_GAP, f"reference near-tie at generated position {i} (gap {gap:.2e}): broken test"
    return out.sequences[0, len(prompt):].tolist()
