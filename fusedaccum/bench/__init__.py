"""``python -m fusedaccum bench``: throughput of the fused ops against the memory-bandwidth
ceiling (a copy of the same bytes) and against PyTorch's own path, side by side in one run.

What is measured (each row: median time, bytes by the accounting below, GB/s, fraction of
the copy bandwidth, speed-up, host syncs per step):

- ``accumulate_`` of bf16 and fp32 gradients into an fp32 bucket (also with ``zero_grad``),
  against ``add_`` on the flat tensor, ``_foreach_add_`` on parameter lists, ``torch.compile``;
- the read pass of ``unscale_clip_`` alone (partial norms + inf check), against
  ``get_total_norm(foreach=True)``;
- ``unscale_clip_`` (norm + inf check + clip, in place), against PyTorch's chain
  ``_amp_foreach_non_finite_check_and_unscale_`` + ``clip_grad_norm_(foreach=True)`` on the
  same data as one flat tensor, as a GPT-2-small-shaped list (148 tensors) and a 496-tensor
  list, and ``torch.compile`` of the equivalent expression;
- the exact GPT-2-small parameter list (124,439,808 elements, 148 tensors): ``unscale_clip_``
  on its ``GradBuckets`` bucket and ``fusedaccum.clip_grad_norm_`` against PyTorch's;
- one whole window of ``GradAccumulator`` (K micro-batch backwards + step) against the loop a
  PyTorch user writes;
- the step with a fused optimizer (``AdamW``/``SGD``, ``fused=True``; fp32 with the multiplier
  folded into the optimizer and with the apply pass, bf16 with the apply pass) against the
  optimizer step alone, and bf16 micro-batches accumulated through ``Tensor.grad_dtype``
  against the landing bucket (``fold_cases``);
- not timed: the gradient bytes per parameter per data-parallel engine and dtype, read from
  the buffers a ``GradAccumulator`` allocates (``grad_memory``).

Bytes per element (B/el) are counted as the minimal DRAM traffic of the implementation's
passes: every tensor read once per pass, written once per pass, in its dtype. The copy
baseline is ``dst.copy_(src)`` of uint8 buffers of half that many bytes (read + write =
the row's bytes), so ``fraction of copy = copy time / row time``. See bench/README.md.

Timing: on CUDA ``triton.testing.do_bench`` (device events, L2 flushed, median and
quantiles); elsewhere wall clock (``time.perf_counter``) around each call after warm-up,
median of the repeats. On a CPU the fused ops run the pure-PyTorch reference path.

Modules: ``cases`` (the groups of rows), ``workloads`` (what the baseline rows call),
``fold_cases`` (the optimizer-step and micro-batch groups), ``grad_memory``, ``layouts`` (GPT-2 shapes), ``timing`` (the timer, the sync count), ``machine`` (device,
versions, other processes' load), ``runner`` (a run), ``targets``, ``report`` (JSON and
markdown), ``plot``, ``profiling`` (``--profile``), ``cli``.
"""
