"""Text generation: prefill into a preallocated KV cache, then one static-shape decode step per token.

Prompts of different lengths share a batch (left-aligned, one cache position per row); sampling is greedy,
temperature, top-k and/or top-p with a seeded generator; rows stop on the tokenizer's stop ids. On a GPU the
decode step is captured once as a CUDA graph and replayed. `l3k generate` is the command line.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llama3_kernels.model.model import Transformer

CACHE_BLOCK = 256  # cache lengths are rounded up to this, so that nearby requests reuse one cache (and graph)


# ------------------------------------------------------------------------------------------ sampling
def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row.

    Args:
        logits: [B, V].
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: keep only the k most likely tokens (ties at the k-th value are kept).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p (nucleus).
        generator: the random source (on the logits' device), for reproducible sampling.
    Returns:
        [B] int64 token ids.
    Raises:
        ValueError naming a parameter out of range.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, V], got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k: expected a positive int or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    x = logits.float() / temperature  # [B, V]
    if top_k is not None and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_x, order = x.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_x.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        sorted_x = sorted_x.masked_fill(mass_before >= top_p, float("-inf"))  # the top token always stays
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    # torch.multinomial(p, 1)'s own algorithm (argmax of p / Exp(1) noise: the same draws for the same generator
    # state), without its host-side probability checks, which would stall a GPU decode loop that runs ahead
    p = x.softmax(-1)
    return (p / torch.empty_like(p).exponential_(1, generator=generator)).argmax(-1)


# ----------------------------------------------------------------------------------------- generator
@dataclass
class GenerationResult:
    """What `Generator.generate` returns: per prompt the new tokens (stop token excluded) and why it ended."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" or "length"
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    batch: int
    cuda_graph: bool = False
    text: list[str] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode loop per second, all rows together."""
        return self.decode_steps * self.batch / self.decode_s if self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        graph = ", CUDA graph" if self.cuda_graph else ""
        return (
            f"prefill {self.prompt_tokens} tokens in {self.prefill_s * 1e3:.1f} ms ({self.prefill_tokens_per_s:.1f} tok/s); "
            f"decode {self.decode_steps} steps x {self.batch} rows in {self.decode_s * 1e3:.1f} ms "
            f"({self.decode_tokens_per_s:.1f} tok/s{graph})"
        )


class Generator:
    """Batched generation with a static KV cache; the decode step runs as a CUDA graph on a GPU.

    The cache stays on the model between calls (and a set-up cache makes every model forward write into
    it); `release()` drops it and the graph.

    Args:
        model: a Transformer with real weights.
        tokenizer: optional; gives stop ids and text in the result.
        cuda_graph: capture the decode step (default: on CUDA devices when the compiled decode kernel will run,
            i.e. it was built and the model is bf16/fp16 with head dim 64 or 128; the reference decode syncs
            with the host and cannot be captured).
        fuse: call `model.fuse_projections()` (in place): one [wq; wk; wv] and one [w1; w3] GEMM per layer,
            6 fewer kernels per layer in each decode step. The model is then for inference only.
    """

    def __init__(self, model: Transformer, tokenizer=None, cuda_graph: bool | None = None, fuse: bool = True):
        self.model, self.tokenizer = model, tokenizer
        if fuse:
            model.fuse_projections()
        self.device = model.tok_embeddings.weight.device
        if cuda_graph is None:
            from llama3_kernels.ops._common import HALF_DTYPES, has_kernel
            from llama3_kernels.ops.attention import KERNEL_HEAD_DIMS

            kernel_runs = model.tok_embeddings.weight.dtype in HALF_DTYPES and model.cfg.head_dim in KERNEL_HEAD_DIMS
            cuda_graph = self.device.type == "cuda" and has_kernel("decode_attn") and kernel_runs
        self.use_cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        # On a GPU the device runs one decode step ahead of the host: token i's copy to the host is queued, then
        # step i + 1 (it needs token i on the device only), and the host reads token i (stop checks, streaming)
        # while that step runs; a step past the last stop is wasted work, never output. A CPU runs the steps as
        # they are issued: nothing to overlap.
        self.run_ahead = self.device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple | None = None
        self._static: tuple[Tensor, Tensor, Tensor] | None = None  # tokens [B, 1], positions [B, 1], seqlens [B]
        self._graph_logits: Tensor | None = None

    def release(self) -> None:
        """Drop the KV cache and the captured graph."""
        self.model.clear_cache()
        self._graph = self._graph_key = self._static = self._graph_logits = None

    def _ensure_cache(self, batch: int, needed: int) -> None:
        limit = self.model.cfg.max_seq_len
        shape = self.model.cache_shape
        if shape is not None and shape[0] >= batch and shape[1] >= needed:
            return
        length = min(limit, -(-needed // CACHE_BLOCK) * CACHE_BLOCK)
        self._graph = self._graph_key = None
        self.model.setup_cache(batch, length)

    # ----------------------------------------------------------------------------------- decode step
    def _decode_step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits [B, V] of one new token per row at `positions`; eager or through the captured graph."""
        seqlens = (positions + 1).to(torch.int32)  # [B]: the cache holds the new token after this step
        if not self.use_cuda_graph:
            return self.model(tokens[:, None], positions[:, None], cache_seqlens=seqlens)[:, 0]
        key = (tokens.shape[0], self._cache_ptrs())
        if self._graph is None or self._graph_key != key:
            self._static = (tokens[:, None].clone(), positions[:, None].clone(), seqlens.clone())
            try:
                self._capture()
                self._graph_key = key
            except Exception as e:  # not capturable (a host sync somewhere): fall back to eager decode
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", stacklevel=4)
                self.use_cuda_graph, self._graph = False, None
                return self.model(tokens[:, None], positions[:, None], cache_seqlens=seqlens)[:, 0]
        st_tok, st_pos, st_len = self._static
        st_tok.copy_(tokens[:, None])
        st_pos.copy_(positions[:, None])
        st_len.copy_(seqlens)
        self._graph.replay()
        return self._graph_logits[:, 0]

    def _cache_ptrs(self) -> tuple[int, ...]:
        # The graph writes and reads the caches at the addresses they had at capture: a cache set up again
        # (release() and a new request, or another Generator on the same model) needs a new graph even when
        # its shape is the same.
        caches = (t for layer in self.model.layers for t in (layer.attention.k_cache, layer.attention.v_cache))
        return tuple(t.data_ptr() for t in caches)

    def _capture(self) -> None:
        # Warm up on a side stream (as torch.cuda.graphs asks), then capture; the warm-up runs the real first
        # step, so its cache writes are the ones replay makes. (Graphed decode equalled eager decode on an H200
        # before the decode GEMV joined the step; with it, tests/test_generate.py has not run on a GPU yet.)
        st_tok, st_pos, st_len = self._static
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(st_tok, st_pos, cache_seqlens=st_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self.model(st_tok, st_pos, cache_seqlens=st_len)  # [B, 1, V]
        self._graph = graph

    # -------------------------------------------------------------------------------------- generate
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_ids: Sequence[int] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Continue each prompt by up to max_new_tokens tokens.

        Args:
            prompts: token id lists, any lengths (each at least one token).
            max_new_tokens: most tokens generated per prompt.
            temperature, top_k, top_p: sampling, as in `sample` (temperature 0 = greedy).
            seed: seeds the sampling generator (default: nondeterministic).
            stop_ids: a row ends when it samples one of these (default: the tokenizer's stop ids, else the
                config's eos ids). The stop token is not part of the output.
            on_token: streaming callback on_token(row, token_id) for every generated token, in order.
        Returns:
            GenerationResult (tokens, finish reasons, timings, and text when there is a tokenizer).
        Raises:
            ValueError on empty prompts, out-of-range ids or a total length beyond the model's max_seq_len.
        """
        cfg = self.model.cfg
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: expected a non-empty list of non-empty token lists")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens}")
        lens = [len(p) for p in prompts]
        b, s = len(prompts), max(lens)
        if s + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"max_new_tokens: prompt ({s}) + {max_new_tokens} exceeds max_seq_len {cfg.max_seq_len}")
        if any(not 0 <= t < cfg.vocab_size for p in prompts for t in p):
            raise ValueError(f"prompts: token ids must lie in [0, {cfg.vocab_size})")
        if stop_ids is None:
            stop_ids = self.tokenizer.stop_ids if self.tokenizer is not None else cfg.eos_ids
        stops = set(int(t) for t in stop_ids)
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()

        self._ensure_cache(b, s + max_new_tokens)
        out: list[list[int]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        padded = torch.tensor([list(p) + [0] * (s - len(p)) for p in prompts], device=self.device)  # [B, S]
        pos = torch.tensor(lens, device=self.device)  # [B]: where each row's next token goes
        reader, ahead = _TokenReader(self.device, b), self.run_ahead

        def advance(tok: Tensor) -> Tensor:
            nonlocal pos
            logits = self._decode_step(tok, pos)
            pos = pos + 1
            return sample(logits, temperature, top_k, top_p, gen)

        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            logits = self.model(padded, last_index=pos - 1)[:, 0]  # prefill, [B, V]
            tok = sample(logits, temperature, top_k, top_p, gen)  # [B], on the device
            steps, t1 = 0, None
            for i in range(max_new_tokens):
                reader.start(tok)
                last = i == max_new_tokens - 1
                # (not on the first token: the first step may capture the graph, which belongs to decode time)
                ran_ahead = ahead and i > 0 and not last
                if ran_ahead:
                    next_tok = advance(tok)
                for row, t in enumerate(reader.wait()):
                    if reasons[row] == "stop":
                        continue
                    if t in stops:
                        reasons[row] = "stop"
                    else:
                        out[row].append(t)
                        if on_token is not None:
                            on_token(row, t)
                if t1 is None:
                    t1 = time.perf_counter()  # prefill ends with its first token
                if all(r == "stop" for r in reasons) or last:
                    break
                tok = next_tok if ran_ahead else advance(tok)
                steps += 1  # decode steps whose token was read
            self._sync()
            t2 = time.perf_counter()
        text = [self.tokenizer.decode(t) for t in out] if self.tokenizer is not None else []
        return GenerationResult(
            tokens=out, finish_reasons=reasons, prompt_tokens=sum(lens), prefill_s=t1 - t0, decode_s=t2 - t1,
            decode_steps=steps, batch=b, cuda_graph=self._graph is not None, text=text,
        )  # fmt: skip

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _TokenReader:
    """Sampled token ids read back without stalling the device: a non-blocking copy into pinned memory and an event
    after it, so the host waits for that copy alone while later queued work (the next decode step) runs."""

    def __init__(self, device: torch.device, batch: int):
        self.device = device
        self.host = torch.empty(batch, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.event = torch.cuda.Event() if device.type == "cuda" else None

    def start(self, tok: Tensor) -> None:
        self.host.copy_(tok, non_blocking=True)  # on tok's device's current stream
        if self.event is not None:
            self.event.record(torch.cuda.current_stream(self.device))  # that stream, whatever the current device

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


# --------------------------------------------------------------------------------------------- CLI
class _StreamPrinter:
    """Prints one row's text as it grows, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer, stream=None):
        self.tokenizer, self.stream, self.ids, self.shown = tokenizer, stream or sys.stdout, [], 0

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.stream.write(text[self.shown :])
        self.stream.flush()
        self.shown = len(text)

    def finish(self) -> None:
        self.stream.write(self.tokenizer.decode(self.ids)[self.shown :] + "\n")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="l3k generate", description="Generate text with a Llama 3 / SmolLM2 model.")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a .gguf file, or a Meta/HF checkpoint folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message")
    p.add_argument("--fp8", action="store_true", help="row-wise FP8 FFNs (all layers but the first and last)")
    p.add_argument("--fp8-amax-ub", type=float, default=1200.0,
                   help="bound on activation row amax (the paper's 1200; inf keeps massive activations)")  # fmt: skip
    p.add_argument("--fp8-skip-outliers", action="store_true",  # needs --fp8
                   help="with --fp8: keep layers whose activations exceed the bound on a calibration text in 16 bits")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on a GPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`l3k generate`: load a checkpoint, generate from one or more prompts, stream text, report tokens/s."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.fp8_skip_outliers and not args.fp8:
        print("error: --fp8-skip-outliers needs --fp8", file=sys.stderr)
        return 2
    from llama3_kernels.model.checkpoint import load_model

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    if tokenizer is None:
        print(f"error: no tokenizer for {args.model}", file=sys.stderr)
        return 2
    if args.fp8:
        from llama3_kernels.model import fp8

        skip = []
        if args.fp8_skip_outliers:
            # encoded as prompts are (with bos where the tokenizer adds one): massive activations sit on it
            ids = tokenizer.encode(fp8.CALIBRATION_TEXT, bos=getattr(tokenizer, "add_bos", True))
            calibration = torch.tensor([ids], device=args.device)
            skip = fp8.outlier_layers(model, calibration, args.fp8_amax_ub)
        fp8.quantize_model_fp8(model, amax_ub=args.fp8_amax_ub, skip_layers=skip)
        print(f"[fp8 FFN layers: {model.fp8_layers}]", file=sys.stderr)
    prompts = []
    for text in args.prompt:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": text}
            ]
            prompts.append(tokenizer.apply_chat_template(messages))
        else:
            prompts.append(tokenizer.encode(text, bos=getattr(tokenizer, "add_bos", True)))
    generator = Generator(model, tokenizer, cuda_graph=False if args.no_cuda_graph else None)
    stream = _StreamPrinter(tokenizer) if len(prompts) == 1 else None
    if stream is not None and not args.chat:
        print(args.prompt[0], end="", flush=True)
    result = generator.generate(
        prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, on_token=stream
    )
    if stream is None:
        for prompt, text in zip(args.prompt, result.text):
            print(f"=== {prompt}\n{text}\n")
    else:
        stream.finish()
    print(f"[{model.cfg.name}{', fp8' if args.fp8 else ''}, {args.device} {str(dtype)[6:]}] {result.summary()}",
          file=sys.stderr)  # fmt: skip
    return 0
