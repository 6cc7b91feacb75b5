"""Generation for every architecture: prefill with the parallel forward, decode with the step.

    ssdbench generate results/<study>/<run> --prompt "In the beginning" --max-new-tokens 200

    from ssdbench.generate import load_run, generate
    run = load_run("results/<study>/<run>")                 # model, config, tokenizer
    ids = torch.tensor([run.tokenizer.encode("In the beginning")])   # (1, L)
    new = generate(run.model, ids, max_new_tokens=200, temperature=0.8, top_p=0.9, seed=0)

Two phases, as in the Mamba paper's inference benchmark (Appendix E.5):

* **Prefill** (``LanguageModel.prefill``): the prompt (batch, L) runs through each layer's
  parallel path (chunked SSD, the parallel selective scan, the chunked Taylor attention, SDPA)
  and leaves every mixer's decoding state: the SSM state and the conv's last inputs for
  Mamba-1/2, (S, z) and the window's ring buffer for Based, the KV cache for Transformer++.
  A mixer without a prefill of its own is stepped through the prompt token by token instead
  (``models.lm.prefill_by_steps``: the same state, slower); every mixer of the zoo has one.
* **Decode** (``LanguageModel.step``): one token at a time from that state, the state updated
  in place. The state is allocated once, for prompt + max_new_tokens tokens (Transformer++'s KV
  cache at that capacity, the recurrent states at their fixed size), so every step has the
  same shapes: on a GPU the step is captured once in a CUDA graph and replayed (``Decoder``),
  which removes the host's launch time that dominates a decode step of a small batch.

Sampling (``sample``): temperature 0 (or ``greedy=True``) is argmax; otherwise softmax of
logits / temperature, restricted to the top_k largest and to the smallest set of tokens whose
probability reaches top_p (nucleus), drawn with a torch.Generator (``seed``) so that a seed
gives the same text again.

Symbols: batch rows decoded together, L prompt tokens, V vocabulary.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ssdbench.errors import ConfigError, require
from ssdbench.models.lm import LanguageModel, assign_state

CHECKPOINT = Path("checkpoints") / "last.ckpt"
CONFIG = Path(".hydra") / "config.yaml"


# ---- loading a trained run -------------------------------------------------------------------
@dataclass
class Loaded:
    """A run's model (eval mode, no gradients), its composed config and its task's tokenizer
    (None for the synthetic tasks, whose inputs are token ids)."""

    model: LanguageModel
    config: object  # omegaconf.DictConfig
    tokenizer: object | None
    checkpoint: Path


def run_paths(path) -> tuple[Path, Path]:
    """(checkpoint, config) of a run directory or of a checkpoint file inside one
    (<run>/checkpoints/<name>.ckpt next to <run>/.hydra/config.yaml); ConfigError otherwise."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(str(path), "no such file or directory")
    if path.is_dir():
        ckpt, config = path / CHECKPOINT, path / CONFIG
        require(config.is_file(), str(path), f"not a run directory (no {CONFIG})")
        require(ckpt.is_file(), str(path), f"the run has no checkpoint ({CHECKPOINT}); it has not saved one yet")
        return ckpt, config
    config = path.parent.parent / CONFIG  # <run>/checkpoints/<file>
    require(config.is_file(), str(path), f"no {CONFIG} in the checkpoint's run directory to rebuild the model from")
    return path, config


