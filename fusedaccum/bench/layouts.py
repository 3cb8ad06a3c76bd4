"""Parameter layouts of the bench: GPT-2's parameter shapes, and the same proportions scaled to N elements."""

from __future__ import annotations

import math

import torch


def gpt2_shapes(layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list:
    """Parameter shapes of GPT-2 in ``GPT2LMHeadModel.parameters()`` order (lm_head is tied
    to wte): wte, wpe, per layer ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
    (Conv1D weights are in x out, each with a bias), then ln_f. 4 + 12 * layers tensors;
    the defaults are GPT-2 small: 148 tensors, 124,439,808 elements."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


GPT2_SMALL = gpt2_shapes()
GPT2_TINY = gpt2_shapes(layers=2, d=64, vocab=512, ctx=64)  # the --quick stand-in
# The parameter-list layouts of the size sweep: the GPT-2-small proportions (148 tensors)
# and a deeper GPT-2 (41 layers: 496 tensors), scaled to N elements.
LIST_LAYOUTS = {"gpt2-148": GPT2_SMALL, "list-496": gpt2_shapes(layers=41)}


def split_sizes(shapes: list, n: int) -> list:
    """Sizes (each >= 1) of len(shapes) tensors in the proportions of ``shapes``, summing to n."""
    weights = [math.prod(s) for s in shapes]
    total = sum(weights)
    sizes = [max(1, w * n // total) for w in weights]
    big = max(range(len(sizes)), key=sizes.__getitem__)
    sizes[big] += n - sum(sizes)
    if sizes[big] < 1:
        raise ValueError(f"{n} elements are too few for {len(shapes)} tensors")
    return sizes


def _layout_views(flat: torch.Tensor, layout: str) -> list:
    if layout == "flat":
        return [flat]
    return list(flat.split(split_sizes(LIST_LAYOUTS[layout], flat.numel())))


def _ntensors(layout: str) -> int:
    return 1 if layout == "flat" else len(LIST_LAYOUTS[layout])

