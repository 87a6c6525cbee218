"""The generator: sampling properties, KV-cache greedy decoding against a plain full-forward loop for a
batch of prompts of different lengths, seeded determinism, stop tokens, streaming, FP8, and the CLI."""

import contextlib
import math
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama3_kernels.generate import Generator, sample
from llama3_kernels.model import Transformer, get_config
from llama3_kernels.model.fp8 import quantize_model_fp8

CFG = dict(max_seq_len=128)


def random_model(gen, **changes) -> Transformer:
    """Debug-sized model with spread-out logits (weights ~ 1/sqrt(fan_in)), so greedy choices are not ties."""
    model = Transformer(get_config("debug", **CFG, **changes))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def prompts_for(gen, lens, vocab=512):
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


def greedy_reference(model, prompt, n):
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ sampling
def test_sample_greedy_and_top_k1(gen):
    logits = torch.randn(5, 300, generator=gen)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=2.0, top_k=1, generator=gen), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6, generator=gen), logits.argmax(-1))


def test_sample_top_k_support(gen):
    logits = torch.randn(4, 50, generator=gen)
    allowed = logits.topk(7, dim=-1).indices
    draws = torch.stack([sample(logits, 1.5, top_k=7, generator=gen) for _ in range(300)], 1)  # [4, 300]
    for row in range(4):
        assert set(draws[row].tolist()) <= set(allowed[row].tolist())
        assert len(set(draws[row].tolist())) >= 4  # it does sample, not just argmax


def test_sample_top_p_nucleus_and_frequencies():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {1}  # 0.5 reaches 0.5 alone
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {1, 3}
    draws = sample(logits, 1.0, top_p=0.9, generator=g)  # nucleus {1, 3, 2}, renormalized by 0.95
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[0] == 0
    torch.testing.assert_close(counts[1:], torch.tensor([0.5, 0.15, 0.3]) / 0.95, atol=0.03, rtol=0)
    # plain temperature sampling follows softmax(logits / T): T = 0.5 squares and renormalizes the probabilities
    counts = torch.bincount(sample(logits, 0.5, generator=g), minlength=4).float() / 4000
    torch.testing.assert_close(counts, probs**2 / (probs**2).sum(), atol=0.03, rtol=0)