def model_state_dict(ckpt: dict) -> dict:
    """The LanguageModel's weights from a checkpoint: SequenceLM's state_dict holds them under
    ``model.`` (a model compiled by wrapping rather than in place adds ``_orig_mod.``); a bare
    model state dict is taken as it is."""
    sd = ckpt.get("state_dict", ckpt)
    if any(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return {k.replace("_orig_mod.", ""): v for k, v in sd.items()}


def load_run(path, device="cpu", dtype: torch.dtype | None = None) -> Loaded:
    """Rebuild a run's model from its saved config (hydra.utils.instantiate of ``model``) and
    load its checkpoint's weights; ``dtype`` casts the weights (None: as trained, fp32)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import ssdbench.tokenizer as tokenizers  # registers ${ssdbench.tokenizer_vocab:...}

    ckpt_path, config_path = run_paths(path)
    cfg = OmegaConf.load(config_path)
    require("model" in cfg, str(config_path), "has no model section")
    try:
        model = instantiate(cfg.model)
    except (InstantiationException, ConfigError) as e:
        raise ConfigError(str(config_path), f"cannot rebuild the model: {str(e).splitlines()[0]}") from None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line, not a traceback
        raise ConfigError(str(ckpt_path), f"cannot read the checkpoint: {type(e).__name__}: {e}") from None
    missing, unexpected = model.load_state_dict(model_state_dict(ckpt), strict=False)
    require(not missing and not unexpected, str(ckpt_path),
            f"does not match the run's model config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = None
    spec = cfg.get("task", {}).get("tokenizer")
    if spec is not None:
        try:
            tokenizer = tokenizers.load_tokenizer(str(spec))
        except tokenizers.TokenizerNotFound as e:
            raise ConfigError("task.tokenizer", str(e)) from None
    return Loaded(model, cfg, tokenizer, ckpt_path)


# ---- checks ------------------------------------------------------------------------------------
def check_options(max_new_tokens, temperature=1.0, top_k=None, top_p=None) -> None:
    """ConfigError (named by the CLI's option) for a value generation cannot use."""
    require(isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens > 0,
            "--max-new-tokens", f"must be a positive integer, got {max_new_tokens!r}")
    require(isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0,
            "--temperature", f"must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None:
        require(isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0, "--top-k",
                f"must be a positive integer, got {top_k!r}")
    if top_p is not None:
        require(isinstance(top_p, (int, float)) and 0 < top_p <= 1, "--top-p", f"must be in (0, 1], got {top_p!r}")


def check_prompt(prompt_ids: torch.Tensor, vocab_size: int, field: str = "prompt") -> None:
    """prompt_ids must be a (batch, L) integer tensor, L >= 1, every token in 0..vocab_size-1."""
    require(isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 2 and not prompt_ids.is_floating_point()
            and not prompt_ids.is_complex(), field,
            f"expected a (batch, L) integer tensor, got {getattr(prompt_ids, 'shape', type(prompt_ids))}")
    require(prompt_ids.shape[0] > 0 and prompt_ids.shape[1] > 0, field, "is empty")
    bad = (prompt_ids < 0) | (prompt_ids >= vocab_size)
    if bool(bad.any()):
        raise ConfigError(field, f"token {int(prompt_ids[bad][0])} is outside the model's vocabulary "
                                 f"(0..{vocab_size - 1})")


# ---- sampling ----------------------------------------------------------------------------------
def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, V) -> tokens (batch,): argmax for temperature 0, else a draw from
    softmax(logits / temperature) cut to the top_k tokens and to the nucleus of mass top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature  # (batch, V), fp32 for the softmax of bf16 logits
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (batch, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)  # (batch, V)
        probs = sorted_logits.softmax(-1)  # (batch, V)
        # drop a token when the more likely ones already hold top_p: the most likely is never dropped
        drop = probs.cumsum(-1) - probs >= top_p  # (batch, V)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (batch,)


# ---- decoding ----------------------------------------------------------------------------------
def _leaves(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for s in state for t in _leaves(s)]


def _rows(state, lo: int, hi: int):
    """The state of batch rows lo..hi-1 as views (writes reach the full state); 0-dim tensors
    (positions shared by all rows, which decode in lockstep) are shared as they are."""
    if isinstance(state, torch.Tensor):
        return state if state.dim() == 0 else state[lo:hi]
    return type(state)(_rows(s, lo, hi) for s in state)


class Decoder:
    """One model's decoding state for a fixed batch and capacity (max_seqlen tokens), and its
    step, replayed from a CUDA graph when ``cuda_graph``.

    The state lives at fixed addresses for the decoder's life: prefill and every step write into
    the same tensors (``assign_state``), which is what the captured step reads. Capture happens
    once, at construction, before any prompt: the warm-up steps it needs (Triton compiles and
    autotunes, the allocator settles) advance the state, which is then zeroed -- the state
    allocate_state gives (every mixer's is all zeros, positions included; tests check it).
    The graph's logits are a static tensor, overwritten by the next replay. ``capture`` may
    also be called later (after an eager prefill, as the benchmark does, so that a batch too
    large for the prefill fails before any capture).
    """

    def __init__(self, model: LanguageModel, batch: int, max_seqlen: int, cuda_graph: bool = False,
                 ssm_dtype: torch.dtype | None = None):
        weight = model.embedding.weight
        self.model, self.batch, self.max_seqlen = model, batch, max_seqlen
        self.device = weight.device
        self.state = model.allocate_state(batch, weight.device, weight.dtype, max_seqlen=max_seqlen,
                                          ssm_dtype=ssm_dtype)  # (ssm_dtype: see LanguageModel.allocate_state)
        self.ids = torch.zeros(batch, dtype=torch.long, device=weight.device)  # (batch,) the step's input
        self.graph = None
        self.logits = None
        if cuda_graph:
            self.capture()

    @torch.no_grad()
    def _eager_step(self) -> torch.Tensor:
        logits, new = self.model.step(self.ids, self.state)  # (batch, V)
        assign_state(self.state, new)
        return logits

    def capture(self) -> None:
        """Capture the step in a CUDA graph (warm-up steps from a zero state first); the state is
        zeros afterwards."""
        if self.device.type != "cuda":
            raise ValueError("a CUDA graph of the step needs the model on a CUDA device")
        self.reset()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(min(2, self.max_seqlen)):  # (a KV cache must not overflow here)
                self._eager_step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._eager_step()
        self.reset()

    def reset(self) -> None:
        """Back to the state before any token (allocate_state's zeros)."""
        for t in _leaves(self.state):
            t.zero_()

    @torch.no_grad()
    def prefill(self, prompt_ids: torch.Tensor, max_rows: int | None = None) -> torch.Tensor:
        """prompt_ids (batch, L) -> logits (batch, V) at the last prompt position; the state then
        holds the prompt (any earlier sequence is forgotten first).

        ``max_rows``: prefill that many rows at a time (their states are views of the full
        one), so the prefill's activations stay those of max_rows rows whatever the batch: a
        large decode batch is then bounded by the state (or KV cache), not by the prompt's
        activations."""
        batch, L = prompt_ids.shape
        if batch != self.batch or L > self.max_seqlen:
            raise ValueError(f"prompt of shape {tuple(prompt_ids.shape)} does not fit the decoder "
                             f"(batch {self.batch}, {self.max_seqlen} tokens)")
        self.reset()
        step = batch if max_rows is None else max(1, max_rows)
        # 0-dim leaves (positions) are shared by all rows: every chunk starts them from 0 again
        shared = [t for t in _leaves(self.state) if t.dim() == 0]
        logits = []
        for lo in range(0, batch, step):
            for t in shared:
                t.zero_()
            rows = _rows(self.state, lo, lo + step)
            out, new = self.model.prefill(prompt_ids[lo:lo + step], rows)  # (rows, V)
            assign_state(rows, new)
            logits.append(out)
        return logits[0] if len(logits) == 1 else torch.cat(logits)  # (batch, V)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (batch,) the tokens at the next position -> logits (batch, V) for the one after."""
        self.ids.copy_(ids)
        if self.graph is None:
            return self._eager_step()
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(model: LanguageModel, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             generator: torch.Generator | None = None, seed: int | None = None,
             cuda_graph: bool | None = None) -> torch.Tensor:
    """prompt_ids (batch, L) -> the max_new_tokens generated tokens (batch, max_new_tokens).

    Prefill of the whole prompt, then one step per new token from the recurrent state (or KV
    cache). ``greedy`` or temperature 0: argmax. ``seed`` makes a torch.Generator for the draws
    (or pass ``generator``). ``cuda_graph``: replay the step from a CUDA graph; None means on for
    a model on CUDA (the CPU path is the reference the tests check). Every row gets exactly
    max_new_tokens tokens (an end-of-text token is the caller's to cut at).
    """
    check_options(max_new_tokens, temperature, top_k, top_p)
    check_prompt(prompt_ids, model.vocab_size)
    device = model.embedding.weight.device
    if greedy:
        temperature = 0.0
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    batch, L = prompt_ids.shape
    decoder = Decoder(model, batch, L + max_new_tokens, cuda_graph)
    logits = decoder.prefill(prompt_ids.to(device))  # (batch, V)
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)  # (batch, max_new_tokens)
    for i in range(max_new_tokens):
        out[:, i] = sample(logits, temperature, top_k, top_p, generator)  # stays on the device: no sync
        if i + 1 < max_new_tokens:
            logits = decoder.step(out[:, i])
    return out


# ---- the command -------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory (with checkpoints/last.ckpt) or a checkpoint file inside one")
    p.add_argument("--prompt", default=None,
                   help="text, encoded with the run's tokenizer (empty: start from the end-of-text token)")
    p.add_argument("--prompt-ids", default=None, metavar="IDS",
                   help="the prompt as token ids, e.g. '12 7 30' (tasks without a tokenizer: MQAR, copying, ...)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="samples of the same prompt, decoded together")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype (auto: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on the GPU")


def _prompt_ids(args, tokenizer) -> torch.Tensor:
    require(args.prompt is None or args.prompt_ids is None, "--prompt", "give --prompt or --prompt-ids, not both")
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise ConfigError("--prompt-ids",
                              f"expected integers separated by spaces, got {args.prompt_ids!r}") from None
        require(len(ids) > 0, "--prompt-ids", "is empty")
        return torch.tensor([ids], dtype=torch.long)
    require(tokenizer is not None, "--prompt",
            "the run's task has no tokenizer (its inputs are token ids): pass --prompt-ids")
    ids = [int(i) for i in tokenizer.encode(args.prompt or "")]
    if not ids:  # an empty prompt starts a document: the token every document of the corpus ends with
        require(getattr(tokenizer, "eot_id", None) is not None, "--prompt", "is empty (and the tokenizer has no "
                "end-of-text token to start from)")
        ids = [tokenizer.eot_id]
    return torch.tensor([ids], dtype=torch.long)


def _text(tokenizer, ids: list[int]) -> str:
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None and eot in ids:  # the end of the document
        ids = ids[: ids.index(eot)]
    return tokenizer.decode(ids)


def main(args: argparse.Namespace) -> int:
    name = "ssdbench generate"
    try:
        check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        require(args.batch > 0, "--batch", f"must be a positive integer, got {args.batch}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
            else torch.device(args.device)
        require(device.type != "cuda" or torch.cuda.is_available(), "--device", "CUDA is not available")
        dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        run = load_run(args.run, device, dtype)
        prompt = _prompt_ids(args, run.tokenizer)  # (1, L)
        check_prompt(prompt, run.model.vocab_size, "--prompt-ids" if args.prompt_ids is not None else "--prompt")
        prompt = prompt.expand(args.batch, -1)  # (batch, L): the rows differ by their draws
        new = generate(run.model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       seed=args.seed, cuda_graph=device.type == "cuda" and not args.no_cuda_graph)
    except ConfigError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"{name}: --batch: {args.batch} rows of the prompt + {args.max_new_tokens} tokens do not fit in "
              f"the GPU's memory", file=sys.stderr)
        return 2
    for row in range(args.batch):
        if args.batch > 1:
            print(f"--- sample {row} ---")
        ids = new[row].tolist()
        if run.tokenizer is None:
            print(" ".join(str(i) for i in prompt[row].tolist()), "|", " ".join(str(i) for i in ids))
        else:
            print(_text(run.tokenizer, prompt[row].tolist()) + _text(run.tokenizer, ids))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="ssdbench generate", description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
