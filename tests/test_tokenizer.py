"""Tokenizers: Llama 3 golden ids and chat format, the GGUF BPE against transformers' tokenizer, the byte tokenizer.

Tests that need an asset (Llama 3's tokenizer.model, ~2 MB; SmolLM2's GGUF, ~98 MB) fetch it into the cache on first
use and skip when it cannot be had (offline).
"""

import random

import pytest

from llama3_kernels.model import hub
from llama3_kernels.model.tokenizer import ByteTokenizer, GGUFTokenizer, Llama3Tokenizer, bytes_to_unicode

TEXTS = [
    "Hello world! How are you?",
    "The quick brown fox jumps over the lazy dog.\n\n  Indented   spaces\tand tabs.\r\n",
    "Numbers: 3.14159, 1,000,000 and x=42; don't I'LL we've",
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 🎉🚀",
    "def f(x):\n    return x**2  # square\n",
]


@pytest.fixture(scope="module")
def llama3() -> Llama3Tokenizer:
    try:
        return Llama3Tokenizer(hub.llama3_tokenizer_path())
    except (RuntimeError, FileNotFoundError) as e:
        pytest.skip(f"Llama 3 tokenizer.model unavailable: {e}")


@pytest.fixture(scope="module")
def smol() -> GGUFTokenizer:
    try:
        return GGUFTokenizer.from_gguf(hub.smollm2_gguf_path())
    except (RuntimeError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="module")
def smol_hf():
    transformers = pytest.importorskip("transformers")
    try:
        path = hub.smollm2_gguf_path()
    except (RuntimeError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ------------------------------------------------------------------------------------------------ bytes
def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo ✓\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 256 and ids[-1] == 257 and ids[1:-1] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 258 and tok.stop_ids == [257]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat[0] == 256 and tok.decode(chat) == "user: hi\nassistant: "
    with pytest.raises(ValueError, match="messages"):
        tok.apply_chat_template([{"role": "user"}])


# ------------------------------------------------------------------------------------------------ Llama 3
def test_llama3_golden(llama3):
    assert llama3.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001,
    ]  # fmt: skip
    assert llama3.vocab_size == 128256
    names = llama3.special_tokens
    assert names["<|begin_of_text|>"] == 128000 and names["<|end_of_text|>"] == 128001
    assert names["<|start_header_id|>"] == 128006 and names["<|end_header_id|>"] == 128007
    assert names["<|eom_id|>"] == 128008 and names["<|eot_id|>"] == 128009
    assert names["<|reserved_special_token_245|>"] == 128255
    assert sorted(llama3.stop_ids) == [128001, 128008, 128009]


def test_llama3_round_trip_and_special_text(llama3):
    for text in TEXTS:
        assert llama3.decode(llama3.encode(text)) == text
    # special-token names typed in text stay text unless allowed
    plain = llama3.encode("<|eot_id|>")
    assert 128009 not in plain and llama3.decode(plain) == "<|eot_id|>"
    assert llama3.encode("<|eot_id|>", allow_special=True) == [128009]
    # long runs of whitespace / non-whitespace are cut for tiktoken and still round-trip
    long = " " * 30_000 + "a" * 30_000 + "b c"
    assert llama3.decode(llama3.encode(long)) == long


def test_llama3_chat_format(llama3):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "}]
    ids = llama3.apply_chat_template(messages)
    header = lambda role: [128006, *llama3.encode(role), 128007, 271]  # noqa: E731 ("\n\n" is 271)
    expected = [128000, *header("system"), *llama3.encode("Be brief."), 128009]
    expected += [*header("user"), *llama3.encode("Hi!"), 128009, *header("assistant")]
    assert ids == expected
    assert header("user")[1] == 882 and header("assistant")[1] == 78191  # Meta's ids for the role names
    assert llama3.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.apply_chat_template(messages, add_generation_prompt=False) == expected[: -len(header("assistant"))]


# ------------------------------------------------------------------------------------------------ GGUF BPE
def _toy_bpe(merges: list[str], pre: str | None = None) -> GGUFTokenizer:
    """A byte-level vocabulary of the 256 byte characters, the merges' results and one control token."""
    tokens = ["<|end|>", *bytes_to_unicode().values()]
    tokens += [m.replace(" ", "") for m in merges]
    return GGUFTokenizer(tokens, merges, [3] + [1] * (len(tokens) - 1), bos_id=0, eos_id=0, pre=pre)


def test_bpe_merges_by_rank():
    tok = _toy_bpe(["Ġ t", "h e", "Ġt he", "e r"])
    ids = tok.encode(" the there")
    assert [tok.tokens[i] for i in ids] == ["Ġthe", "Ġthe", "r", "e"]  # "he" outranks "er"
    assert tok.decode(ids) == " the there"
    # a control token in the text is matched whole; others fall back to bytes
    ids = tok.encode("x<|end|>y")
    assert ids == [tok.ids["x"], 0, tok.ids["y"]]
    assert tok.encode("x<|end|>y", allow_special=False)[1:-1] != [0]
    assert tok.stop_ids == [0]


def test_bpe_digit_split():
    merges = ["Ġ 1", "Ġ1 2"]
    assert [_toy_bpe(merges).tokens[i] for i in _toy_bpe(merges).encode(" 12")] == ["Ġ12"]
    smol = _toy_bpe(merges, pre="smollm")  # llama.cpp isolates every digit for this pre-tokenizer
    assert [smol.tokens[i] for i in smol.encode(" 12")] == ["Ġ", "1", "2"]


def test_bpe_bad_metadata():
    with pytest.raises(ValueError, match="merge 0"):
        GGUFTokenizer(["a", "b"], ["a c"])
    with pytest.raises(ValueError, match="bos_id"):
        GGUFTokenizer(["a"], [], bos_id=5)
    with pytest.raises(ValueError, match="token_types"):
        GGUFTokenizer(["a", "b"], [], token_types=[1])


def test_smollm2_tokenizer_metadata(smol):
    assert smol.vocab_size == 49152 and smol.bos_id == 1 and smol.eos_id == 2
    assert smol.tokens[1] == "<|im_start|>" and smol.tokens[2] == "<|im_end|>"
    assert set(smol.stop_ids) == {0, 2}
    for text in TEXTS:
        assert smol.decode(smol.encode(text)) == text


def test_smollm2_matches_transformers(smol, smol_hf):
    rng = random.Random()
    # transformers' GGUF tokenizer lacks SmolLM's digit isolation ("\n 3" → "ĊĠ","3" in SmolLM2's own tokenizer
    # and llama.cpp, "Ċ","Ġ","3" there), so the shuffled text leaves out words holding digits
    words = [w for w in " ".join(TEXTS).split(" ") if not any(c.isdigit() for c in w)]
    texts = [*TEXTS, " ".join(rng.choice(words) for _ in range(40)), "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert smol.encode(text) == smol_hf.encode(text, add_special_tokens=False), text


def test_smollm2_chat_template(smol, smol_hf):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smol.apply_chat_template(messages)
    text = smol.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith(
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    hf = smol_hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == list(hf["input_ids"] if hasattr(hf, "keys") else hf)
    with_system = [{"role": "system", "content": "Be terse."}, *messages]
    assert smol.decode(smol.apply_chat_template(with_system, add_generation_prompt=False)) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    )