def test_sample_seeded_and_bad_args(gen):
    logits = torch.randn(3, 100, generator=gen)
    a = [sample(logits, 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(logits, 1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, top_p=1.5)
    with pytest.raises(ValueError, match="logits"):
        sample(logits[0])


# ---------------------------------------------------------------------------------------- generation
def test_greedy_batch_matches_full_forward_loop(gen):
    model = random_model(gen)
    prompts = prompts_for(gen, [3, 17, 9])
    streamed = []
    result = Generator(model).generate(
        prompts, max_new_tokens=10, stop_ids=[], on_token=lambda row, t: streamed.append((row, t))
    )
    for prompt, got in zip(prompts, result.tokens):
        assert got == greedy_reference(model, prompt, 10)
    assert result.finish_reasons == ["length"] * 3 and result.decode_steps == 9 and result.batch == 3
    assert [t for r, t in streamed if r == 1] == result.tokens[1] and len(streamed) == 30
    assert result.prompt_tokens == 29 and result.prefill_s > 0 and result.decode_s > 0
    assert "tok/s" in result.summary() and result.decode_tokens_per_s > 0
    # a second call reuses the cache (stale entries from the first call must not leak)
    again = Generator(model).generate([prompts[2]], max_new_tokens=4, stop_ids=[])
    assert again.tokens[0] == result.tokens[2][:4]


def test_sampling_is_seeded(gen):
    model = random_model(gen)
    prompts = prompts_for(gen, [4, 6])
    g = Generator(model)
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=100, top_p=0.95, stop_ids=[])
    a, b = g.generate(prompts, seed=3, **kw), g.generate(prompts, seed=3, **kw)
    c = g.generate(prompts, seed=4, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stop_tokens(gen):
    model = random_model(gen)
    prompts = prompts_for(gen, [5, 8, 2])
    free = Generator(model).generate(prompts, max_new_tokens=8, stop_ids=[]).tokens
    stop = free[1][3]  # row 1's fourth token becomes a stop token
    got = Generator(model).generate(prompts, max_new_tokens=8, stop_ids=[stop])
    for row, tokens in enumerate(free):
        want = tokens[: tokens.index(stop)] if stop in tokens else tokens
        assert got.tokens[row] == want
        assert got.finish_reasons[row] == ("stop" if stop in tokens else "length")
    # every row stopping on its first token ends generation after prefill
    firsts = [t[0] for t in free]
    done = Generator(model).generate(prompts, max_new_tokens=8, stop_ids=firsts)
    assert done.tokens == [[], [], []] and done.decode_steps == 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_running_one_step_ahead_changes_nothing(gen, temperature):
    """The GPU's schedule (decode step i + 1 queued before the host reads token i), forced on the CPU: the same
    tokens, stops, seeded samples and step counts; a step run past the last stop is not counted or output."""
    model = random_model(gen)
    prompts = prompts_for(gen, [5, 8, 2])
    free = Generator(model).generate(prompts, max_new_tokens=8, stop_ids=[], temperature=temperature, seed=3)
    for stop_ids in ([], [free.tokens[1][3]], [t[0] for t in free.tokens]):
        runs = []
        for ahead in (False, True):
            g = Generator(model)
            g.run_ahead = ahead
            runs.append(g.generate(prompts, max_new_tokens=8, stop_ids=stop_ids, temperature=temperature, seed=3))
        assert runs[0].tokens == runs[1].tokens and runs[0].finish_reasons == runs[1].finish_reasons
        assert runs[0].decode_steps == runs[1].decode_steps
    assert runs[1].decode_steps == 0  # every row stopped on its first token


def test_running_ahead_keeps_the_first_step_in_decode_time(gen, monkeypatch):
    """The first decode step (where a GPU captures its graph) is not queued before the first token is read: its
    time counts as decode, not prefill."""
    model = random_model(gen)
    g = Generator(model)
    g.run_ahead = True
    slow_first, step = [True], g._decode_step

    def decode_step(tok, pos):
        if slow_first[0]:
            slow_first[0] = False
            time.sleep(0.3)
        return step(tok, pos)

    monkeypatch.setattr(g, "_decode_step", decode_step)
    result = g.generate(prompts_for(gen, [5]), max_new_tokens=4, stop_ids=[])
    assert result.decode_steps == 3 and result.decode_s >= 0.3 > result.prefill_s


def test_default_stop_ids_come_from_the_tokenizer(gen):
    class Tok:
        stop_ids = None

        def decode(self, ids):
            return ",".join(map(str, ids))

    model = random_model(gen)
    prompt = prompts_for(gen, [6])
    free = Generator(model).generate(prompt, max_new_tokens=6, stop_ids=[]).tokens[0]
    Tok.stop_ids = [free[2]]
    got = Generator(model, Tok()).generate(prompt, max_new_tokens=6)
    assert got.tokens[0] == free[: free.index(free[2])] and got.finish_reasons == ["stop"]
    assert got.text == [",".join(map(str, got.tokens[0]))]
    assert get_config("llama3.1-8b").eos_ids == (128001, 128008, 128009)


def test_generate_bad_args(gen):
    model = random_model(gen)
    g = Generator(model)
    with pytest.raises(ValueError, match="prompts"):
        g.generate([[1, 2], []])
    with pytest.raises(ValueError, match="max_new_tokens"):
        g.generate([[1] * 100], max_new_tokens=40)
    with pytest.raises(ValueError, match="prompts"):
        g.generate([[1, 512]], max_new_tokens=4)


def test_fp8_generation_runs_and_mostly_agrees(gen):
    model = random_model(gen, n_layers=4)
    prompts = prompts_for(gen, [7, 12])
    want = Generator(model).generate(prompts, max_new_tokens=6, stop_ids=[]).tokens
    quantize_model_fp8(model)
    got = Generator(model).generate(prompts, max_new_tokens=6, stop_ids=[])
    for prompt, tokens in zip(prompts, got.tokens):  # the FP8 model's own greedy decoding, cache vs no cache
        assert tokens == greedy_reference(model, prompt, 6)
    assert got.tokens[0][0] == want[0][0] or got.tokens[1][0] == want[1][0]  # first tokens of random nets mostly agree


# ------------------------------------------------------------------- the CUDA-graph path, emulated on CPU
class _TapeGraph(TorchDispatchMode):
    """Stands in for torch.cuda.CUDAGraph on CPU: capture records every op (custom ops as one op) with the
    tensors it read and made; replay runs the tape again, writing each op's result into the tensors captured
    then. As with a real graph, no Python runs at replay: values read on the host during capture, tensors
    replaced after it and inputs not copied into the static buffers all show up as wrong tokens."""

    def __init__(self):
        super().__init__()
        self.tape, self.replays = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tape.append((func, args, kwargs or {}, out))
        return out

    def replay(self):
        self.replays += 1
        for func, args, kwargs, out in self.tape:
            fresh = func(*args, **kwargs)
            pairs = zip(out, fresh) if isinstance(out, (tuple, list)) else [(out, fresh)]
            for old, new in pairs:  # views and in-place results already alias what they should
                if (
                    isinstance(old, torch.Tensor)
                    and old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr()
                ):
                    old.copy_(new)


@pytest.fixture
def tape_graphs(monkeypatch):
    """torch.cuda's graph and stream API replaced by `_TapeGraph` and no-op streams; yields the graphs made."""
    graphs = []

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    def new_graph():
        graphs.append(_TapeGraph())
        return graphs[-1]

    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: g)  # the mode is its own context manager
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    return graphs


def test_graph_decode_path_matches_eager(gen, tape_graphs):
    model = random_model(gen)
    prompts = prompts_for(gen, [5, 30, 11])
    eager = Generator(model).generate(prompts, max_new_tokens=12, stop_ids=[])
    graphed = Generator(model, cuda_graph=True)
    graphed.use_cuda_graph = True  # the constructor allows it on CUDA only
    got = graphed.generate(prompts, max_new_tokens=12, stop_ids=[])
    assert got.cuda_graph and got.tokens == eager.tokens
    assert len(tape_graphs) == 1 and tape_graphs[0].replays == 11  # captured once, replayed every step
    # a smaller batch re-captures; a cache set up again at new addresses (same shape) must not reuse the
    # graph that still points at the old one
    assert graphed.generate(prompts[2:], max_new_tokens=6, stop_ids=[]).tokens == [eager.tokens[2][:6]]
    assert len(tape_graphs) == 2
    shape = model.cache_shape
    Generator(model).release()
    model.setup_cache(*shape[:2])
    assert graphed.generate(prompts[:1], max_new_tokens=6, stop_ids=[]).tokens == [eager.tokens[0][:6]]
    assert len(tape_graphs) == 3


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_step_has_no_host_sync(gen, fp8):
    """The captured decode step must not read device values on the host (.item(), .tolist(), int(), bool(),
    nonzero, Python branches on values): on the meta device, which holds no data, any of those raises. The
    CPU-only value check of ops.decode_attention is skipped there as it is on CUDA."""
    model = random_model(gen).to(torch.bfloat16)
    if fp8:
        quantize_model_fp8(model, skip_first_last=False)
    model = model.to("meta")
    model.setup_cache(3, 64)
    tokens = torch.zeros(3, 1, dtype=torch.long, device="meta")
    with torch.inference_mode():
        logits = model(tokens, tokens.clone(), cache_seqlens=torch.ones(3, dtype=torch.int32, device="meta"))
    assert logits.shape == (3, 1, model.cfg.vocab_size) and logits.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_graph_decode_matches_eager(fp8):
    gen = torch.Generator().manual_seed(0)
    model = random_model(gen).cuda().to(torch.bfloat16)
    if fp8:
        quantize_model_fp8(model, skip_first_last=False)
    prompts = prompts_for(gen, [5, 30, 11])
    eager = Generator(model, cuda_graph=False).generate(prompts, max_new_tokens=16, stop_ids=[])
    graphed = Generator(model, cuda_graph=True)
    result = graphed.generate(prompts, max_new_tokens=16, stop_ids=[])
    assert result.cuda_graph and result.tokens == eager.tokens


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_generates_from_a_meta_checkpoint(gen, tmp_path, capsys):
    checkpoint = pytest.importorskip("llama3_kernels.model.checkpoint")
    if not hasattr(checkpoint, "load_model") or not hasattr(checkpoint, "save_meta_checkpoint"):
        pytest.skip("checkpoint loader not available yet")
    from llama3_kernels.generate import main
    from llama3_kernels.model.tokenizer import ByteTokenizer

    model = random_model(gen)
    checkpoint.save_meta_checkpoint(model, model.cfg, tmp_path)
    tok = ByteTokenizer()
    want = Generator(model, tok).generate([tok.encode("Hi", bos=True)], max_new_tokens=6, stop_ids=tok.stop_ids)
    assert main(["--model", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out == "Hi" + want.text[0] + "\n"
    assert "tok/s" in out.err

    chats = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in ("Hi", "Yo")]
    want = Generator(model, tok).generate(chats, max_new_tokens=5)
    argv = ["--model", str(tmp_path), "--prompt", "Hi", "--prompt", "Yo", "--chat", "--max-new-tokens", "5"]
    assert main([*argv, "--device", "cpu", "--fp8"]) == 0  # 2 layers: FP8 skips first and last, nothing changes
    out = capsys.readouterr().out
    assert f"=== Hi\n{want.text[0]}\n" in out and f"=== Yo\n{want.text[1]}\n" in out
    assert main([*argv, "--device", "cpu", "--fp8", "--fp8-skip-outliers"]) == 0  # calibrates, same 16-bit layers
    assert f"=== Hi\n{want.text[0]}\n" in capsys.readouterr().out
    assert main([*argv, "--fp8-skip-outliers"]) == 2 and "needs --fp8" in capsys.readouterr().err
