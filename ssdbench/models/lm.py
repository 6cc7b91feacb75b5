"""The language-model shell every architecture shares.

token embedding -> n_layers x [x + mixer(norm(x)); x + mlp(norm(x))] -> final RMSNorm -> tied head

A mixer is any module with ``forward(x, seq_idx=None) -> y`` on (batch, L, d_model) tensors
(``seq_idx`` (batch, L) marks packed documents; mixers must not mix information across them).
Mixers may also implement ``flops_per_token(seq_len)`` (forward FLOPs that are not in their
parameter count, e.g. attention's sequence term or SSD's chunk terms) and ``state_size()``
(recurrent state size in numbers, for recall-vs-state plots).

Recurrent decoding: a mixer that can decode token by token implements
``allocate_state(batch, device, dtype) -> state`` and ``step(x_t, state) -> (y_t, state)`` with
x_t, y_t (batch, d_model); the state is any tensor or tuple the mixer owns (it may be updated in
place). ``LanguageModel.step`` chains them through the blocks, so a test can check that
stepping through a sequence equals the full forward. A mixer whose state grows with the
sequence (attention's KV cache) takes ``max_seqlen`` in allocate_state as well: its state is
preallocated at that capacity, so that a decode step has the same shapes at every position
(what a CUDA graph of the step needs).

Prefill (generation, ssdbench/generate.py): a mixer may implement ``prefill(x, state) -> (y,
state)`` with x, y (batch, L, d_model): the full forward's output on a prompt, computed with
the parallel (chunked) path, leaving in ``state`` -- freshly allocated by allocate_state, so
all zeros -- exactly the state that stepping through x from that state would leave. The
state is written in place into the given tensors (a captured decode step reads them).
``LanguageModel.prefill`` chains them; for a mixer without prefill it steps through the prompt
token by token instead (``prefill_by_steps``: the same state, one step per token, slower).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ssdbench.kernels import cross_entropy as ce_kernels
from ssdbench.models.layers import RMSNorm


def assign_state(dst, src):
    """Copy a state returned by a mixer (tensors or nested tuples/lists of them) into ``dst``
    of the same structure, tensor by tensor, skipping tensors the mixer updated in place.
    Keeps a state's tensors at fixed addresses (the prefill contract; a CUDA graph of the
    decode step reads them). Returns dst."""
    if isinstance(dst, torch.Tensor):
        if src is not dst:
            dst.copy_(src)
        return dst
    for d, s in zip(dst, src):
        assign_state(d, s)
    return dst


def prefill_by_steps(mixer: nn.Module, x: torch.Tensor, state):
    """Prefill of a mixer without one of its own: step through x (batch, L, d_model) token by
    token from ``state`` (correct for any mixer with ``step``, L times slower than a parallel
    prefill). Returns (y (batch, L, d_model), state), the state written in place."""
    ys = []
    for t in range(x.shape[1]):
        y, new = mixer.step(x[:, t], state)  # (batch, d_model)
        state = assign_state(state, new)
        ys.append(y)
    return torch.stack(ys, dim=1), state  # (batch, L, d_model)


def mixer_prefill(mixer: nn.Module, x: torch.Tensor, state):
    """mixer.prefill when the mixer has one, else ``prefill_by_steps``; state written in place."""
    if hasattr(mixer, "prefill"):
        y, new = mixer.prefill(x, state)
        return y, assign_state(state, new)
    return prefill_by_steps(mixer, x, state)


def labelled_positions(labels: torch.Tensor, k: int, ignore_index: int = -100) -> torch.Tensor:
    """labels (batch, L) -> (batch, k) int64: each row's labelled positions in order, then, to
    fill k, its first unlabelled ones (whose labels are ``ignore_index``: they count for nothing).

    ``k`` must be at least the most labels of any row (a row with more would lose some); a
    Python int, so the shapes are static (a CUDA graph of the training step) and nothing is
    read back from the device (no boolean indexing). A stable sort of the labelled flags.

    >>> labelled_positions(torch.tensor([[-100, 7, -100, 5], [3, -100, -100, -100]]), 2)
    tensor([[1, 3],
            [0, 1]])
    """
    flags = (labels != ignore_index).to(torch.int8)  # (batch, L) 1 where labelled
    return torch.argsort(flags, dim=1, descending=True, stable=True)[:, :k]  # (batch, k)


class Block(nn.Module):
    """Pre-norm residual block: mixer, then an optional MLP."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp: nn.Module | None, norm_eps: float):
        super().__init__()
        self.norm1 = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.norm2 = RMSNorm(d_model, norm_eps) if mlp is not None else None
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (hidden, residual), the stream being residual + hidden: the
        same function as x -> x + mixer(norm1(x)) (then + mlp(norm2(.))), with each residual add
        in the frame of the norm that reads it. torch.compile then fuses add and norm, and
        their backward with the gradient sum of the stream; with the add at the end of the
        previous block instead, the mixers' graph breaks left that sum to an eager fp32 add
        (1.3 ms of a 125M Mamba-2 training step on the H100)."""
        residual = hidden if residual is None else residual + hidden  # (batch, L, d_model)
        hidden = self.mixer(self._normed(self.norm1, residual, self.mixer), seq_idx=seq_idx)
        if self.mlp is not None:
            residual = residual + hidden
            hidden = self.mlp(self._normed(self.norm2, residual, self.mlp))
        return hidden, residual

    @staticmethod
    def _normed(norm: nn.Module, residual: torch.Tensor, consumer: nn.Module) -> torch.Tensor:
        """norm(residual), in the autocast dtype when autocast is on and the consumer opens
        with a projection (``input_to_autocast``, default True), which would cast it anyway.
        Cast here, the cast fuses into the norm's kernel; left to the consumer, it ran as a
        kernel of its own after the mixer's graph break, and its gradient as another: 0.66 +
        0.57 ms of a compiled 125M Mamba-2 step on the H100 (results/h100/session11)."""
        y = norm(residual)  # (batch, L, d_model) in residual's dtype
        device = y.device.type
        if getattr(consumer, "input_to_autocast", True) and torch.is_autocast_enabled(device):
            y = y.to(torch.get_autocast_dtype(device))
        return y

    def prefill(self, x: torch.Tensor, state):
        """A prompt: x (batch, L, d_model) -> (batch, L, d_model) as forward computes it (one
        stream, x + mixer(norm1(x)) then + mlp(norm2(.))), leaving the mixer's state after it."""
        y, state = mixer_prefill(self.mixer, self.norm1(x), state)  # (batch, L, d_model)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state

    def step(self, x: torch.Tensor, state):
        """One token: x (batch, d_model) -> (batch, d_model), advancing the mixer's state."""
        x, y, state = self.step_deferred(x, None, state)
        return x + y, state

    def step_deferred(self, x: torch.Tensor, pending: torch.Tensor | None, state):
        """``step`` with the residual stream's last add left to the next norm: the stream is
        x + pending (pending None: x); returns (x', y, state) with the block's output x' + y.
        LanguageModel.step chains blocks this way, so each add runs inside the next norm's kernel
        on the GPU (RMSNorm.step with a residual): one launch fewer per add in the decode step."""
        h, x = self.norm1.step(x, pending)
        y, state = self.mixer.step(h, state)
        if self.mlp is not None:
            h, x = self.norm2.step(x, y)
            y = self.mlp(h)
        return x, y, state


class LanguageModel(nn.Module):
    """Embedding, pre-norm blocks, final norm, tied LM head, GPT-style initialisation.

    ``make_mixer(layer_idx)`` and ``make_mlp(layer_idx)`` build each layer's modules; make_mlp
    may return None for architectures without an MLP (Mamba).
    """

    arch = "lm"

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        make_mixer: Callable[[int], nn.Module],
        make_mlp: Callable[[int], nn.Module | None],
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        pad_vocab_multiple: int = 1,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.d_model, self.n_layers = d_model, n_layers
        # Padding the embedding table to a multiple of 8/64 speeds up the head matmul on GPUs;
        # logits beyond vocab_size are cut off so padding never changes the loss.
        self.padded_vocab = ((vocab_size + pad_vocab_multiple - 1) // pad_vocab_multiple) * pad_vocab_multiple
        self.embedding = nn.Embedding(self.padded_vocab, d_model)
        self.layers = nn.ModuleList(
            Block(d_model, make_mixer(i), make_mlp(i), norm_eps) for i in range(n_layers)
        )
        self.norm_f = RMSNorm(d_model, norm_eps)
        self.init_std = init_std
        self.apply(self._init_weights)
        # Architectures with their own initialisation (e.g. Mamba's A_log, dt_bias) apply it last.
        for m in self.modules():
            if m is not self and hasattr(m, "init_special"):
                m.init_special()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            # GPT-2: residual output projections are scaled down by 1/sqrt(2 * n_layers) so the
            # residual stream's variance does not grow with depth.
            std = self.init_std
            if getattr(module, "_is_residual_out", False):
                std = std / math.sqrt(2 * self.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.init_std)

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, ignore_index: int = -100,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, L) -> logits (batch, L, vocab_size); with labels (batch, L), the
        mean cross-entropy over the tokens whose label is not ``ignore_index`` instead.

        ``positions`` (batch, K) int64: the head only at these positions of each row (logits
        (batch, K, vocab_size); labels, when given, are then those of the same positions,
        (batch, K)). The synthetic tasks label a few positions of each row (MQAR at T=256: 8 to
        64 of 256), and the head over every position was most of their step at vocabulary 8192
        (a (batch * L, V_pad) logits buffer, two matmuls over it in the backward); the rows the
        loss ignores contribute nothing, so leaving them out changes neither the loss nor a
        gradient (``labelled_positions`` picks them; SequenceLM._loss).

        The loss is part of the forward (in ``_head``) so that torch.compile of the model also compiles it:
        the cut to vocab_size, the fp32 upcast, log-softmax and the gather then fuse into
        reductions over the bf16 logits (uncompiled: strided and fp32 copies of the logits, fp32
        log-probabilities and zero fills, about 16.6 ms of a 16K-token step at vocabulary 50,280
        on an H100 against 2.5 ms compiled; results/h100/session6). That is the CPU path; on a GPU
        ``_head`` takes the fused Triton head and loss instead (kernels/cross_entropy.py).
        """
        hidden, residual = self.embed(input_ids, seq_idx), None  # (batch, L, d_model)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, seq_idx=seq_idx)
        return self._head(hidden, residual, labels, ignore_index, positions)

    def embed(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, L) -> the first block's input (batch, L, d_model): the token
        embedding (an architecture with absolute positions adds them here, restarting at each
        document of seq_idx)."""
        return self.embedding(input_ids)

    def embed_step(self, input_ids: torch.Tensor, state: list) -> torch.Tensor:
        """input_ids (batch,) -> (batch, d_model), ``embed`` for one decoding step (the
        position, where one is needed, comes from the state)."""
        return self.embedding(input_ids)

    def _head(self, hidden: torch.Tensor, residual: torch.Tensor | None, labels: torch.Tensor | None,
              ignore_index: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm, tied head and the loss. A method of its own for torch.compile: the
        project's kernels break the graph inside the layer loop, and Dynamo then runs the loop's
        frame (forward) eagerly and compiles only the frames it calls, the blocks and this one
        (written inline, the cross-entropy ran eagerly: seen in the H100 profile).

        With labels on a GPU, head and loss are kernels/cross_entropy.py's linear_cross_entropy
        (in the autocast dtype when autocast is on): its forward kernel computes the loss and
        the logits' gradient in one read of the logits, and the backward is two matmuls. It
        traces into the compiled graph without a break. On the CPU (and for float64 weights)
        the PyTorch form below. With ``positions`` (batch, K), norm, head and loss see only
        those positions (a gather; its backward scatters the gradient back, zeros elsewhere)."""
        x = hidden if residual is None else residual + hidden  # (batch, L, d_model)
        if positions is not None:
            x = torch.take_along_dim(x, positions[..., None], dim=1)  # (batch, K, d_model)
        x = self.norm_f(x)  # (batch, L or K, d_model)
        if labels is not None and ce_kernels.model_head_applies(x):
            weight = self.embedding.weight  # (padded_vocab, d_model)
            if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
                x = x.to(torch.get_autocast_dtype(x.device.type))  # what autocast would give F.linear
            return ce_kernels.linear_cross_entropy(x.flatten(0, 1), weight.to(x.dtype), labels.flatten(),
                                                   self.vocab_size, ignore_index)
        logits = F.linear(x, self.embedding.weight)[..., : self.vocab_size]  # tied head: (batch, L or K, V)
        if labels is None:
            return logits
        logits = logits.flatten(0, 1)  # (batch * (L or K), V); fp32 at least for the log-softmax
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels.flatten(),
                               ignore_index=ignore_index)

    # ---- recurrent decoding -------------------------------------------------------------
    def allocate_state(self, batch: int, device=None, dtype=torch.float32, max_seqlen: int | None = None,
                       ssm_dtype: torch.dtype | None = None) -> list:
        """Per-layer recurrent states for ``step`` (mixers must implement allocate_state/step).

        ``max_seqlen``: the most tokens (prompt + generated) the state must hold, passed to the
        mixers whose state grows with the sequence (those whose allocate_state takes it).
        ``ssm_dtype``: the SSM mixers' state dtype (None: float32, float64 for float64 models),
        passed to the mixers whose allocate_state takes it (Mamba-1 and Mamba-2)."""
        states = []
        for layer in self.layers:
            params = inspect.signature(layer.mixer.allocate_state).parameters
            anykw = any(p.kind == p.VAR_KEYWORD for p in params.values())
            kwargs = {k: v for k, v in (("max_seqlen", max_seqlen), ("ssm_dtype", ssm_dtype))
                      if v is not None and (k in params or anykw)}
            states.append(layer.mixer.allocate_state(batch, device, dtype, **kwargs))
        return states

    def prefill(self, input_ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """input_ids (batch, L) -> logits (batch, vocab_size) at the last position, and the state
        after the prompt (written in place into ``state``, fresh from allocate_state): the
        parallel forward of every layer instead of L steps (see the module docstring)."""
        x = self.embed(input_ids)  # (batch, L, d_model) at positions 0..L-1
        for layer, s in zip(self.layers, state):
            x, _ = layer.prefill(x, s)
        # the head on the last position only: (batch, L, vocab) logits of a long prompt at a
        # large batch would be gigabytes
        logits = F.linear(self.norm_f(x[:, -1]), self.embedding.weight)[..., : self.vocab_size]
        return logits, state  # (batch, vocab_size)

    def step(self, input_ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """input_ids (batch,) -> logits (batch, vocab_size) for that position, and the new state."""
        x = self.embed_step(input_ids, state)  # (batch, d_model)
        y = None  # (batch, d_model) the residual add each block leaves to the next norm
        new_state = []
        for layer, s in zip(self.layers, state):
            x, y, s = layer.step_deferred(x, y, s)
            new_state.append(s)
        h, _ = self.norm_f.step(x, y)
        logits = F.linear(h, self.embedding.weight)[..., : self.vocab_size]
        return logits, new_state

    # ---- accounting -------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting the tied embedding/head once; non_embedding drops it."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embedding.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: 2 x every matmul weight (head included) + mixers' sequence terms.

        Training FLOPs are 3x this (backward = 2x forward). Norms, activations and the
        embedding lookup are not counted (they are not matmuls), as in the Chinchilla and
        Mamba papers' accounting.
        """
        flops = 2 * self.d_model * self.padded_vocab  # LM head
        for m in self.modules():
            if isinstance(m, nn.Linear):
                flops += 2 * m.in_features * m.out_features
        for layer in self.layers:
            if hasattr(layer.mixer, "flops_per_token"):
                flops += layer.mixer.flops_per_token(seq_len)
        return int(flops)

    def state_size(self) -> int | None:
        """Recurrent state size per sequence in numbers, summed over layers (None for attention)."""
        sizes = [getattr(layer.mixer, "state_size", lambda: None)() for layer in self.layers]
        return None if any(s is None for s in sizes) else int(sum(sizes))

    def no_weight_decay_params(self) -> set[int]:
        """ids of parameters AdamW must not decay: norms, biases, embeddings, mixer-marked ones."""
        skip = set()
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if (p.ndim < 2 or isinstance(module, nn.Embedding) or name == "bias"
                        or getattr(p, "_no_weight_decay", False)):
                    skip.add(id(p))
        return skip
